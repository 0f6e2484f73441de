"""The output folder of a preparation: shards filled in order, and a manifest that makes it resumable.

Documents are numbered in the order the source yields them. Each stream of shards (the
train and validation documents of OpenWebText, or the single stream of FineWeb-Edu whose
first shard is the validation split) is filled sequentially, a document running over
into the next shard when one fills up. Every shard is written to a temporary name and
renamed when whole, and the manifest then records it with its token count, SHA-256 and
the cursors (document index, token offset into that document) where it starts and ends.
A rerun with the same settings keeps the recorded shards whose files still match, and
tokenizes again from the end cursor of the last one in each stream.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mars_m_exp.data.shards import (
    HEADER_INTS,
    MANIFEST_NAME,
    SHARD_MAGIC,
    SHARD_VERSION,
    TOKEN_DTYPE,
    ShardError,
    file_sha256,
    read_header,
    write_atomic,
    write_shard,
)

log = logging.getLogger(__name__)

# Bump when the preparation changes what it writes, so folders from an older version are
# not resumed with different output.
PREPARATION_VERSION = 1

SHARD_FORMAT = {
    "header": f"{HEADER_INTS} little-endian int32: magic {SHARD_MAGIC}, version {SHARD_VERSION}, token count, zeros",
    "tokens": "little-endian uint16",
    "compatible_with": "llm.c and modded-nanogpt .bin shards",
}


class PreparationError(RuntimeError):
    """The output folder or the prepared corpus cannot be used as asked."""


@dataclass
class StreamState:
    """Progress of one stream of shards: its recorded shards and the cursor after the last one."""

    name: str
    records: list[dict] = field(default_factory=list)

    @property
    def cursor(self) -> tuple[int, int]:
        """(document index, tokens of that document already written) where the stream continues."""
        if not self.records:
            return (0, 0)
        end = self.records[-1]["end"]
        return (int(end[0]), int(end[1]))

    @property
    def next_index(self) -> int:
        return len(self.records)


def _shard_file_pattern(corpus: str) -> re.Pattern:
    return re.compile(rf"{re.escape(corpus)}_(train|val)_\d{{6}}\.bin")


class ShardFolder:
    """The manifest and shards of one preparation, opened for resuming or starting afresh."""

    def __init__(self, out_dir: Path, corpus: str, fingerprint: dict, source_commit: str | None, streams: list[str]):
        self.out_dir = out_dir
        self.corpus = corpus
        self.fingerprint = fingerprint
        self.source_commit = source_commit
        self.streams = {name: StreamState(name) for name in streams}
        self.complete = False
        self.totals: dict = {}
        self.reused_shards = 0

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, out_dir: str | Path, corpus: str, fingerprint: dict, source_commit: str | None, streams: list[str]) -> "ShardFolder":
        """Open `out_dir`, keeping the recorded shards that are still valid and deleting leftovers."""
        folder = cls(Path(out_dir), corpus, fingerprint, source_commit, streams)
        if not folder.out_dir.is_dir():
            return folder  # created when the first shard is written
        manifest_path = folder.out_dir / MANIFEST_NAME

        if manifest_path.exists():
            folder._resume(json.loads(manifest_path.read_text()))
            if not folder.complete:
                # Mark the folder unfinished at once, so no run trains on it meanwhile.
                folder.save()
        elif any(folder.out_dir.glob("*.bin")):
            raise PreparationError(
                f"{folder.out_dir} contains .bin files but no {MANIFEST_NAME}, so they were not written by this "
                "preparation; choose an empty folder with --out"
            )
        folder._delete_leftovers()
        return folder

    def _resume(self, manifest: dict) -> None:
        if manifest.get("fingerprint") != self.fingerprint:
            raise PreparationError(
                f"{self.out_dir} contains a corpus prepared from another source or with other settings "
                f"(its {MANIFEST_NAME} differs in {_differing_keys(manifest.get('fingerprint'), self.fingerprint)}); "
                "use the same options to resume it, or choose another folder with --out"
            )
        recorded_commit = manifest.get("source_commit")
        if recorded_commit and self.source_commit and recorded_commit != self.source_commit:
            raise PreparationError(
                f"the hub dataset changed since {self.out_dir} was started (commit {recorded_commit}, now "
                f"{self.source_commit}); pass --revision {recorded_commit} to finish with the same data, or "
                "choose another folder with --out"
            )
        self.source_commit = self.source_commit or recorded_commit

        records = manifest.get("shards", [])
        log.info("checking %d shard(s) recorded in %s", len(records), self.out_dir / MANIFEST_NAME)
        valid_so_far = {name: True for name in self.streams}
        for record in records:
            stream = record["stream"]
            if not valid_so_far[stream]:
                continue
            problem = self._check_recorded(record)
            if problem:
                log.warning("%s: %s; it and the later shards of its stream will be written again", record["file"], problem)
                valid_so_far[stream] = False
                continue
            self.streams[stream].records.append(record)
        self.reused_shards = sum(len(s.records) for s in self.streams.values())

        self.complete = bool(manifest.get("complete")) and all(valid_so_far.values())
        if self.complete:
            self.totals = {key: manifest[key] for key in ("documents", "tokens")}

    def _check_recorded(self, record: dict) -> str | None:
        path = self.out_dir / record["file"]
        if not path.exists():
            return "missing"
        try:
            num_tokens = read_header(path)
        except ShardError as exc:
            return str(exc)
        if num_tokens != record["tokens"]:
            return f"contains {num_tokens} tokens, the manifest records {record['tokens']}"
        if file_sha256(path) != record["sha256"]:
            return "its SHA-256 differs from the manifest's"
        return None

    def _delete_leftovers(self) -> None:
        """Delete temporary files of a killed run and shards the manifest does not (or no longer) record."""
        recorded_files = {r["file"] for s in self.streams.values() for r in s.records}
        pattern = _shard_file_pattern(self.corpus)
        for path in self.out_dir.iterdir():
            is_temporary = path.name.startswith(".") and path.name.endswith(".tmp")
            is_stale_shard = pattern.fullmatch(path.name) is not None and path.name not in recorded_files
            if path.is_file() and (is_temporary or is_stale_shard):
                log.info("deleting %s, left by an interrupted run", path.name)
                path.unlink()

    # ------------------------------------------------------------------ writing

    def write(self, stream: str, split: str, tokens: np.ndarray, start: tuple[int, int], end: tuple[int, int]) -> None:
        """Write the next shard of `stream` and record it in the manifest."""
        state = self.streams[stream]
        name = f"{self.corpus}_{split}_{state.next_index:06d}.bin"
        sha256 = write_shard(self.out_dir / name, tokens)
        state.records.append(
            {
                "file": name,
                "split": split,
                "stream": stream,
                "tokens": int(tokens.size),
                "sha256": sha256,
                "start": list(start),
                "end": list(end),
            }
        )
        self.save()

    def finish(self, documents: int) -> dict:
        """Mark the preparation complete and return the token count per split."""
        tokens = {"train": 0, "val": 0}
        for record in self.records():
            tokens[record["split"]] += record["tokens"]
        if tokens["val"] == 0:
            raise PreparationError(
                f"the validation split is empty: the corpus has {documents} documents; check the source"
            )
        if tokens["train"] == 0:
            raise PreparationError(
                f"no training tokens: all {tokens['val']} tokens of the corpus went to the validation split; "
                "lower --shard-size below the corpus size, or prepare a larger corpus"
            )
        self.complete = True
        self.totals = {"documents": documents, "tokens": tokens}
        self.save()
        return tokens

    def records(self) -> list[dict]:
        """Return the recorded shards, validation first, each split in file order."""
        everything = [r for s in self.streams.values() for r in s.records]
        return sorted(everything, key=lambda r: (r["split"] != "val", r["file"]))

    def save(self) -> None:
        manifest = {
            "format": SHARD_FORMAT,
            "fingerprint": self.fingerprint,
            "source_commit": self.source_commit,
            "complete": self.complete,
            **self.totals,
            "shards": self.records(),
        }
        write_atomic(self.out_dir / MANIFEST_NAME, [json.dumps(manifest, indent=2).encode()])


class ShardBuffer:
    """Fill the shards of one stream with documents' tokens, writing each shard when it is full."""

    def __init__(self, folder: ShardFolder, stream: str, shard_size: int, split_of_index) -> None:
        self.folder = folder
        self.stream = stream
        self.state = folder.streams[stream]
        self.shard_size = shard_size
        # Maps a shard's index in the stream to its split, "train" or "val".
        self.split_of_index = split_of_index
        self.buffer = np.empty(shard_size, dtype=TOKEN_DTYPE)
        self.fill = 0
        # Documents before the resume cursor are already in recorded shards; so are the
        # first `resume_offset` tokens of the document at the cursor.
        self.resume_doc, self.resume_offset = self.state.cursor
        self.start = self.state.cursor

    def needs(self, doc_index: int) -> bool:
        return doc_index >= self.resume_doc

    def add(self, doc_index: int, tokens: np.ndarray) -> None:
        position = self.resume_offset if doc_index == self.resume_doc else 0
        while position < len(tokens):
            take = min(self.shard_size - self.fill, len(tokens) - position)
            self.buffer[self.fill : self.fill + take] = tokens[position : position + take]
            self.fill += take
            position += take
            if self.fill == self.shard_size:
                end = (doc_index, position) if position < len(tokens) else (doc_index + 1, 0)
                self._write(end)

    def flush(self, documents: int) -> None:
        """Write the last, partial shard once all `documents` have been added."""
        if self.fill:
            self._write((documents, 0))

    def _write(self, end: tuple[int, int]) -> None:
        split = self.split_of_index(self.state.next_index)
        self.folder.write(self.stream, split, self.buffer[: self.fill], self.start, end)
        self.start = end
        self.fill = 0


def _differing_keys(old: dict | None, new: dict) -> str:
    if not isinstance(old, dict):
        return "everything (no fingerprint)"
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(keys) or "nothing"
