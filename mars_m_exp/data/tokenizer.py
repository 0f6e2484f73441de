"""GPT-2 BPE through tiktoken, with an immediate, clear error when its files are missing."""

from __future__ import annotations

import functools
import os

import tiktoken

# GPT-2's <|endoftext|> token. Every document is preceded by it (the llm.c convention),
# so a training window that crosses a document boundary sees where the new one starts.
EOT_TOKEN = 50256


class TokenizerUnavailableError(RuntimeError):
    pass


@functools.lru_cache(maxsize=1)
def gpt2_encoding() -> tiktoken.Encoding:
    """Return tiktoken's GPT-2 encoding, raising a clear error when it cannot be loaded.

    tiktoken downloads its BPE files on first use and caches them in TIKTOKEN_CACHE_DIR
    (or a temporary folder); offline, the files must already be there.
    """
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as exc:  # requests' connection errors, or tiktoken's own ValueError
        cache = os.environ.get("TIKTOKEN_CACHE_DIR", "<unset>")
        raise TokenizerUnavailableError(
            f"could not load tiktoken's GPT-2 BPE files ({type(exc).__name__}: {exc}); "
            f"TIKTOKEN_CACHE_DIR is {cache}. Offline, set TIKTOKEN_CACHE_DIR to a folder holding "
            "the cached vocab.bpe and encoder.json files (run tiktoken.get_encoding('gpt2') once on "
            "a machine with network access and copy its cache)"
        ) from exc


def encode_document(text: str) -> list[int]:
    """Tokenize one document as [EOT] + BPE(text), ignoring special-token syntax in the text."""
    return [EOT_TOKEN] + gpt2_encoding().encode_ordinary(text)
