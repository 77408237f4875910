"""The tokenizer in the application: the shapes_tokenizer experiment, tokenize_shards, and the
held-out reconstruction check of the trained shapes tokenizer (slow)."""

from __future__ import annotations

import io
import os
import time

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import open_dict

from apps.tokenize_shards import tokenize_shards
from mars_data.tars import read_samples
from apps.train import train
from mars_data import ShardDataModule
from mars_data.shapes import METRICS, render, score_image, summarize, write_prompts, write_shards
from mars_data.webdata import decode_image
from mars_tokenizer import VQGANConfig, VQTokenizer

TINY = [
    "experiment=shapes_tokenizer",
    "data.num_train_samples=48",
    "data.num_val_samples=16",
    "data.samples_per_shard=16",
    "data.size=32",
    "data.crop=null",  # the recipe cuts 64 px windows of its 64 and 128 px renders
    "data.batch_size=8",
    "data.processes=1",
    "model.vqgan.patch_size=2",
    "model.vqgan.ch=8",
    "model.vqgan.ch_mult=[1,2]",
    "model.vqgan.norm_groups=4",
    "model.vqgan.z_channels=8",
    "model.disc_weight=0.5",
    "model.disc_start=1",
    "model.disc_ndf=8",
    "model.restart_every=2",
    "trainer.max_steps=3",
    "trainer.val_check_interval=3",
    "logger=csv",
]


def test_shapes_tokenizer_experiment_fits_and_leaves_a_tokenizer(make_cfg, tmp_path):
    cfg = make_cfg(TINY)
    assert cfg.model._target_ == "mars_tokenizer.VQGANModule"
    metrics = train(cfg)
    assert metrics["global_step"] == 3
    for key in ("train/l1", "train/d_loss", "train/codebook_live", "val/l1", "val/codebook_usage"):
        assert key in metrics, key
    tokenizer = VQTokenizer.from_pretrained(tmp_path / "run" / "tokenizer")
    assert tokenizer.config.downsample == 4
    assert tokenizer.encode(torch.zeros(1, 3, 32, 64)).shape == (1, 8, 16)
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("model, preset", [("vqgan_shapes", "shapes"), ("vqgan_paper", "paper")])
def test_model_configs_are_the_presets(make_cfg, model, preset):
    cfg = make_cfg(["experiment=shapes_tokenizer", f"model={model}"])
    assert instantiate(cfg.model.vqgan) == VQGANConfig.from_preset(preset)


def test_tokenize_shards_adds_the_codes_of_every_image(make_cfg, tmp_path):
    torch.manual_seed(0)
    tokenizer = VQTokenizer(VQGANConfig.from_preset("tiny"))
    tokenizer.save_pretrained(tmp_path / "tok")
    write_shards(tmp_path / "shards", 20, seed=3, size=16, aspect_ratios=("1:1", "2:1"),
                 samples_per_shard=8, processes=1, progress=False)
    cfg = make_cfg(
        [f"tokenizer={tmp_path / 'tok'}", f"input={tmp_path / 'shards'}", f"output={tmp_path / 'codes'}", "batch_size=4",
         "resolutions=[16x16,32x16]"],
        config_name="tokenize_shards",
    )
    written = tokenize_shards(cfg)
    assert [p.name for p in written] == sorted(p.name for p in (tmp_path / "shards").glob("*.tar"))

    # every sample keeps its members and gains codes equal to encoding its image
    checked = 0
    for source, target in zip(sorted((tmp_path / "shards").glob("*.tar")), written):
        for (key, members), (key_out, members_out) in zip(read_samples(source), read_samples(target), strict=True):
            assert key == key_out
            names_out = [info.name for info, _ in members_out]
            assert names_out == [info.name for info, _ in members] + [f"{key}.codes.npy"]
            image = image_of(members)
            codes = np.load(io.BytesIO(members_out[-1][1]))
            assert codes.dtype == np.int16
            assert torch.equal(torch.from_numpy(codes.astype(np.int64)), tokenizer.encode(image[None])[0])
            checked += 1
    assert checked == 20

    # code-only training reads them without decoding images
    dm = ShardDataModule(str(tmp_path / "codes"), batch_size=4, load_images=False, load_codes=True, shuffle_buffer=0)
    batches = list(dm.train_dataloader())
    assert sum(len(b["caption"]) for b in batches) == 20
    assert all("image" not in b and b["codes"].dtype == torch.long for b in batches)
    assert {tuple(b["codes"].shape[1:]) for b in batches} == {(4, 4), (4, 8)}


def image_of(members) -> torch.Tensor:
    return next(decode_image(data) for info, data in members if info.name.endswith(".png"))


def reconstruction_scores(tokenizer: VQTokenizer, records: list[dict], batch_size: int = 100, size: int = 64) -> tuple[dict, float]:
    """Shapes-world scores of the tokenizer's reconstructions of prompts rendered at ``size``
    pixels, and the share of the codebook their codes use."""
    results, used = [], torch.zeros(tokenizer.codebook_size, dtype=torch.bool)
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        images = torch.stack([
            torch.from_numpy(np.asarray(render(r["scene"], size), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
            for r in chunk
        ])
        codes = tokenizer.encode(images)
        used[codes.flatten()] = True
        pixels = ((tokenizer.decode(codes) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        results += [score_image(p.numpy(), r) for p, r in zip(pixels, chunk)]
    return summarize(results), used.float().mean().item()


@pytest.mark.slow
def test_shapes_tokenizer_reconstructs_held_out_scenes(make_cfg, tmp_path):
    """Train with experiment=shapes_tokenizer (or evaluate MARS_SHAPES_TOKENIZER=<dir>), then
    reconstruct 1,000 held-out renders (prompt file seed 1234, the evaluation stream, disjoint
    from the training stream): every metric >= 0.99."""
    directory = os.environ.get("MARS_SHAPES_TOKENIZER")
    if directory is None:
        cfg = make_cfg(["experiment=shapes_tokenizer"])
        with open_dict(cfg):
            cfg.paths.data_dir = os.environ.get("MARS_DATA_DIR", cfg.paths.data_dir)
        start = time.perf_counter()
        metrics = train(cfg)
        print(f"trained {metrics['global_step']:.0f} steps in {time.perf_counter() - start:.0f} s")
        directory = tmp_path / "run" / "tokenizer"
    tokenizer = VQTokenizer.from_pretrained(directory)
    records = write_prompts(tmp_path / "heldout.jsonl", 1000, seed=1234)
    summary, usage = reconstruction_scores(tokenizer, records)
    print(f"codebook usage on held-out: {100 * usage:.1f}%")
    for lang, values in summary.items():
        print(lang, {m: values[m] for m in METRICS})
    for lang, values in summary.items():
        for metric in METRICS:
            assert values[metric] >= 0.99, (lang, metric, values[metric])
