"""The shard loader: header checks, short and empty splits, nanoGPT files, sampler state, data.path."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from mars_m_exp.config import DataConfig
from mars_m_exp.data import build_data, prepare_data
from mars_m_exp.data.loader import RandomWindowSampler, TokenWindows, find_shards
from mars_m_exp.data.shards import HEADER_BYTES, MANIFEST_NAME, ShardError, open_shard, read_header, write_shard


def write_split(folder: Path, split: str, lengths: list[int], offset: int = 0) -> list[Path]:
    """Write shards of consecutive token ids, so a window's first token gives its position."""
    paths = []
    for index, length in enumerate(lengths):
        path = folder / f"corpus_{split}_{index:06d}.bin"
        write_shard(path, (np.arange(length) + offset + 10_000 * index).astype(np.uint16))
        paths.append(path)
    return paths


def build(folder: Path, block_size: int = 16, **overrides):
    options = dict(global_batch_size=8, eval_iters=2, micro_batch_size=2, seed=0)
    options.update(overrides)
    data_cfg = DataConfig(name="fineweb_edu", path=str(folder))
    return build_data(data_cfg, block_size=block_size, launch_dir=folder, **options)


# --------------------------------------------------------------------------- headers


@pytest.mark.parametrize(
    "field, value, message",
    [
        (0, 12345, "has magic number 12345, expected 20240520"),
        (1, 7, "has format version 7, expected 1"),
    ],
)
def test_bad_header_field_names_file(tmp_path, field, value, message):
    path = write_split(tmp_path, "train", [100])[0]
    data = bytearray(path.read_bytes())
    data[4 * field : 4 * field + 4] = np.array([value], dtype="<i4").tobytes()
    path.write_bytes(bytes(data))

    with pytest.raises(ShardError, match=rf"shard {path} {message}"):
        open_shard(path)


def test_truncated_shard_names_file_and_sizes(tmp_path):
    path = write_split(tmp_path, "train", [100])[0]
    path.write_bytes(path.read_bytes()[:-10])

    with pytest.raises(ShardError, match=rf"shard {path} declares 100 tokens \({HEADER_BYTES + 200} bytes\) but is {HEADER_BYTES + 190} bytes"):
        read_header(path)


def test_shard_shorter_than_header_names_file(tmp_path):
    path = tmp_path / "corpus_train_000000.bin"
    path.write_bytes(b"\x00" * 100)

    with pytest.raises(ShardError, match=rf"shard {path} is 100 bytes, shorter than its {HEADER_BYTES}-byte header"):
        build(tmp_path)


def test_corrupted_shard_among_good_ones_stops_build(tmp_path):
    write_split(tmp_path, "val", [100])
    paths = write_split(tmp_path, "train", [100, 100, 100])
    paths[1].write_bytes(paths[1].read_bytes()[:-2])

    with pytest.raises(ShardError, match="corpus_train_000001.bin declares 100 tokens"):
        build(tmp_path)


# --------------------------------------------------------------------------- short and empty splits


def test_empty_validation_split_rejected(tmp_path):
    write_split(tmp_path, "train", [200])
    write_shard(tmp_path / "corpus_val_000000.bin", np.zeros(0, dtype=np.uint16))

    with pytest.raises(ShardError, match=r"corpus_val_000000.bin has 0 tokens, fewer than model.block_size \+ 1 = 17"):
        build(tmp_path)


def test_missing_validation_split_rejected(tmp_path):
    write_split(tmp_path, "train", [200])

    with pytest.raises(ShardError, match=rf"no val shards \(\*val\*.bin\) in {tmp_path}"):
        build(tmp_path)


def test_corpus_shorter_than_one_block_rejected(tmp_path):
    write_split(tmp_path, "val", [200])
    write_split(tmp_path, "train", [100, 20])

    with pytest.raises(ShardError, match=r"corpus_train_000000.bin has 100 tokens, .*corpus_train_000001.bin has 20 tokens, fewer than model.block_size \+ 1 = 129"):
        build(tmp_path, block_size=128)


def test_short_last_shard_not_sampled(tmp_path, caplog):
    paths = write_split(tmp_path, "train", [300, 10])

    with caplog.at_level(logging.WARNING, logger="mars_m_exp.data.loader"):
        windows = TokenWindows(paths, block_size=16)

    assert windows.num_windows == 300 - 16
    assert windows.num_tokens == 310
    last = windows.gather(np.array([windows.num_windows - 1]))
    assert last[0].tolist() == list(range(283, 300))
    assert "corpus_train_000001.bin" in caplog.text


def test_unfinished_preparation_rejected(tmp_path):
    write_split(tmp_path, "val", [200])
    write_split(tmp_path, "train", [200])
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"complete": False, "shards": [{}, {}]}))

    with pytest.raises(ShardError, match=r"has not finished \(2 shards so far\); rerun the same data_prep command"):
        find_shards(tmp_path, "train")


# --------------------------------------------------------------------------- other formats and paths


def test_nanogpt_headerless_files_train(tmp_path):
    np.arange(500, dtype=np.uint16).tofile(tmp_path / "train.bin")
    (np.arange(300, dtype=np.uint16) + 1000).tofile(tmp_path / "val.bin")

    data = build(tmp_path)
    x, y = next(data.val.batches())

    assert data.train.windows.num_tokens == 500
    assert data.val.windows.num_tokens == 300
    assert x.shape == (2, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert int(x[0, 0]) >= 1000


def test_relative_data_path_resolves_against_launch_dir(tmp_path, monkeypatch):
    launch_dir = tmp_path / "launch"
    write_split(launch_dir / "data" / "shards", "train", [100])
    monkeypatch.chdir(tmp_path)  # what Hydra's chdir does: the working directory is elsewhere

    path = prepare_data(DataConfig(name="fineweb_edu", path="data/shards"), launch_dir)

    assert path == launch_dir / "data" / "shards"


def test_missing_data_folder_names_prepare_command(tmp_path):
    with pytest.raises(ShardError, match=r"is not a folder; prepare the shards with `python -m data_prep.prepare openwebtext --out"):
        prepare_data(DataConfig(name="openwebtext", path="nowhere"), tmp_path)


# --------------------------------------------------------------------------- sampler state


def batches(sampler: RandomWindowSampler, steps: range) -> list[torch.Tensor]:
    return [torch.cat([sampler.micro_batch(step, m, 2)[0] for m in range(4)]) for step in steps]


def test_sampler_resume_continues_same_batches(tmp_path):
    windows = TokenWindows(write_split(tmp_path, "train", [400, 700]), block_size=16)
    uninterrupted = RandomWindowSampler(windows, global_batch_size=8, seed=11)
    expected = batches(uninterrupted, range(6))

    first_half = RandomWindowSampler(windows, global_batch_size=8, seed=11)
    batches(first_half, range(3))
    state = first_half.state_dict()
    resumed = RandomWindowSampler(windows, global_batch_size=8, seed=999)
    resumed.load_state_dict(state)

    assert state == {"seed": 11, "position": 3, "global_batch_size": 8, "num_windows": windows.num_windows}
    assert resumed.position == 3
    assert all(torch.equal(a, b) for a, b in zip(batches(resumed, range(3, 6)), expected[3:]))


def test_sampler_resume_on_changed_data_warns(tmp_path, caplog):
    small = TokenWindows(write_split(tmp_path / "a", "train", [400]), block_size=16)
    large = TokenWindows(write_split(tmp_path / "b", "train", [400, 400]), block_size=16)
    state = RandomWindowSampler(small, global_batch_size=8, seed=0).state_dict()

    with caplog.at_level(logging.WARNING, logger="mars_m_exp.data.loader"):
        RandomWindowSampler(large, global_batch_size=8, seed=0).load_state_dict(state)

    assert "changed since the checkpoint was written (384 windows then, 768 now)" in caplog.text


def test_shards_drawn_in_proportion_to_size(tmp_path):
    windows = TokenWindows(write_split(tmp_path, "train", [1016, 3016]), block_size=16)
    sampler = RandomWindowSampler(windows, global_batch_size=4000, seed=0)

    first_tokens = sampler.micro_batch(0, 0, 4000)[0][:, 0]
    share_of_second = float((first_tokens >= 10_000).float().mean())

    # 3000 of the 4000 start positions lie in the second shard.
    assert share_of_second == pytest.approx(0.75, abs=0.03)
