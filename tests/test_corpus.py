"""The embedded corpus, its token shards, and the window samplers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mars_m_exp.data import prepare_data
from mars_m_exp.data.embedded import SPLIT_CHUNK_TOKENS, CorpusError, prepare_embedded
from mars_m_exp.data.loader import RandomWindowSampler, TokenWindows, ValidationWindows, find_shards
from mars_m_exp.data.shards import ShardError, open_shard, write_shard
from mars_m_exp.data.tokenizer import EOT_TOKEN, gpt2_encoding


@pytest.fixture(scope="module")
def pydoc_shards(tmp_path_factory):
    return prepare_embedded(tmp_path_factory.mktemp("pydoc"))


def test_embedded_corpus_written_as_shards(pydoc_shards):
    manifest = json.loads((pydoc_shards / "manifest.json").read_text())
    train = open_shard(pydoc_shards / "embedded_train_000000.bin")
    val = open_shard(pydoc_shards / "embedded_val_000000.bin")

    assert manifest["fingerprint"]["source"]["kind"] == "pydoc_data.topics"
    assert manifest["shards"]["embedded_train_000000.bin"] == len(train)
    assert manifest["shards"]["embedded_val_000000.bin"] == len(val)
    assert len(train) > 100_000
    assert len(val) > 5_000
    assert train[0] == EOT_TOKEN
    assert int(train.max()) < 50257


def test_embedded_corpus_decodes_to_python_docs(pydoc_shards):
    from pydoc_data.topics import topics

    train = np.asarray(open_shard(pydoc_shards / "embedded_train_000000.bin"))
    val = np.asarray(open_shard(pydoc_shards / "embedded_val_000000.bin"))
    text = gpt2_encoding().decode(train.tolist()) + gpt2_encoding().decode(val.tolist())

    for key in sorted(topics)[:5]:
        assert topics[key][:200] in text


def test_embedded_corpus_reused_on_second_call(pydoc_shards):
    shard = pydoc_shards / "embedded_train_000000.bin"
    before = shard.stat().st_mtime_ns
    prepare_embedded(pydoc_shards)
    assert shard.stat().st_mtime_ns == before


def test_embedded_folder_of_other_source_rejected(pydoc_shards, tmp_path):
    (tmp_path / "a.txt").write_text("some text " * 5000)
    with pytest.raises(CorpusError, match="another source"):
        prepare_embedded(pydoc_shards, text_path=str(tmp_path), val_fraction=0.5)


def test_text_folder_split_into_chunks(tmp_path):
    texts = tmp_path / "texts"
    texts.mkdir()
    documents = [f"Document {i}: " + " ".join(f"word{j}" for j in range(700)) for i in range(3)]
    (texts / "one.txt").write_text(documents[0])
    (texts / "two.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents[1:]))

    out = prepare_embedded(tmp_path / "shards", text_path=str(texts), val_fraction=0.5)

    stream = [t for d in documents for t in [EOT_TOKEN] + gpt2_encoding().encode_ordinary(d)]
    val_tokens = open_shard(out / "embedded_val_000000.bin").tolist()
    train_tokens = open_shard(out / "embedded_train_000000.bin").tolist()
    chunks = [stream[i : i + SPLIT_CHUNK_TOKENS] for i in range(0, len(stream), SPLIT_CHUNK_TOKENS)]
    assert len(chunks) >= 4
    # With val_fraction 0.5, every second chunk is held out.
    assert val_tokens == [t for chunk in chunks[1::2] for t in chunk]
    assert train_tokens == [t for chunk in chunks[0::2] for t in chunk]


def test_text_too_short_for_validation_chunk(tmp_path):
    (tmp_path / "a.txt").write_text("A short document.")
    with pytest.raises(CorpusError, match="too few to hold out"):
        prepare_embedded(tmp_path / "out", text_path=str(tmp_path))


def test_jsonl_without_text_field_names_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(CorpusError, match=r'bad.jsonl:2 has no string field "text"'):
        prepare_embedded(tmp_path / "out", text_path=str(tmp_path))


def test_missing_text_path_rejected(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        prepare_embedded(tmp_path / "out", text_path=str(tmp_path / "nowhere"))


def test_block_size_beyond_data_names_file_and_sizes(tmp_path):
    write_shard(tmp_path / "tiny_train_000000.bin", np.arange(100, dtype=np.uint16))
    with pytest.raises(ShardError, match=r"tiny_train_000000.bin has 100 tokens, fewer than model.block_size \+ 1 = 129"):
        TokenWindows(find_shards(tmp_path, "train"), block_size=128)


def make_windows(tmp_path, lengths=(300, 500)) -> TokenWindows:
    for i, length in enumerate(lengths):
        write_shard(tmp_path / f"x_train_{i:06d}.bin", (np.arange(length) + 1000 * i).astype(np.uint16))
    return TokenWindows(find_shards(tmp_path, "train"), block_size=16)


def test_windows_are_contiguous_slices(tmp_path):
    windows = make_windows(tmp_path)
    batch = windows.gather(np.array([0, 283, 284, 284 + 483]))

    assert batch.shape == (4, 17)
    assert batch[0].tolist() == list(range(0, 17))
    assert batch[1].tolist() == list(range(283, 300))
    assert batch[2].tolist() == list(range(1000, 1017))
    assert batch[3].tolist() == list(range(1483, 1500))


def test_global_batch_identical_across_world_sizes(tmp_path):
    sampler = RandomWindowSampler(make_windows(tmp_path), global_batch_size=8, seed=3)

    single = torch.cat([sampler.micro_batch(5, m, 2, rank=0, world_size=1)[0] for m in range(4)])
    two_ranks = torch.cat([sampler.micro_batch(5, m, 2, rank=r, world_size=2)[0] for r in range(2) for m in range(2)])

    assert torch.equal(single, two_ranks)


def test_sampler_steps_differ_and_repeat(tmp_path):
    sampler = RandomWindowSampler(make_windows(tmp_path), global_batch_size=4, seed=0)
    first = sampler.micro_batch(0, 0, 4)[0]
    second = sampler.micro_batch(1, 0, 4)[0]
    again = RandomWindowSampler(sampler.windows, 4, seed=0).micro_batch(0, 0, 4)[0]

    assert not torch.equal(first, second)
    assert torch.equal(first, again)
    assert sampler.state_dict()["position"] == 2


def test_validation_windows_fixed_and_split_across_ranks(tmp_path):
    windows = make_windows(tmp_path)
    val = ValidationWindows(windows, num_batches=4, micro_batch_size=2)

    everything = [x for x, _ in val.batches()]
    rank0 = [x for x, _ in val.batches(0, 2)]
    rank1 = [x for x, _ in val.batches(1, 2)]

    assert len(everything) == 4
    assert all(torch.equal(a, b) for a, b in zip(everything, [x for x, _ in val.batches()]))
    assert torch.equal(rank0[0], everything[0])
    assert torch.equal(rank1[0], everything[1])
    assert torch.equal(rank0[1], everything[2])


def test_relative_data_path_resolves_against_launch_dir(tmp_path):
    from mars_m_exp.config import DataConfig

    shard_dir = tmp_path / "shards"
    write_shard(shard_dir / "a_train_000000.bin", np.arange(50, dtype=np.uint16))
    path = prepare_data(DataConfig(name="shards", path="shards"), launch_dir=tmp_path)
    assert path == shard_dir
