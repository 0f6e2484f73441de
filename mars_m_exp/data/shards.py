"""Token shard files: the llm.c / modded-nanogpt binary format, and nanoGPT's headerless one.

A shard is a header of 256 little-endian int32 values followed by the tokens as
little-endian uint16. The header starts with the magic number 20240520, the format
version 1 and the number of tokens; the other 253 values are zero. GPT-2's vocabulary
(50,257 tokens) fits in uint16.

nanoGPT's `train.bin` / `val.bin` are the same uint16 tokens without a header; they are
recognised by their name and read whole.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import Iterable

import numpy as np

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")
MAX_TOKEN_ID = np.iinfo(np.uint16).max

# The file that data_prep and the embedded corpus write beside their shards: the source,
# tokenizer and token count of every shard.
MANIFEST_NAME = "manifest.json"

# File names that nanoGPT's prepare scripts write without a header.
HEADERLESS_NAMES = frozenset({"train.bin", "val.bin"})


class ShardError(ValueError):
    """A shard file that is missing, truncated or not in the expected format."""


def write_atomic(path: str | os.PathLike, chunks: Iterable[bytes]) -> str:
    """Write `chunks` to `path` atomically and return the SHA-256 hex digest of the file.

    The data goes to a temporary file in the same folder, is flushed to disk and then
    renamed over `path`, so a crash never leaves a partial file under the final name.
    The temporary name starts with "." and ends with ".tmp".
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    # os.open with mode 0o666 lets the umask set the permissions, as for any new file;
    # tempfile.mkstemp would make the file readable by its owner only.
    tmp_name = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp"
    fd = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                digest.update(chunk)
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return digest.hexdigest()


def write_shard(path: str | os.PathLike, tokens: np.ndarray) -> str:
    """Write `tokens` as a shard at `path`, atomically; return the file's SHA-256 hex digest."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ShardError(f"shard tokens must be a 1-D array, got shape {tokens.shape} for {path}")
    if tokens.size and (tokens.min() < 0 or tokens.max() > MAX_TOKEN_ID):
        raise ShardError(
            f"token ids for {path} must lie in [0, {MAX_TOKEN_ID}] to fit uint16, "
            f"got [{tokens.min()}, {tokens.max()}]"
        )

    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0] = SHARD_MAGIC
    header[1] = SHARD_VERSION
    header[2] = tokens.size
    return write_atomic(path, [header.tobytes(), tokens.astype(TOKEN_DTYPE, copy=False).tobytes()])


def file_sha256(path: str | os.PathLike) -> str:
    """Return the SHA-256 hex digest of a file, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            digest.update(block)
    return digest.hexdigest()


def read_header(path: str | os.PathLike) -> int:
    """Check the header of the shard at `path` against its size and return its token count."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ShardError(f"shard not found: {path}") from None
    if size < HEADER_BYTES:
        raise ShardError(
            f"shard {path} is {size} bytes, shorter than its {HEADER_BYTES}-byte header; "
            "the file is truncated, so prepare it again"
        )

    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise ShardError(
            f"shard {path} has magic number {header[0]}, expected {SHARD_MAGIC}; "
            "it is not an llm.c-format token shard (nanoGPT files must be named train.bin/val.bin)"
        )
    if header[1] != SHARD_VERSION:
        raise ShardError(f"shard {path} has format version {header[1]}, expected {SHARD_VERSION}")

    num_tokens = int(header[2])
    expected_size = HEADER_BYTES + num_tokens * TOKEN_DTYPE.itemsize
    if size != expected_size:
        raise ShardError(
            f"shard {path} declares {num_tokens} tokens ({expected_size} bytes) but is {size} bytes; "
            "the file is truncated or corrupted, so prepare it again"
        )
    return num_tokens


def open_shard(path: str | os.PathLike) -> np.memmap:
    """Memory-map the tokens of a shard, checking its header first.

    Files named `train.bin` or `val.bin` are read as nanoGPT's headerless uint16 files.
    """
    path = Path(path)
    if path.name in HEADERLESS_NAMES:
        if not path.is_file():
            raise ShardError(f"token file not found: {path}")
        if path.stat().st_size % TOKEN_DTYPE.itemsize:
            raise ShardError(f"token file {path} has an odd number of bytes, so it is not uint16 tokens")
        return np.memmap(path, dtype=TOKEN_DTYPE, mode="r")

    num_tokens = read_header(path)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(num_tokens,))
