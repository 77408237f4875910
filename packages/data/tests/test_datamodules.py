"""Datamodules over webdataset shards: batch format, buckets, codes, broken data, generation."""

import io
import json
import logging
import math
import tarfile

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from mars_data import ShapesDataModule, ShardDataModule
from mars_data.shapes import render, write_shards
from mars_data.tars import write_samples
from mars_data.webdata import SkipCounter, expand_urls


def encode(image, fmt="PNG"):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("shapes")
    write_shards(directory, 60, seed=0, size=32, aspect_ratios=("1:1", "2:1"), samples_per_shard=20,
                 processes=1, progress=False)
    return directory


def all_batches(datamodule):
    return list(datamodule.train_dataloader())


def test_batches_are_images_in_range_with_captions_and_records(shard_dir):
    batches = all_batches(ShardDataModule(str(shard_dir), batch_size=8, shuffle_buffer=16))
    keys = [k for b in batches for k in b["key"]]
    assert len(keys) == len(set(keys)) == 60  # one pass sees every sample once
    for batch in batches:
        images = batch["image"]
        assert images.dtype == torch.float32 and images.ndim == 4 and images.shape[1] == 3
        assert images.min() >= -1 and images.max() == 1  # white background is 1
        assert len(batch["caption"]) == len(batch["record"]) == images.shape[0] <= 8
        for record, caption in zip(batch["record"], batch["caption"]):
            assert record["prompt"] == caption
            assert (record["height"], record["width"]) == tuple(images.shape[2:])  # bucketed by size


def test_buckets_fill_whole_batches_of_each_size(shard_dir):
    batches = all_batches(ShardDataModule(str(shard_dir), batch_size=8, shuffle_buffer=0))
    sizes = {tuple(b["image"].shape[2:]) for b in batches}
    assert sizes == {(32, 32), (32, 64)}
    partial = [b for b in batches if len(b["key"]) < 8]
    assert len(partial) <= len(sizes)  # only the remainder of each bucket comes out short


def test_crops_are_seeded_windows_of_the_images(shard_dir):
    whole = {k: img for b in all_batches(ShardDataModule(str(shard_dir), batch_size=8, shuffle_buffer=0))
             for k, img in zip(b["key"], b["image"])}

    def crops(seed):
        datamodule = ShardDataModule(str(shard_dir), batch_size=8, shuffle_buffer=0, crop=32, shuffle_seed=seed)
        return {k: img for b in all_batches(datamodule) for k, img in zip(b["key"], b["image"])}

    first = crops(0)
    assert first.keys() == whole.keys()
    offsets = set()
    for key, crop in first.items():
        assert crop.shape == (3, 32, 32)
        image = whole[key]
        windows = [left for left in range(image.shape[2] - 31) if torch.equal(image[:, :, left : left + 32], crop)]
        assert windows, key  # a window of the image itself
        offsets.add(windows[0] if image.shape[2] > 32 else None)
    assert len(offsets - {None}) > 5  # the wide images are cut at many places
    again, other = crops(0), crops(1)
    assert all(torch.equal(again[k], first[k]) for k in first)  # the seed fixes the windows
    assert any(not torch.equal(other[k], first[k]) for k in first)


def test_images_smaller_than_the_crop_are_skipped_and_counted(shard_dir):
    datamodule = ShardDataModule(str(shard_dir), batch_size=8, shuffle_buffer=0, crop=33)
    assert all_batches(datamodule) == []
    assert datamodule.skips.by_reason()["small_image"] == 60
    with pytest.raises(ValueError, match="crop"):
        ShardDataModule(str(shard_dir), batch_size=8, crop=32, load_codes=True).train_dataloader()
    with pytest.raises(ValueError, match="crop=64 is larger than the smallest render"):  # known before any data is made
        ShapesDataModule(str(shard_dir / "world"), size=[32, 128], crop=64)


def test_image_pixels_match_the_render(shard_dir):
    batch = next(iter(ShardDataModule(str(shard_dir), batch_size=4, shuffle_buffer=0).train_dataloader()))
    record = batch["record"][0]
    expected = np.asarray(render(record["scene"], record["width"], record["height"]), dtype=np.float32)
    got = (batch["image"][0].permute(1, 2, 0).numpy() + 1) * 127.5
    np.testing.assert_allclose(got, expected, atol=1e-3)


def test_workers_share_the_shards(shard_dir):
    datamodule = ShardDataModule(str(shard_dir), batch_size=8, num_workers=2, shuffle_buffer=8)
    keys = [k for b in all_batches(datamodule) for k in b["key"]]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 60


def test_resampled_epochs_have_the_requested_length(shard_dir):
    datamodule = ShardDataModule(str(shard_dir), batch_size=8, resampled=True, samples_per_epoch=100)
    assert len(all_batches(datamodule)) == math.ceil(100 / 8)
    with pytest.raises(ValueError, match="samples_per_epoch"):
        ShardDataModule(str(shard_dir), resampled=True)


def test_urls_from_directories_brace_patterns_and_lists(shard_dir):
    names = [str(shard_dir / f"shapes-{i:06d}.tar") for i in range(3)]
    assert expand_urls(str(shard_dir)) == names
    assert expand_urls(str(shard_dir / "shapes-{000000..000002}.tar")) == names
    assert expand_urls([names[0], names[2]]) == [names[0], names[2]]
    assert expand_urls("https://example.com/s-{0..1}.tar") == ["https://example.com/s-0.tar", "https://example.com/s-1.tar"]
    with pytest.raises(FileNotFoundError):
        expand_urls(str(shard_dir / "missing-{0..1}.tar"))


def test_shards_stream_from_urls(shard_dir):
    """Anything webdataset opens is a shard: here a pipe, as for https:// (curl) or s3 shards."""
    datamodule = ShardDataModule(f"pipe:cat {shard_dir}/shapes-{{000000..000002}}.tar", batch_size=16)
    assert sum(len(b["key"]) for b in all_batches(datamodule)) == 60


def test_img2dataset_layout_with_jpg_fitted_to_resolutions(tmp_path):
    rng = np.random.default_rng(0)
    samples = {}
    for i, (w, h) in enumerate([(80, 60), (60, 90), (64, 64)]):
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        meta = {"url": f"https://example.com/{i}.jpg", "caption": f"photo {i}", "width": w, "height": h}
        samples[f"{i:09d}"] = {"jpg": encode(image, "JPEG"), "txt": f"photo {i}".encode(), "json": json.dumps(meta).encode()}
    shard = write_samples(tmp_path / "00000.tar", samples)
    (batch,) = all_batches(ShardDataModule(str(shard), batch_size=4, resolutions=["32x32"], shuffle_buffer=0))
    assert batch["image"].shape == (3, 3, 32, 32)  # stage I: resize + centre crop
    assert batch["caption"] == ["photo 0", "photo 1", "photo 2"]
    assert batch["record"][1]["url"] == "https://example.com/1.jpg"
    # stage II: each image to the size of nearest aspect ratio, batches bucketed by size
    stage2 = ShardDataModule(str(shard), batch_size=4, resolutions=["32x32", "48x32", "32x48"], shuffle_buffer=0)
    sizes = {b["caption"][0]: tuple(b["image"].shape[-2:]) for b in all_batches(stage2)}
    assert sizes == {"photo 0": (32, 48), "photo 1": (48, 32), "photo 2": (32, 32)}


def test_codes_without_decoding_images(tmp_path):
    samples = {}
    for i in range(6):
        codes = io.BytesIO()
        np.save(codes, np.full((4, 4), i, dtype=np.int16))
        members = {"png": b"not an image: never decoded", "txt": f"caption {i}".encode()}
        if i != 5:  # the last sample was never tokenized
            members["codes.npy"] = codes.getvalue()
        samples[f"{i:09d}"] = members
    shard = write_samples(tmp_path / "codes.tar", samples)
    datamodule = ShardDataModule(str(shard), batch_size=8, shuffle_buffer=0, load_images=False, load_codes=True)
    (batch,) = all_batches(datamodule)
    assert "image" not in batch
    assert batch["codes"].dtype == torch.long and batch["codes"].shape == (5, 4, 4)
    assert batch["codes"][:, 0, 0].tolist() == [0, 1, 2, 3, 4]
    assert datamodule.skipped == 1


def test_corrupt_members_and_shards_are_skipped_counted_and_logged(tmp_path, shard_dir, caplog):
    good = (shard_dir / "shapes-000000.tar").read_bytes()
    with tarfile.open(shard_dir / "shapes-000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        cut = tar.getmembers()[30].offset_data + 50  # inside the data of sample 10's png
    samples = {}
    for name, data in members.items():
        key, ext = name.split(".", 1)
        samples.setdefault(key, {})[ext] = data
    keys = sorted(samples)
    samples[keys[0]]["png"] = b"\x89PNG garbage"  # undecodable image
    samples[keys[1]]["png"] = samples[keys[1]]["png"][:40]  # truncated image
    del samples[keys[2]]["png"]  # no image at all
    write_samples(tmp_path / "a.tar", samples)
    (tmp_path / "b.tar").write_bytes(good[:cut])  # shard cut off inside a member
    (tmp_path / "c.tar").write_bytes(b"this is no tar file" * 100)

    datamodule = ShardDataModule(str(tmp_path), batch_size=64, shuffle_buffer=0)
    with caplog.at_level(logging.WARNING, logger="mars_data.webdata"):
        batches = all_batches(datamodule)
    read = sum(len(b["key"]) for b in batches)
    assert read == 17 + 10  # a.tar's good samples and the 10 whole ones of b.tar before the cut
    # three broken samples, and at least one failed read per broken shard (webdataset reports a
    # member cut short and then the stream after it)
    assert datamodule.skipped >= 3 + 2
    assert "skipped" in caplog.text and f"{datamodule.skipped} skipped so far" in caplog.text


def test_shapes_datamodule_generates_once_and_trains(tmp_path):
    kwargs = dict(num_train_samples=40, num_val_samples=16, size=32, samples_per_shard=20, processes=1, batch_size=8)
    datamodule = ShapesDataModule(str(tmp_path / "shapes"), **kwargs)
    datamodule.prepare_data()
    train_dir = datamodule.split_dir("train")
    manifest = json.loads((train_dir / "manifest.json").read_text())
    assert manifest["num_samples"] == 40 and len(manifest["shards"]) == 2
    stamp = [p.stat().st_mtime_ns for p in sorted(train_dir.glob("*.tar"))]
    again = ShapesDataModule(str(tmp_path / "shapes"), **kwargs)
    again.prepare_data()  # present: not written again
    assert [p.stat().st_mtime_ns for p in sorted(train_dir.glob("*.tar"))] == stamp
    assert ShapesDataModule(str(tmp_path / "shapes"), **{**kwargs, "seed": 1}).split_dir("train") != train_dir

    class Probe(L.LightningModule):
        """The smallest model that consumes the batches: checks them and fits a constant."""

        def __init__(self):
            super().__init__()
            self.mean = torch.nn.Parameter(torch.zeros(3))

        def training_step(self, batch, _):
            assert batch["image"].shape[1:] == (3, 32, 32)
            return (batch["image"].mean((0, 2, 3)) - self.mean).pow(2).sum()

        def validation_step(self, batch, _):
            self.log("val_seen", float(len(batch["caption"])), reduce_fx="sum")

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(Probe(), datamodule=ShapesDataModule(str(tmp_path / "shapes"), **kwargs))
    assert trainer.global_step == 2 * 5 and trainer.callback_metrics["val_seen"] == 16


def test_shapes_of_two_sizes_come_in_batches_of_one_size(tmp_path):
    """A tokenizer that serves the base and the super-resolved size trains on renders of both."""
    datamodule = ShapesDataModule(str(tmp_path / "shapes"), num_train_samples=64, num_val_samples=0, size=[16, 32],
                                  samples_per_shard=32, processes=1, batch_size=4, shuffle_buffer=0)
    datamodule.prepare_data()
    datamodule.setup("fit")
    sizes = [tuple(batch["image"].shape[-2:]) for batch in datamodule.train_dataloader()]
    assert set(sizes) == {(16, 16), (32, 32)} and len(sizes) >= 64 // 4


def test_skips_are_all_counted_and_the_log_gets_a_reasons_first_ten_then_powers_of_ten(caplog):
    skips = SkipCounter(["a.tar", "b.tar"], max_failures=10**6)
    with caplog.at_level(logging.WARNING, logger="mars_data.webdata"):
        for i in range(1500):
            skips.skip("a.tar" if i % 2 else "b.tar", "untrained_size", f"sample {i}")
            if i % 100 == 0:
                skips.ok()
        skips.skip("a.tar", "bad_codes", "sample x")
    assert skips.by_reason()["untrained_size"] == 1500 and skips.count == 1501
    assert skips.by_shard()["a.tar"] == {"untrained_size": 750, "bad_codes": 1}
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 10 + 2 + 1  # 1..10, 100, 1000 of one reason; the other's first
    assert lines[11].endswith("1000 skipped so far, 1000 for untrained_size")
    assert "bad_codes" in lines[12]
