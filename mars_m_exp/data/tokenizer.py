"""GPT-2 BPE through tiktoken, with an immediate, clear error when its files are missing."""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile

import tiktoken

# GPT-2's <|endoftext|> token. Every document is preceded by it (the llm.c convention),
# so a training window that crosses a document boundary sees where the new one starts.
EOT_TOKEN = 50256

# Download URLs of GPT-2's BPE files, as in tiktoken 0.14's tiktoken_ext/openai_public.py.
GPT2_BPE_URLS = (
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
)
# Seconds to wait for the download host before reporting the machine offline. tiktoken's
# own download (requests.get without a timeout) can otherwise hang on a firewalled node.
DOWNLOAD_PROBE_TIMEOUT_S = 10.0


class TokenizerUnavailableError(RuntimeError):
    pass


def tiktoken_cache_dir() -> str | None:
    """Return the folder tiktoken caches its downloads in, or None when caching is off.

    Mirrors tiktoken.load.read_file_cached (tiktoken 0.14): TIKTOKEN_CACHE_DIR, then
    DATA_GYM_CACHE_DIR, then <tmp>/data-gym-cache. An empty value disables the cache.
    """
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        cache_dir = os.environ["TIKTOKEN_CACHE_DIR"]
    elif "DATA_GYM_CACHE_DIR" in os.environ:
        cache_dir = os.environ["DATA_GYM_CACHE_DIR"]
    else:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    return cache_dir or None


def missing_bpe_files() -> list[str]:
    """Return the URLs of GPT-2 BPE files that are not in tiktoken's cache."""
    cache_dir = tiktoken_cache_dir()
    if cache_dir is None:
        return list(GPT2_BPE_URLS)
    # tiktoken names each cached file by the SHA-1 of its URL.
    return [url for url in GPT2_BPE_URLS if not os.path.exists(os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest()))]


def _unavailable_message(reason: str) -> str:
    cache = os.environ.get("TIKTOKEN_CACHE_DIR", "<unset>")
    return (
        f"could not load tiktoken's GPT-2 BPE files ({reason}); TIKTOKEN_CACHE_DIR is {cache}. "
        "Offline, set TIKTOKEN_CACHE_DIR to a folder holding the cached vocab.bpe and encoder.json "
        "files (run tiktoken.get_encoding('gpt2') once on a machine with network access and copy its cache)"
    )


def check_bpe_files_available(timeout_s: float = DOWNLOAD_PROBE_TIMEOUT_S) -> None:
    """Raise TokenizerUnavailableError at once when the BPE files are neither cached nor downloadable.

    Cached files need no network. Otherwise one HEAD request, bounded by `timeout_s`,
    checks that the download host responds.
    """
    missing = missing_bpe_files()
    if not missing:
        return
    import requests  # a dependency of tiktoken, which downloads through it

    try:
        requests.head(missing[0], timeout=timeout_s, allow_redirects=True)
    except requests.RequestException as exc:
        raise TokenizerUnavailableError(
            _unavailable_message(f"{missing[0]} is not cached and not reachable: {type(exc).__name__}")
        ) from exc


@functools.lru_cache(maxsize=1)
def gpt2_encoding() -> tiktoken.Encoding:
    """Return tiktoken's GPT-2 encoding, raising a clear error when it cannot be loaded.

    tiktoken downloads its BPE files on first use and caches them in TIKTOKEN_CACHE_DIR
    (or a temporary folder); offline, the files must already be there.
    """
    check_bpe_files_available()
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as exc:  # requests' connection errors, or tiktoken's own ValueError
        raise TokenizerUnavailableError(_unavailable_message(f"{type(exc).__name__}: {exc}")) from exc


def encode_document(text: str) -> list[int]:
    """Tokenize one document as [EOT] + BPE(text), ignoring special-token syntax in the text."""
    return [EOT_TOKEN] + gpt2_encoding().encode_ordinary(text)
