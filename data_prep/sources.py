"""The corpora, and reading their documents through `datasets.load_dataset`.

A hub corpus is loaded by repository id, plus a config such as FineWeb-Edu's
"sample-100BT". Local parquet or jsonl files go through the packaged "parquet" / "json"
builders of the same function, so tests exercise the code path of the real corpora.
`datasets` 4 and later run no loading scripts, so a hub source must hold data files.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

# Seconds to wait for the hub's API before reporting the machine offline, instead of
# letting each download retry on its own.
HUB_PROBE_TIMEOUT_S = 15.0

LOCAL_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}


class SourceUnavailableError(RuntimeError):
    """The corpus cannot be read: offline without a cache, not found, or not loadable."""


@dataclass(frozen=True)
class Corpus:
    """A corpus that data_prep prepares, with its hub location and validation rule."""

    name: str
    hub_id: str
    default_config: str | None
    # Hold out documents 0, n, 2n, ... for validation; None makes the first shard the
    # validation split instead.
    val_every: int | None
    # Documents in the full corpus, to warn about partial copies; None when not fixed.
    expected_documents: int | None
    description: str


CORPORA = {
    "openwebtext": Corpus(
        name="openwebtext",
        hub_id="Skylion007/openwebtext",
        default_config=None,
        # nanoGPT holds out 0.05% of the documents (test_size=0.0005); here they are every
        # 2000th document, so a streamed read can pick them without a shuffle.
        val_every=2000,
        # The count nanoGPT's data/openwebtext/readme.md reports for the full corpus.
        expected_documents=8_013_769,
        description="OpenWebText, an open re-creation of GPT-2's WebText (about 9B GPT-2 tokens)",
    ),
    "fineweb_edu": Corpus(
        name="fineweb_edu",
        hub_id="HuggingFaceFW/fineweb-edu",
        default_config="sample-100BT",
        val_every=None,
        expected_documents=None,
        description="FineWeb-Edu, educational web pages filtered from FineWeb; samples sample-10BT, "
        "sample-100BT, sample-350BT",
    ),
}


@dataclass(frozen=True)
class Source:
    """The arguments of `datasets.load_dataset` that select a corpus's documents."""

    # A hub repository id, or the packaged builder ("parquet" or "json") for local files.
    path: str
    config: str | None = None
    revision: str | None = None
    # Local files, in the order their documents are read; empty for a hub dataset.
    data_files: tuple[str, ...] = ()
    text_field: str = "text"

    @property
    def on_hub(self) -> bool:
        return not self.data_files

    def describe(self) -> dict:
        """Return the identity of the source for the manifest: hub coordinates or file names and sizes."""
        if self.on_hub:
            return {"hub": self.path, "config": self.config, "revision": self.revision, "text_field": self.text_field}
        root = Path(os.path.commonpath(self.data_files))
        root = root if root.is_dir() else root.parent
        files = [{"file": Path(f).relative_to(root).as_posix(), "bytes": Path(f).stat().st_size} for f in self.data_files]
        return {"builder": self.path, "files": files, "text_field": self.text_field}


def hub_source(corpus: Corpus, config: str | None, revision: str | None, text_field: str) -> Source:
    return Source(path=corpus.hub_id, config=config or corpus.default_config, revision=revision, text_field=text_field)


def local_source(path: str | os.PathLike, text_field: str = "text") -> Source:
    """Return a source for a parquet or jsonl file, or a folder of them read in sorted path order."""
    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise SourceUnavailableError(f"--source {path} does not exist; point it at a folder of .parquet or .jsonl files")
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_BUILDERS and p.is_file())
    if not files:
        raise SourceUnavailableError(f"--source {path} contains no .parquet, .jsonl or .json files")

    builders = {LOCAL_BUILDERS.get(p.suffix) for p in files}
    if None in builders:
        raise SourceUnavailableError(f"--source {path} is not a .parquet, .jsonl or .json file")
    if len(builders) > 1:
        raise SourceUnavailableError(f"--source {path} mixes parquet and json files; keep one format per folder")
    return Source(path=builders.pop(), data_files=tuple(str(p) for p in files), text_field=text_field)


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _offline_message(source: Source, reason: str, cache_dir: str | None = None) -> str:
    fix = (
        "a datasets cache that already holds it (copied from a machine that ran the same command with network, "
        "without --streaming), or pass --source with a folder of the corpus's parquet or jsonl files"
    )
    if _hub_offline():
        import datasets

        cache = cache_dir or datasets.config.HF_DATASETS_CACHE
        return (
            f"HF_HUB_OFFLINE is set and the datasets cache {cache} does not hold {source.path} ({reason}); "
            f"point HF_DATASETS_CACHE or --cache-dir at {fix}"
        )
    return (
        f"cannot reach the Hugging Face hub for {source.path} ({reason}). Without network, set HF_HUB_OFFLINE=1 "
        f"and HF_DATASETS_CACHE to {fix}"
    )


def resolve_hub_commit(source: Source, timeout_s: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """Return the commit of a hub source's revision, failing within `timeout_s` when the hub is unreachable.

    Returns None for local sources and with HF_HUB_OFFLINE set, where `load_dataset` reads
    the datasets cache.
    """
    if not source.on_hub or _hub_offline():
        return None
    from huggingface_hub import HfApi
    from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = HfApi().dataset_info(source.path, revision=source.revision, timeout=timeout_s)
    except GatedRepoError as exc:
        raise SourceUnavailableError(f"{source.path} is gated on the hub; log in with `hf auth login` ({exc})") from exc
    except RevisionNotFoundError as exc:
        raise SourceUnavailableError(f"revision {source.revision!r} of {source.path} not found on the hub") from exc
    except RepositoryNotFoundError as exc:
        raise SourceUnavailableError(f"dataset {source.path} not found on the hub") from exc
    except Exception as exc:  # the HTTP client's connection, DNS and timeout errors differ between versions
        raise SourceUnavailableError(_offline_message(source, f"{type(exc).__name__}: {exc}")) from exc
    return info.sha


def load_documents(source: Source, streaming: bool, num_proc: int, cache_dir: str | None, commit: str | None = None):
    """Open the "train" split of `source` with only its text column.

    Without `streaming` the files are downloaded and converted into the datasets cache
    (by `num_proc` processes) before reading; with it they are read as they arrive. A
    hub `commit` pins the read to the commit that the manifest records.
    """
    import datasets

    if streaming and source.on_hub and _hub_offline():
        raise SourceUnavailableError(
            "--streaming reads from the network, but HF_HUB_OFFLINE is set; drop --streaming to read the "
            "dataset from HF_DATASETS_CACHE"
        )
    kwargs = {"split": "train", "streaming": streaming, "cache_dir": cache_dir}
    if not streaming:
        kwargs["num_proc"] = num_proc if num_proc > 1 else None
    if source.on_hub:
        kwargs.update(name=source.config, revision=commit or source.revision)
    else:
        kwargs.update(data_files=list(source.data_files))

    try:
        dataset = datasets.load_dataset(source.path, **kwargs)
    except ConnectionError as exc:
        raise SourceUnavailableError(_offline_message(source, str(exc), cache_dir)) from exc
    except RuntimeError as exc:
        if "scripts are no longer supported" not in str(exc):
            raise
        raise SourceUnavailableError(
            f"{source.path} at revision {source.revision or 'main'} still ships a loading script, which datasets "
            f">= 4 does not run ({exc}); pass --revision with a commit that holds parquet files, or download the "
            "corpus's parquet/jsonl files and pass --source with their folder"
        ) from exc

    columns = dataset.column_names  # None for a stream whose schema is not known yet
    if columns is not None and source.text_field not in columns:
        raise SourceUnavailableError(
            f"{source.path} has no column {source.text_field!r} (columns: {', '.join(columns)}); pass --text-field"
        )
    return dataset.select_columns([source.text_field])


def count_documents(dataset) -> int | None:
    """Return the number of documents of an opened dataset, or None when a stream does not declare it."""
    try:
        return len(dataset)
    except TypeError:
        pass
    splits = dataset.info.splits or {}
    split = splits.get("train")
    return split.num_examples if split is not None and split.num_examples else None


def iter_text_batches(dataset, text_field: str, start: int, batch_size: int) -> Iterator[list[str]]:
    """Yield the documents from index `start` on, as lists of at most `batch_size` texts."""
    if start:
        dataset = dataset.skip(start)
    for batch in dataset.iter(batch_size=batch_size):
        try:
            yield batch[text_field]
        except KeyError:
            raise SourceUnavailableError(
                f"the documents have no column {text_field!r} (columns: {', '.join(batch)}); pass --text-field"
            ) from None
