"""data_prep: local parquet/jsonl corpora through `datasets`, shards, manifest, resume, offline errors."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import data_prep.shard_folder as shard_folder_module
from data_prep.prepare import main as prepare_main
from data_prep.prepare import prepare_corpus
from data_prep.shard_folder import PreparationError
from data_prep.sources import CORPORA, SourceUnavailableError, hub_source, load_documents, local_source
from mars_m_exp.data import tokenizer
from mars_m_exp.data.shards import MANIFEST_NAME, file_sha256, open_shard, read_header
from mars_m_exp.data.tokenizer import EOT_TOKEN, TokenizerUnavailableError, gpt2_encoding

REPO_ROOT = Path(__file__).resolve().parent.parent
NUM_DOCUMENTS = 600
# The documents hold about 140k tokens, so this size gives 13 full train shards and a partial one.
SHARD_SIZE = 10_000

WORDS = (
    "the of and to in is was for on that with as by at from his her it an were are which this be or has had "
    "not but München naïve 数据 emoji🙂 <|endoftext|>"
).split()


def make_documents(count: int, seed: int = 0) -> list[str]:
    """Documents of 5 to 300 words with newlines, non-ASCII text and literal special-token syntax."""
    rng = random.Random(seed)
    documents = []
    for _ in range(count):
        words = [rng.choice(WORDS) for _ in range(rng.randint(5, 300))]
        documents.append(" ".join(words).replace(" was ", "\nwas "))
    return documents


@pytest.fixture(scope="module")
def documents() -> list[str]:
    return make_documents(NUM_DOCUMENTS)


@pytest.fixture(scope="module")
def parquet_folder(tmp_path_factory, documents) -> Path:
    """Three parquet files with an extra column, as the hub's corpora have."""
    folder = tmp_path_factory.mktemp("parquet_source")
    per_file = len(documents) // 3
    for part in range(3):
        texts = documents[part * per_file : (part + 1) * per_file]
        table = pa.table({"id": [f"doc-{part}-{i}" for i in range(len(texts))], "text": texts})
        pq.write_table(table, folder / f"part-{part:03d}.parquet", row_group_size=64)
    return folder


@pytest.fixture(scope="module")
def jsonl_folder(tmp_path_factory, documents) -> Path:
    folder = tmp_path_factory.mktemp("jsonl_source")
    half = len(documents) // 2
    for part, texts in enumerate([documents[:half], documents[half:]]):
        lines = [json.dumps({"text": text, "url": f"https://example.org/{i}"}) for i, text in enumerate(texts)]
        (folder / f"part-{part}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("hf_datasets_cache"))


def prepare(source_folder: Path, out: Path, hf_cache: str, corpus: str = "fineweb_edu", **options):
    options.setdefault("shard_size", SHARD_SIZE)
    options.setdefault("val_every", CORPORA[corpus].val_every)
    return prepare_corpus(
        CORPORA[corpus], local_source(source_folder), out, cache_dir=hf_cache, progress=False, **options
    )


@pytest.fixture(scope="module")
def fineweb_shards(tmp_path_factory, parquet_folder, hf_cache) -> Path:
    out = tmp_path_factory.mktemp("fineweb_shards") / "out"
    prepare(parquet_folder, out, hf_cache)
    return out


def read_manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST_NAME).read_text())


def split_tokens(folder: Path, split: str) -> np.ndarray:
    """Concatenate the tokens of one split's shards in the order the manifest lists them."""
    files = [r["file"] for r in read_manifest(folder)["shards"] if r["split"] == split]
    return np.concatenate([np.asarray(open_shard(folder / f)) for f in files])


def decode_documents(tokens: np.ndarray) -> list[str]:
    """Split a token stream at the EOT that precedes every document, and decode each document."""
    starts = np.flatnonzero(tokens == EOT_TOKEN)
    assert starts[0] == 0
    ends = list(starts[1:]) + [len(tokens)]
    return [gpt2_encoding().decode(tokens[s + 1 : e].tolist()) for s, e in zip(starts, ends)]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# --------------------------------------------------------------------------- output


def test_parquet_shards_decode_to_documents(fineweb_shards, documents):
    tokens = np.concatenate([split_tokens(fineweb_shards, "val"), split_tokens(fineweb_shards, "train")])

    assert decode_documents(tokens) == documents


def test_first_shard_is_validation_split(fineweb_shards):
    names = sorted(p.name for p in fineweb_shards.glob("*.bin"))

    assert names[-1] == "fineweb_edu_val_000000.bin"
    assert names[0] == "fineweb_edu_train_000001.bin"
    assert read_header(fineweb_shards / "fineweb_edu_val_000000.bin") == SHARD_SIZE
    assert all(read_header(fineweb_shards / n) == SHARD_SIZE for n in names[:-2])
    assert 0 < read_header(fineweb_shards / names[-2]) < SHARD_SIZE


def test_manifest_records_sizes_checksums_totals(fineweb_shards, parquet_folder, documents):
    manifest = read_manifest(fineweb_shards)
    records = manifest["shards"]

    assert manifest["complete"] is True
    assert manifest["documents"] == len(documents)
    assert manifest["fingerprint"]["tokenizer"]["eot_position"] == "before every document"
    assert manifest["fingerprint"]["source"]["files"] == [
        {"file": p.name, "bytes": p.stat().st_size} for p in sorted(parquet_folder.glob("*.parquet"))
    ]
    for record in records:
        assert read_header(fineweb_shards / record["file"]) == record["tokens"]
        assert file_sha256(fineweb_shards / record["file"]) == record["sha256"]
    assert manifest["tokens"]["val"] == SHARD_SIZE
    assert manifest["tokens"]["train"] == sum(r["tokens"] for r in records if r["split"] == "train")
    # The cursors chain: each shard starts where the previous one ended.
    assert records[0]["start"] == [0, 0]
    assert all(a["end"] == b["start"] for a, b in zip(records, records[1:]))
    assert records[-1]["end"] == [len(documents), 0]


def test_jsonl_source_writes_same_shards_as_parquet(tmp_path, fineweb_shards, jsonl_folder, hf_cache):
    prepare(jsonl_folder, tmp_path / "out", hf_cache)

    from_parquet = {r["file"]: r["sha256"] for r in read_manifest(fineweb_shards)["shards"]}
    from_jsonl = {r["file"]: r["sha256"] for r in read_manifest(tmp_path / "out")["shards"]}
    assert from_jsonl == from_parquet
    assert read_manifest(tmp_path / "out")["fingerprint"]["source"]["builder"] == "json"


def test_openwebtext_holds_out_every_nth_document(tmp_path, parquet_folder, documents, hf_cache):
    prepare(parquet_folder, tmp_path / "out", hf_cache, corpus="openwebtext", val_every=50)

    assert decode_documents(split_tokens(tmp_path / "out", "val")) == documents[::50]
    assert decode_documents(split_tokens(tmp_path / "out", "train")) == [d for i, d in enumerate(documents) if i % 50]
    assert (tmp_path / "out" / "openwebtext_val_000000.bin").exists()
    assert (tmp_path / "out" / "openwebtext_train_000000.bin").exists()


def test_num_proc_two_output_byte_identical(tmp_path, fineweb_shards, parquet_folder):
    # A separate datasets cache, so the parquet conversion also runs with two processes.
    prepare(parquet_folder, tmp_path / "out", str(tmp_path / "hf_cache"), num_proc=2)

    assert folder_bytes(tmp_path / "out") == folder_bytes(fineweb_shards)


def test_streaming_read_writes_same_shards(tmp_path, fineweb_shards, parquet_folder, hf_cache):
    prepare(parquet_folder, tmp_path / "out", hf_cache, streaming=True)

    assert folder_bytes(tmp_path / "out") == folder_bytes(fineweb_shards)


def test_hub_source_passes_config_and_commit(monkeypatch, documents):
    import datasets

    calls = []

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return datasets.Dataset.from_dict({"id": ["a", "b"], "text": documents[:2]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    source = hub_source(CORPORA["fineweb_edu"], "sample-10BT", None, "text")
    dataset = load_documents(source, streaming=False, num_proc=4, cache_dir="/cache", commit="abc123")

    assert calls == [
        (
            "HuggingFaceFW/fineweb-edu",
            {"split": "train", "streaming": False, "cache_dir": "/cache", "num_proc": 4, "name": "sample-10BT", "revision": "abc123"},
        )
    ]
    assert dataset.column_names == ["text"]
    assert hub_source(CORPORA["openwebtext"], None, None, "text").config is None
    assert hub_source(CORPORA["fineweb_edu"], None, None, "text").config == "sample-100BT"


def test_hub_loading_script_explained(monkeypatch):
    import datasets

    def script_only(path, **kwargs):
        raise RuntimeError("Dataset scripts are no longer supported, but found openwebtext.py")

    monkeypatch.setattr(datasets, "load_dataset", script_only)
    source = hub_source(CORPORA["openwebtext"], None, None, "text")
    with pytest.raises(SourceUnavailableError, match=r"at revision main still ships a loading script.*pass --revision"):
        load_documents(source, streaming=False, num_proc=1, cache_dir=None)


# --------------------------------------------------------------------------- resume


class SimulatedKill(BaseException):
    """Raised in place of SIGKILL: like a kill, no `except Exception` handler stops it."""


def kill_after_shards(monkeypatch, count: int) -> None:
    """Make the preparation die after `count` shards, leaving a half-written temporary file."""
    real_write_shard = shard_folder_module.write_shard
    written = []

    def write_then_die(path, tokens):
        if len(written) == count:
            (Path(path).parent / f".{Path(path).name}.123.abc.tmp").write_bytes(b"partial")
            raise SimulatedKill
        written.append(path)
        return real_write_shard(path, tokens)

    monkeypatch.setattr(shard_folder_module, "write_shard", write_then_die)


def test_resume_after_kill_matches_clean_run(tmp_path, monkeypatch, fineweb_shards, parquet_folder, hf_cache, documents):
    out = tmp_path / "out"
    kill_after_shards(monkeypatch, 4)
    with pytest.raises(SimulatedKill):
        prepare(parquet_folder, out, hf_cache)
    monkeypatch.undo()
    assert read_manifest(out)["complete"] is False
    assert len(read_manifest(out)["shards"]) == 4
    kept_inodes = {p.name: p.stat().st_ino for p in out.glob("*.bin")}

    summary = prepare(parquet_folder, out, hf_cache)

    assert folder_bytes(out) == folder_bytes(fineweb_shards)
    assert summary.shards_reused == 4
    assert summary.shards_written == summary.shards - 4
    assert 0 < summary.documents_tokenized < len(documents)
    assert {name: (out / name).stat().st_ino for name in kept_inodes} == kept_inodes


def test_resume_of_openwebtext_streams_matches_clean_run(tmp_path, monkeypatch, parquet_folder, hf_cache):
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    prepare(parquet_folder, clean, hf_cache, corpus="openwebtext", val_every=4)
    kill_after_shards(monkeypatch, 3)
    with pytest.raises(SimulatedKill):
        prepare(parquet_folder, resumed, hf_cache, corpus="openwebtext", val_every=4)
    monkeypatch.undo()

    prepare(parquet_folder, resumed, hf_cache, corpus="openwebtext", val_every=4)

    assert folder_bytes(resumed) == folder_bytes(clean)


def test_corrupted_shard_rewritten_on_rerun(tmp_path, fineweb_shards, parquet_folder, hf_cache):
    out = tmp_path / "out"
    prepare(parquet_folder, out, hf_cache)
    damaged = out / "fineweb_edu_train_000003.bin"
    data = bytearray(damaged.read_bytes())
    data[-2:] = b"\x00\x00"
    damaged.write_bytes(bytes(data))
    untouched_inode = (out / "fineweb_edu_train_000002.bin").stat().st_ino

    summary = prepare(parquet_folder, out, hf_cache)

    assert folder_bytes(out) == folder_bytes(fineweb_shards)
    assert summary.shards_reused == 3
    assert (out / "fineweb_edu_train_000002.bin").stat().st_ino == untouched_inode


def test_rerun_of_complete_folder_writes_nothing(tmp_path, parquet_folder, hf_cache):
    out = tmp_path / "out"
    prepare(parquet_folder, out, hf_cache)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    summary = prepare(parquet_folder, out, hf_cache)

    assert summary.shards_written == 0
    assert summary.tokens_tokenized == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_rerun_with_other_shard_size_rejected(tmp_path, parquet_folder, hf_cache):
    prepare(parquet_folder, tmp_path / "out", hf_cache)
    with pytest.raises(PreparationError, match=r"other settings \(its manifest.json differs in shard_size\)"):
        prepare(parquet_folder, tmp_path / "out", hf_cache, shard_size=SHARD_SIZE * 2)


def test_folder_with_foreign_shards_rejected(tmp_path, parquet_folder, hf_cache):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "fineweb_train_000001.bin").write_bytes(b"\x00" * 2048)
    with pytest.raises(PreparationError, match="contains .bin files but no manifest.json"):
        prepare(parquet_folder, tmp_path / "out", hf_cache)


# --------------------------------------------------------------------------- errors


def test_corpus_shorter_than_one_shard_rejected(tmp_path, parquet_folder, hf_cache):
    with pytest.raises(PreparationError, match=r"no training tokens: all \d+ tokens of the corpus went to the validation"):
        prepare(parquet_folder, tmp_path / "out", hf_cache, shard_size=10_000_000)


def test_missing_text_column_named(tmp_path, hf_cache):
    pq.write_table(pa.table({"content": ["a", "b"]}), tmp_path / "x.parquet")
    with pytest.raises(SourceUnavailableError, match=r"has no column 'text' \(columns: content\); pass --text-field"):
        prepare(tmp_path, tmp_path / "out", hf_cache)


def test_null_document_named(tmp_path, hf_cache):
    pq.write_table(pa.table({"text": ["fine", None, "also fine"]}), tmp_path / "x.parquet")
    with pytest.raises(SourceUnavailableError, match=r"document 1 has no text"):
        prepare(tmp_path, tmp_path / "out", hf_cache)


def test_source_folder_without_data_files_rejected(tmp_path):
    (tmp_path / "notes.txt").write_text("not a corpus")
    with pytest.raises(SourceUnavailableError, match="contains no .parquet, .jsonl or .json files"):
        local_source(tmp_path)


def run_prepare_cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh interpreter, so environment variables read at import time apply."""
    full_env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    full_env.update(HF_HOME=str(tmp_path / "hf_home"), PYTHONPATH=str(REPO_ROOT), **env)
    return subprocess.run(
        [sys.executable, "-m", "data_prep.prepare", *args, "--no-progress"],
        cwd=tmp_path,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_unreachable_hub_fails_fast_naming_variables(tmp_path):
    started = time.monotonic()
    # Port 9 (discard) on the loopback interface refuses connections: an offline hub
    # without touching the network.
    result = run_prepare_cli(tmp_path, "fineweb_edu", "--out", "out", HF_ENDPOINT="http://127.0.0.1:9")

    assert result.returncode == 2
    assert "cannot reach the Hugging Face hub for HuggingFaceFW/fineweb-edu" in result.stderr
    assert "HF_HUB_OFFLINE=1" in result.stderr
    assert "HF_DATASETS_CACHE" in result.stderr
    assert time.monotonic() - started < 60
    assert not (tmp_path / "out").exists()


def test_offline_mode_without_cache_fails_fast(tmp_path):
    empty_cache = tmp_path / "empty_cache"
    result = run_prepare_cli(
        tmp_path, "openwebtext", "--out", "out", HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(empty_cache)
    )

    assert result.returncode == 2
    assert f"HF_HUB_OFFLINE is set and the datasets cache {empty_cache} does not hold Skylion007/openwebtext" in result.stderr


def test_cli_prepares_local_source(tmp_path, parquet_folder, fineweb_shards):
    result = run_prepare_cli(
        tmp_path,
        "fineweb_edu",
        "--source",
        str(parquet_folder),
        "--out",
        "out",
        "--shard-size",
        str(SHARD_SIZE),
        "--num-proc",
        "1",
        "--cache-dir",
        str(tmp_path / "hf_cache"),
    )

    assert result.returncode == 0, result.stderr
    assert folder_bytes(tmp_path / "out") == folder_bytes(fineweb_shards)
    assert f"{NUM_DOCUMENTS} documents" in result.stderr
    assert "tokens/s" in result.stderr


def test_cli_sample_with_source_rejected(tmp_path, parquet_folder):
    with pytest.raises(SystemExit) as exit_info:
        prepare_main(["fineweb_edu", "--source", str(parquet_folder), "--sample", "sample-10BT"])
    assert exit_info.value.code == 2


def test_missing_bpe_files_fail_fast(tmp_path, monkeypatch):
    import requests

    def unreachable(url, **kwargs):
        raise requests.ConnectionError("no route to host")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(requests, "head", unreachable)
    with pytest.raises(TokenizerUnavailableError, match=f"not cached and not reachable: ConnectionError.*TIKTOKEN_CACHE_DIR is {tmp_path}"):
        tokenizer.check_bpe_files_available()


def test_cached_bpe_files_need_no_network(tmp_path, monkeypatch):
    import requests

    for url in tokenizer.GPT2_BPE_URLS:
        # tiktoken names a cached file by the SHA-1 of its URL.
        (tmp_path / hashlib.sha1(url.encode()).hexdigest()).write_bytes(b"cached")

    def fail_if_called(url, **kwargs):
        raise AssertionError(f"unexpected request to {url}")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(requests, "head", fail_if_called)
    tokenizer.check_bpe_files_available()
    assert tokenizer.missing_bpe_files() == []


# --------------------------------------------------------------------------- training


def test_training_runs_on_prepared_shards(tmp_path, fineweb_shards):
    shutil.copytree(fineweb_shards, tmp_path / "data" / "fineweb_edu")
    run_dir = tmp_path / "runs" / "fineweb"
    command = [
        sys.executable,
        "-m",
        "mars_m_exp",
        "+model=tiny",
        "+optim=mars_m",
        "+experiment=quickstart",
        "data=fineweb_edu",
        # Relative to the launch directory, even though Hydra changes into the run directory.
        "data.path=data/fineweb_edu",
        "hydra.job.chdir=true",
        "trainer.max_steps=3",
        "trainer.eval_interval=3",
        "trainer.eval_iters=2",
        "trainer.log_interval=1",
        "trainer.global_batch_size=4",
        "trainer.micro_batch_size=2",
        f"hydra.run.dir={run_dir}",
    ]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)

    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    manifest = read_manifest(fineweb_shards)
    train_shards = sum(r["split"] == "train" for r in manifest["shards"])
    expected_log = f"data fineweb_edu: {manifest['tokens']['train']} train tokens in {train_shards} shard(s), {SHARD_SIZE} validation tokens"
    assert expected_log in output
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "train"] == [1, 2, 3]
    assert [r["step"] for r in records if r["event"] == "eval"] == [0, 3]
