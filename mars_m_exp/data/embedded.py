"""The default corpus: text every Python installation carries, tokenized on first use.

The source is the reference documentation bundled as `pydoc_data.topics` (about 465 kB
of English prose and code), or a folder of the user's own `.txt` / `.jsonl` files. The
documents are tokenized with GPT-2's BPE and concatenated. The token stream is cut into
chunks of `SPLIT_CHUNK_TOKENS`, and every `round(1 / val_fraction)`-th chunk is held out
for validation. The corpus has only about 80 documents on very different topics, so holding
out whole documents would measure topic shift more than learning; chunks keep both splits
from the same distribution, like nanoGPT's character-level Shakespeare split. The chunks are
short (256 tokens, so about 54 held-out pieces spread over every topic) because with 2048
tokens the 14K validation tokens came from only 6 places in the corpus.

Both splits are written as token shards next to a `manifest.json`. The manifest is written
last, so a folder with a manifest whose fingerprint matches is complete and is reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Iterator

import numpy as np

from .shards import MANIFEST_NAME, write_atomic, write_shard
from .tokenizer import encode_document

log = logging.getLogger(__name__)

# Bump when the preparation changes what it writes, so stale caches are rebuilt.
PREPARATION_VERSION = 3
SPLIT_CHUNK_TOKENS = 256


class CorpusError(ValueError):
    pass


def iter_pydoc_documents() -> Iterator[str]:
    """Yield the topics of Python's bundled reference documentation, in key order."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]


def _text_files(text_path: Path) -> list[Path]:
    if not text_path.exists():
        raise CorpusError(f"data.text_path {text_path} does not exist; point it at a folder of .txt/.jsonl files")
    if text_path.is_file():
        files = [text_path]
    else:
        files = sorted(p for p in text_path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())
    if not files:
        raise CorpusError(f"data.text_path {text_path} contains no .txt or .jsonl files")
    return files


def iter_text_documents(text_path: Path) -> Iterator[str]:
    """Yield documents from a folder: a `.txt` file is one document, a `.jsonl` line's "text" another."""
    for path in _text_files(text_path):
        if path.suffix == ".txt":
            yield path.read_text(encoding="utf-8")
            continue
        with path.open(encoding="utf-8") as f:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise CorpusError(f"{path}:{line_number} is not valid JSON: {exc.msg}") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise CorpusError(f'{path}:{line_number} has no string field "text"')
                yield record["text"]


def _fingerprint(text_path: Path | None, val_fraction: float) -> dict:
    if text_path is None:
        source = {"kind": "pydoc_data.topics", "python": sys.version.split()[0]}
        digest = hashlib.sha256()
        for document in iter_pydoc_documents():
            digest.update(document.encode("utf-8"))
        source["sha256"] = digest.hexdigest()
    else:
        source = {"kind": "text_path", "path": str(text_path.resolve())}
        files = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in _text_files(text_path)]
        source["files_sha256"] = hashlib.sha256(json.dumps(files).encode()).hexdigest()
    return {
        "preparation_version": PREPARATION_VERSION,
        "tokenizer": "tiktoken/gpt2",
        "val_fraction": val_fraction,
        "source": source,
    }


def default_embedded_path(cache_dir: str, text_path: str | None, val_fraction: float) -> Path:
    """Return the cache folder for a source: a hash of its fingerprint under `cache_dir`."""
    fingerprint = _fingerprint(Path(text_path) if text_path else None, val_fraction)
    key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir).expanduser() / f"embedded-{key}"


def prepare_embedded(out_dir: str | os.PathLike, text_path: str | None = None, val_fraction: float = 0.1) -> Path:
    """Tokenize the embedded corpus (or `text_path`) into shards in `out_dir`, unless done already.

    Returns `out_dir`. A folder whose manifest was written for another source raises
    CorpusError rather than being overwritten.
    """
    out_dir = Path(out_dir)
    source_path = Path(text_path) if text_path else None
    fingerprint = _fingerprint(source_path, val_fraction)

    manifest_path = out_dir / MANIFEST_NAME
    if manifest_path.exists():
        existing = json.loads(manifest_path.read_text())
        if existing.get("fingerprint") == fingerprint:
            return out_dir
        raise CorpusError(
            f"{out_dir} already contains a corpus prepared from another source or setting; "
            "point data.path at an empty folder or delete that one"
        )

    documents = iter_pydoc_documents() if source_path is None else iter_text_documents(source_path)
    stream: list[int] = []
    num_documents = 0
    for document in documents:
        stream.extend(encode_document(document))
        num_documents += 1

    every = max(2, round(1.0 / val_fraction))
    train_tokens: list[int] = []
    val_tokens: list[int] = []
    for index, start in enumerate(range(0, len(stream), SPLIT_CHUNK_TOKENS)):
        chunk = stream[start : start + SPLIT_CHUNK_TOKENS]
        (val_tokens if index % every == every - 1 else train_tokens).extend(chunk)
    if not train_tokens or not val_tokens:
        raise CorpusError(
            f"the corpus has {len(stream)} tokens, too few to hold out every {every}th chunk of "
            f"{SPLIT_CHUNK_TOKENS} tokens for validation; add text or raise data.val_fraction"
        )

    log.info("writing %d train and %d validation tokens from %d documents to %s", len(train_tokens), len(val_tokens), num_documents, out_dir)
    write_shard(out_dir / "embedded_val_000000.bin", np.array(val_tokens, dtype=np.uint16))
    write_shard(out_dir / "embedded_train_000000.bin", np.array(train_tokens, dtype=np.uint16))

    manifest = {
        "fingerprint": fingerprint,
        "documents": num_documents,
        "shards": {
            "embedded_val_000000.bin": len(val_tokens),
            "embedded_train_000000.bin": len(train_tokens),
        },
    }
    write_atomic(manifest_path, [json.dumps(manifest, indent=2).encode()])
    return out_dir
