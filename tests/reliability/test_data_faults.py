"""Corrupt-data drills (issue 19): every fault is skipped, counted per shard and reason as
injected, and reported; nothing crashes; a data set with nothing usable stops the run with an
error naming the shards and reasons instead of looping forever."""

from __future__ import annotations

import io
import tarfile
import time
from pathlib import Path

import pytest
from PIL import Image

from apps.train import train
from mars_data import ShardDataModule
from mars_data.shapes import write_shards
from mars_data.tars import read_samples, write_manifest, write_samples
from mars_data.webdata import DataError
from tests.test_tokenizer_app import TINY

# the tiny tokenizer of the tokenizer app's tests, on shards instead of the shapes world
TINY_TOKENIZER = [
    "data=shards", "model=vqgan_shapes", "trainer.gradient_clip_val=null", "logger=csv",
    *(o for o in TINY if o.startswith("model.")),
]


def batches(datamodule: ShardDataModule) -> list[dict]:
    return list(datamodule.train_dataloader())


def bomb_png() -> bytes:
    """A small file that declares 12,000 x 12,000 pixels (over mars_data.images' limit)."""
    buffer = io.BytesIO()
    Image.new("1", (12_000, 12_000)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def shards(tmp_path) -> Path:
    """Three shapes shards of 8 samples (32 px) with their manifest."""
    write_shards(tmp_path / "shards", 24, seed=0, size=32, samples_per_shard=8, processes=1, progress=False)
    return tmp_path / "shards"


def test_a_tar_cut_at_a_member_boundary_is_reported_with_the_samples_lost(shards):
    shard = shards / "shapes-000001.tar"
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    # cut after sample 5's last member (3 members a sample): a valid, shorter tar
    end = members[14].offset_data + (members[14].size + 511) // 512 * 512
    shard.write_bytes(shard.read_bytes()[:end])
    assert len(list(read_samples(shard))) == 5  # tarfile reads it without complaint
    datamodule = ShardDataModule(str(shards), batch_size=4, shuffle_buffer=0)
    read = sum(len(b["key"]) for b in batches(datamodule))
    assert read == 8 + 5 + 8
    assert datamodule.skips.by_shard() == {str(shard): {"truncated_shard": 3}}


def test_empty_shard_bomb_image_and_missing_shard_are_counted_and_skipped(shards, tmp_path):
    samples = {key: {info.name.split(".", 1)[1]: data for info, data in members} for key, members in read_samples(shards / "shapes-000002.tar")}
    first = sorted(samples)[0]
    samples[first]["png"] = bomb_png()
    write_samples(shards / "shapes-000002.tar", samples)
    write_samples(shards / "shapes-000003.tar", {})  # a shard with no sample at all
    write_manifest(shards, {"shapes-000003.tar": 0})
    datamodule = ShardDataModule(str(shards), batch_size=4, shuffle_buffer=8)
    loader = datamodule.train_dataloader()  # the shard list is taken now ...
    (shards / "shapes-000000.tar").unlink()  # ... and a shard disappears before it is read
    read = sum(len(b["key"]) for b in loader)
    assert read == 8 + 7  # shard 1 whole, shard 2 without its bomb
    assert datamodule.skips.by_shard() == {
        str(shards / "shapes-000000.tar"): {"missing_shard": 1},
        str(shards / "shapes-000002.tar"): {"bad_image": 1},
        str(shards / "shapes-000003.tar"): {"empty_shard": 1},
    }


def test_a_run_on_data_with_no_usable_sample_stops_within_60_s_naming_shards_and_reasons(make_cfg, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for shard in range(2):
        write_samples(bad / f"bad-{shard}.tar", {f"{shard}{i:03d}": {"png": b"not a png", "txt": b"a red circle"} for i in range(10)})
    cfg = make_cfg([*TINY_TOKENIZER, f"data.train_shards={bad}", "data.resolutions=[32x32]", "data.batch_size=4",
                    "data.num_workers=0", "data.max_failures=200", "trainer.max_steps=5"])
    start = time.monotonic()
    with pytest.raises(DataError) as error:
        train(cfg)
    assert time.monotonic() - start < 60
    message = str(error.value)
    assert "200 attempts in a row gave no usable sample" in message
    assert f"{bad / 'bad-0.tar'}: bad_image" in message and f"{bad / 'bad-1.tar'}: bad_image" in message


def test_skips_are_logged_as_metrics_per_reason(make_cfg, shards):
    samples = {key: {info.name.split(".", 1)[1]: data for info, data in members} for key, members in read_samples(shards / "shapes-000000.tar")}
    for key in sorted(samples)[:2]:
        samples[key]["png"] = b"garbage"
    write_samples(shards / "shapes-000000.tar", samples)
    cfg = make_cfg([*TINY_TOKENIZER, f"data.train_shards={shards}", "data.resolutions=[32x32]", "data.batch_size=4",
                    "data.num_workers=0", "data.shuffle_buffer=0", "trainer.max_steps=6"])
    metrics = train(cfg)
    assert metrics["data/skipped_bad_image"] == 2
    assert metrics["data/skipped_missing_shard"] == 0
