"""Checkpoints: written atomically, verified on load, loaded without executing code.

Each save writes `ckpt_<step>.pt` to a temporary file in the checkpoint folder, flushes it
to disk and renames it into place, next to a `.sha256` file with its checksum. `latest.pt`
(and its checksum) is then pointed at it with a hard link, so a crash at any moment leaves
either the old or the new `latest.pt`, never a partial one. The newest `keep` step files
are kept.

Loading uses `torch.load(weights_only=True)`, which rejects anything but tensors and plain
containers, so a checkpoint never runs code. A `latest.pt` whose checksum does not match
or that cannot be read is reported with its path, and the newest older checkpoint that
verifies is used instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .data.shards import write_atomic

log = logging.getLogger(__name__)

LATEST_NAME = "latest.pt"
BEST_NAME = "best.pt"
FORMAT_VERSION = 1
STEP_FILE_PATTERN = re.compile(r"^ckpt_(\d{8})\.pt$")


class CheckpointError(RuntimeError):
    pass


class _HashingWriter:
    """A binary file wrapper that computes the SHA-256 of everything written through it."""

    def __init__(self, file) -> None:
        self.file = file
        self.digest = hashlib.sha256()

    def write(self, data) -> int:
        self.digest.update(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, [text.encode("utf-8")])


def _link_atomic(src: Path, dst: Path) -> None:
    """Make `dst` the same file as `src` in one rename (a copy where hard links fail)."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    try:
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> str:
    """Write `state` to `path` atomically with a `.sha256` file beside it; return the checksum.

    An OSError (a full disk, for example) leaves any earlier file at `path` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            writer = _HashingWriter(f)
            torch.save({"format_version": FORMAT_VERSION, **state}, writer)
            f.flush()
            os.fsync(f.fileno())
        digest = writer.digest.hexdigest()
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _write_text_atomic(checksum_path(path), digest + "\n")
    return digest


def save_step_checkpoint(state: dict[str, Any], folder: str | os.PathLike, step: int, keep: int) -> Path:
    """Save `state` as `ckpt_<step>.pt`, point `latest.pt` at it and prune all but `keep` step files."""
    folder = Path(folder)
    step_path = folder / f"ckpt_{step:08d}.pt"
    save_checkpoint(state, step_path)

    latest = folder / LATEST_NAME
    # The checksum first: a crash between the two links leaves a latest.pt that fails
    # verification and falls back to the step files, never a wrong file that passes.
    _link_atomic(checksum_path(step_path), checksum_path(latest))
    _link_atomic(step_path, latest)

    for old in step_checkpoints(folder)[keep:]:
        old.unlink(missing_ok=True)
        checksum_path(old).unlink(missing_ok=True)
    return step_path


def step_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """Return the `ckpt_<step>.pt` files in `folder`, newest step first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    files = [p for p in folder.iterdir() if STEP_FILE_PATTERN.match(p.name)]
    return sorted(files, key=lambda p: int(STEP_FILE_PATTERN.match(p.name).group(1)), reverse=True)


def copy_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Make `dst` an atomic copy (or hard link) of the complete checkpoint `src` and its checksum."""
    src, dst = Path(src), Path(dst)
    if checksum_path(src).exists():
        _link_atomic(checksum_path(src), checksum_path(dst))
    _link_atomic(src, dst)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load one checkpoint, verifying its checksum when a `.sha256` file is beside it."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")

    expected = checksum_path(path)
    if expected.exists():
        actual = _file_sha256(path)
        if actual != expected.read_text().strip():
            raise CheckpointError(f"checkpoint {path} does not match its checksum in {expected.name}; the file is corrupted or truncated")

    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} could not be read ({type(exc).__name__}: {exc}); it may be truncated") from exc
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} is not a mars-m-exp checkpoint of format version {FORMAT_VERSION}")
    return state


def load_newest_valid(folder: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[Path, dict[str, Any]] | None:
    """Load `latest.pt`, or when it is bad, the newest step checkpoint that verifies.

    Returns None when the folder has no checkpoint at all; raises CheckpointError when
    checkpoints exist but none of them can be loaded.
    """
    folder = Path(folder)
    candidates = [folder / LATEST_NAME] + step_checkpoints(folder)
    candidates = [p for p in candidates if p.exists()]
    if not candidates:
        return None

    failures = []
    for path in candidates:
        try:
            return path, load_checkpoint(path, map_location)
        except CheckpointError as exc:
            log.error("%s; trying an older checkpoint", exc)
            failures.append(str(path))
    raise CheckpointError(
        f"no checkpoint in {folder} could be loaded (tried {', '.join(failures)}); "
        "pass resume=false to start over"
    )


def unwrap_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Return the model's state dict without the `_orig_mod.` (compile) or `module.` (DDP) prefixes."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model.state_dict()
