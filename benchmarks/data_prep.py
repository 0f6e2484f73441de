"""Measure data_prep's tokenize-and-write throughput with 1 and 2 worker processes.

The corpus is generated locally, so no network is needed: the topics of Python's bundled
reference documentation (`pydoc_data.topics`, English prose and code), each split into
paragraphs and reassembled in a seeded random order into documents, written as parquet.
It runs through the same `datasets` path and writer as OpenWebText and FineWeb-Edu.

    python benchmarks/data_prep.py [--documents 20000] [--num-proc 1 2]

Reported per worker count: tokens written, tokens/s of the tokenize-and-write phase
(worker start-up included, the one-off parquet conversion excluded), total wall time, and
whether the output matches the first run byte for byte.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_prep.prepare import prepare_corpus  # noqa: E402
from data_prep.sources import CORPORA, local_source  # noqa: E402

SHARED_TIKTOKEN_CACHE = Path(__file__).resolve().parent.parent.parent / "shared" / "tiktoken_cache"


def write_corpus(folder: Path, documents: int, seed: int = 0) -> None:
    """Write `documents` documents of 5 to 40 paragraphs drawn from pydoc_data.topics, as 4 parquet files."""
    from pydoc_data.topics import topics

    paragraphs = [p for key in sorted(topics) for p in topics[key].split("\n\n") if p.strip()]
    rng = random.Random(seed)
    texts = ["\n\n".join(rng.choices(paragraphs, k=rng.randint(5, 40))) for _ in range(documents)]
    per_file = -(-documents // 4)
    for part in range(4):
        chunk = texts[part * per_file : (part + 1) * per_file]
        pq.write_table(pa.table({"text": chunk}), folder / f"part-{part}.parquet")


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--documents", type=int, default=20_000, help="documents to generate (default: 20000)")
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1, 2], help="worker counts to measure (default: 1 2)")
    parser.add_argument("--shard-size", type=int, default=10_000_000, help="tokens per shard (default: 10,000,000)")
    args = parser.parse_args()
    if "TIKTOKEN_CACHE_DIR" not in os.environ and SHARED_TIKTOKEN_CACHE.is_dir():
        os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED_TIKTOKEN_CACHE)

    with tempfile.TemporaryDirectory(prefix="data_prep_bench_") as tmp:
        tmp = Path(tmp)
        (tmp / "source").mkdir()
        write_corpus(tmp / "source", args.documents)
        source = local_source(tmp / "source")
        print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, {args.documents} documents")
        print("| workers | tokens | tokens/s (tokenize + write) | wall s | same bytes as first run |")
        print("|--------:|-------:|----------------------------:|-------:|:------------------------|")

        reference = None
        for num_proc in args.num_proc:
            out = tmp / f"out_{num_proc}"
            summary = prepare_corpus(
                CORPORA["fineweb_edu"],
                source,
                out,
                shard_size=args.shard_size,
                num_proc=num_proc,
                cache_dir=str(tmp / "hf_cache"),
                progress=False,
            )
            output = folder_bytes(out)
            reference = reference or output
            print(
                f"| {num_proc} | {summary.tokens_tokenized:,} | {summary.tokens_per_s:,.0f} | "
                f"{summary.elapsed_s:.1f} | {'yes' if output == reference else 'NO'} |"
            )


if __name__ == "__main__":
    main()
