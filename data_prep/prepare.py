"""`python -m data_prep.prepare openwebtext|fineweb_edu`: tokenize a corpus into GPT-2 token shards.

Documents are read in the source's order, tokenized by `--num-proc` worker processes as
[EOT 50256] + encode_ordinary(text) (the end-of-text token is prepended to every document,
as llm.c does), and written as llm.c-format shards of `--shard-size` tokens next to a
manifest.json. The output does not depend on the number of workers, and rerunning the
same command after a crash resumes after the last complete shard.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from tqdm import tqdm

from data_prep.parallel import encode_batch, ordered_map
from data_prep.shard_folder import PREPARATION_VERSION, PreparationError, ShardBuffer, ShardFolder
from data_prep.sources import (
    CORPORA,
    Corpus,
    Source,
    SourceUnavailableError,
    count_documents,
    hub_source,
    iter_text_batches,
    load_documents,
    local_source,
    resolve_hub_commit,
)
from mars_m_exp.data.shards import ShardError
from mars_m_exp.data.tokenizer import EOT_TOKEN, TokenizerUnavailableError, gpt2_encoding

log = logging.getLogger("data_prep")

# 10^8 tokens (200 MB) per shard, the size llm.c's and modded-nanogpt's FineWeb scripts write.
DEFAULT_SHARD_SIZE = 100_000_000
# The shard header stores the token count as an int32.
MAX_SHARD_SIZE = 2**31 - 1
# Documents per tokenization task: large enough that inter-process overhead is small,
# small enough that `2 * num_proc` tasks in flight fit in memory.
BATCH_DOCUMENTS = 1024

TOKENIZER = {
    "library": "tiktoken",
    "encoding": "gpt2",
    "method": "encode_ordinary",
    "eot_token": EOT_TOKEN,
    "eot_position": "before every document",
}


@dataclass
class PreparationSummary:
    out_dir: Path
    documents: int
    tokens: dict
    shards: int
    shards_written: int
    shards_reused: int
    documents_tokenized: int
    tokens_tokenized: int
    # Wall time of the whole call, and of its tokenize-and-write phase (worker start-up
    # included, dataset download and conversion excluded).
    elapsed_s: float
    tokenize_s: float

    @property
    def tokens_per_s(self) -> float:
        """Tokens tokenized and written per second of the tokenize-and-write phase."""
        return self.tokens_tokenized / self.tokenize_s if self.tokenize_s > 0 else 0.0


@dataclass(frozen=True)
class SplitRule:
    """Division of the documents into streams of shards, and the split of each shard."""

    streams: tuple[str, ...]
    stream_of_document: Callable[[int], str]
    split_of_shard: Callable[[str, int], str]
    description: dict


def split_rule(val_every: int | None) -> SplitRule:
    """Hold out every `val_every`-th document (0, n, 2n, ...), or with None make the first shard the validation split."""
    if val_every is None:
        return SplitRule(
            streams=("all",),
            stream_of_document=lambda doc: "all",
            split_of_shard=lambda stream, index: "val" if index == 0 else "train",
            description={"rule": "first_shard"},
        )
    return SplitRule(
        streams=("val", "train"),
        stream_of_document=lambda doc: "val" if doc % val_every == 0 else "train",
        split_of_shard=lambda stream, index: stream,
        description={"rule": "every_nth_document", "every": val_every},
    )


def prepare_corpus(
    corpus: Corpus,
    source: Source,
    out_dir: str | os.PathLike,
    shard_size: int = DEFAULT_SHARD_SIZE,
    val_every: int | None = None,
    num_proc: int = 1,
    streaming: bool = False,
    cache_dir: str | None = None,
    progress: bool = True,
) -> PreparationSummary:
    """Tokenize `source` into shards in `out_dir`, resuming a preparation that was interrupted there."""
    if not 0 < shard_size <= MAX_SHARD_SIZE:
        raise PreparationError(f"--shard-size must be in [1, {MAX_SHARD_SIZE}] tokens, got {shard_size}")
    if val_every is not None and val_every < 2:
        raise PreparationError(f"--val-every must be at least 2, got {val_every}")
    started = time.perf_counter()
    out_dir = Path(out_dir)

    # Both fail within seconds when the machine is offline and nothing is cached.
    gpt2_encoding()
    source_commit = resolve_hub_commit(source)

    rule = split_rule(val_every)
    fingerprint = preparation_fingerprint(corpus, source, shard_size, rule)
    folder = ShardFolder.open(out_dir, corpus.name, fingerprint, source_commit, list(rule.streams))
    if folder.complete:
        log.info("%s is already complete; nothing to do", out_dir)
        return _summary(folder, 0, 0, started, 0.0)
    if folder.reused_shards:
        log.info("resuming: %d shard(s) already written are kept", folder.reused_shards)

    dataset = load_documents(source, streaming, num_proc, cache_dir, source_commit)
    total_documents = count_documents(dataset)
    if corpus.expected_documents and source.on_hub and total_documents not in (None, corpus.expected_documents):
        log.warning(
            "%s has %d documents, but the full corpus has %d; this copy is partial or a different version",
            source.path,
            total_documents,
            corpus.expected_documents,
        )

    buffers = {
        stream: ShardBuffer(folder, stream, shard_size, lambda index, stream=stream: rule.split_of_shard(stream, index))
        for stream in rule.streams
    }
    first_document = min(buffer.resume_doc for buffer in buffers.values())
    docs_bar = tqdm(total=total_documents, initial=first_document, unit="doc", desc="documents", disable=not progress, position=0)
    tokens_bar = tqdm(unit="tok", unit_scale=True, desc="tokens", disable=not progress, position=1)
    reader = _DocumentReader(dataset, source.text_field, first_document, buffers, rule, docs_bar)

    tokenize_started = time.perf_counter()
    try:
        documents_tokenized, tokens_tokenized = _tokenize_into_shards(reader, buffers, rule, num_proc, tokens_bar)
    finally:
        docs_bar.close()
        tokens_bar.close()

    documents = reader.documents_read
    if documents == 0:
        raise PreparationError(f"{source.path} yielded no documents; check --source or the hub dataset")
    for stream in rule.streams:
        buffers[stream].flush(documents)
    folder.finish(documents)
    tokenize_s = time.perf_counter() - tokenize_started
    return _summary(folder, documents_tokenized, tokens_tokenized, started, tokenize_s)


def preparation_fingerprint(corpus: Corpus, source: Source, shard_size: int, rule: SplitRule) -> dict:
    """Return the settings that determine the output; a folder resumes only under the same ones."""
    return {
        "preparation_version": PREPARATION_VERSION,
        "corpus": corpus.name,
        "source": source.describe(),
        "tokenizer": TOKENIZER,
        "shard_size": shard_size,
        "validation": rule.description,
    }


def _tokenize_into_shards(reader: "_DocumentReader", buffers: dict, rule: SplitRule, num_proc: int, tokens_bar: tqdm) -> tuple[int, int]:
    """Tokenize the reader's documents in order into their streams' shards; return (documents, tokens) tokenized."""
    documents_tokenized = tokens_tokenized = 0
    for numbers, tokens, lengths in ordered_map(encode_batch, reader.batches(), num_proc):
        position = 0
        for number, length in zip(numbers, lengths):
            buffers[rule.stream_of_document(number)].add(number, tokens[position : position + length])
            position += length
        documents_tokenized += len(numbers)
        tokens_tokenized += len(tokens)
        tokens_bar.update(len(tokens))
    return documents_tokenized, tokens_tokenized


class _DocumentReader:
    """Read numbered document batches, keeping only the documents not yet in a recorded shard."""

    def __init__(self, dataset, text_field: str, first_document: int, buffers: dict, rule: SplitRule, docs_bar: tqdm):
        self.dataset = dataset
        self.text_field = text_field
        self.first_document = first_document
        self.buffers = buffers
        self.rule = rule
        self.docs_bar = docs_bar
        self.documents_read = first_document

    def batches(self) -> Iterator[tuple[list[int], list[str]]]:
        for texts in iter_text_batches(self.dataset, self.text_field, self.first_document, BATCH_DOCUMENTS):
            numbers, texts_to_encode = [], []
            for number, text in enumerate(texts, start=self.documents_read):
                if not self.buffers[self.rule.stream_of_document(number)].needs(number):
                    continue
                if text is None:
                    raise SourceUnavailableError(f"document {number} has no text (its {self.text_field!r} is null)")
                numbers.append(number)
                texts_to_encode.append(text)
            self.documents_read += len(texts)
            self.docs_bar.update(len(texts))
            yield numbers, texts_to_encode


def _summary(
    folder: ShardFolder, documents_tokenized: int, tokens_tokenized: int, started: float, tokenize_s: float
) -> PreparationSummary:
    records = folder.records()
    return PreparationSummary(
        out_dir=folder.out_dir,
        documents=folder.totals["documents"],
        tokens=folder.totals["tokens"],
        shards=len(records),
        shards_written=len(records) - folder.reused_shards,
        shards_reused=folder.reused_shards,
        documents_tokenized=documents_tokenized,
        tokens_tokenized=tokens_tokenized,
        elapsed_s=time.perf_counter() - started,
        tokenize_s=tokenize_s,
    )


# ---------------------------------------------------------------------- command line


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no CPU affinity call
        return os.cpu_count() or 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.prepare",
        description="Tokenize OpenWebText or FineWeb-Edu with GPT-2's BPE into llm.c-format token shards "
        "plus a manifest.json; rerun the same command to resume an interrupted preparation.",
    )
    parser.add_argument("corpus", choices=sorted(CORPORA), help="the corpus to prepare")
    parser.add_argument("--out", help="output folder (default: data/<corpus>, relative to the current directory)")
    parser.add_argument(
        "--sample",
        help="fineweb_edu only: the hub config to read, such as sample-10BT, sample-100BT (default) or sample-350BT",
    )
    parser.add_argument(
        "--source",
        help="a local .parquet/.jsonl file or folder of them to read instead of the hub dataset (sorted by path)",
    )
    parser.add_argument("--revision", help="hub branch, tag or commit to read (default: main)")
    parser.add_argument("--text-field", default="text", help="column that contains the document text (default: text)")
    parser.add_argument(
        "--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help=f"tokens per shard (default: {DEFAULT_SHARD_SIZE:,})"
    )
    parser.add_argument(
        "--val-every",
        type=int,
        help="hold out documents 0, N, 2N, ... for validation (default: 2000 for openwebtext, 0.05%% of the "
        "documents; fineweb_edu makes its first shard the validation split)",
    )
    parser.add_argument(
        "--num-proc", type=int, default=available_cpus(), help="tokenizer processes (default: the CPUs available, %(default)s)"
    )
    parser.add_argument(
        "--streaming",
        action="store_true",
        help="read the hub files as they download instead of converting them into the datasets cache first; "
        "uses no cache disk space, but a resumed run reads the stream again from its start",
    )
    parser.add_argument("--cache-dir", help="datasets cache folder (default: HF_DATASETS_CACHE)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def source_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace, corpus: Corpus) -> Source:
    if args.sample and corpus.default_config is None:
        parser.error(f"--sample applies to fineweb_edu only, not {corpus.name}")
    if args.source:
        if args.sample or args.revision:
            parser.error("--source reads local files, so --sample and --revision do not apply")
        return local_source(args.source, args.text_field)
    return hub_source(corpus, args.sample, args.revision, args.text_field)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    corpus = CORPORA[args.corpus]
    out_dir = Path(args.out or Path("data") / corpus.name)
    val_every = args.val_every if args.val_every is not None else corpus.val_every

    try:
        source = source_from_args(parser, args, corpus)
        log.info("preparing %s from %s into %s with %d process(es)", corpus.description, source.path, out_dir, args.num_proc)
        summary = prepare_corpus(
            corpus,
            source,
            out_dir,
            shard_size=args.shard_size,
            val_every=val_every,
            num_proc=args.num_proc,
            streaming=args.streaming,
            cache_dir=args.cache_dir,
            progress=not args.no_progress,
        )
    except (PreparationError, SourceUnavailableError, TokenizerUnavailableError, ShardError) as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted; the complete shards are kept, so rerun the same command to resume")
        return 130

    log.info(
        "prepared %s: %d documents, %d train and %d validation tokens in %d shards (%d written, %d kept from "
        "an earlier run); tokenized %d documents, %d tokens at %.0f tokens/s; %.1f s in all",
        summary.out_dir,
        summary.documents,
        summary.tokens["train"],
        summary.tokens["val"],
        summary.shards,
        summary.shards_written,
        summary.shards_reused,
        summary.documents_tokenized,
        summary.tokens_tokenized,
        summary.tokens_per_s,
        summary.elapsed_s,
    )
    log.info("train on it with: python -m mars_m_exp +model=<name> +optim=<name> data=%s data.path=%s", corpus.name, summary.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
