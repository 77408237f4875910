"""Stage III (mars_superres) in the application: triplet shards, experiments, training, export.

test_t2i's tiny text LLM (Qwen2, trimmed Qwen tokenizer) and tiny VQ tokenizer (downsampling
4), and a stage II MARS checkpoint around them built here, are loaded by path. Shapes
renders at 32 px become (16 px codes, caption, 32 px codes) triplets.
"""

from __future__ import annotations

import json
import random
import re
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from transformers import AutoModelForCausalLM, AutoTokenizer

from apps.generate import generate
from apps.superres_shards import superres_shards
from apps.train import train
from mars_app.cascade import SuperResPipeline
from mars_app.pipeline import MarsPipeline
from mars_data import ShardDataModule, shapes
from mars_semvie import SemVIEForCausalLM
from mars_superres import SuperResModel, SuperResModule, lowres_input
from mars_tokenizer import VQGANConfig, VQTokenizer
from tests.test_t2i import BatchesBuiltInWorkers, checkpoints  # noqa: F401  (checkpoints: the tiny LLM and VQ fixture, shared)


def write_triplets(tokenizer: Path, images: Path, output: Path, lowres_scale: int = 1) -> None:
    """(16 px codes, caption, 32 px codes) triplets of 32 px shards, degraded as a base image may be."""
    superres_shards(OmegaConf.create(dict(
        tokenizer=str(tokenizer), input=str(images), output=str(output), lowres_short_side=16, long_side=32,
        degradations={"blur": 0.5, "jpeg_quality": 90, "round_trip": True}, keep_images=False, batch_size=16, device="cpu",
        lowres_member=None, lowres_scale=lowres_scale,
    )))


@pytest.fixture(scope="module")
def world(checkpoints, tmp_path_factory) -> dict[str, Path]:
    """{"base": a stage II MARS checkpoint at 16x16 around test_t2i's tiny LLM and VQ, "images": 32 px
    shapes shards, "triplets": their triplets, "superres": an untrained super-resolution checkpoint}."""
    root = tmp_path_factory.mktemp("superres")
    vq = VQTokenizer.from_pretrained(checkpoints["vq"])
    llm_dir = checkpoints["llm"]
    semvie = SemVIEForCausalLM.from_llm(AutoModelForCausalLM.from_pretrained(llm_dir), vq.codebook_size, image_positions=32)
    MarsPipeline(
        semvie, vq, AutoTokenizer.from_pretrained(llm_dir), ["16x16"], resolution_in_prompt=True, row_end=True
    ).save_pretrained(root / "base")
    shapes.write_shards(root / "images", 48, seed=0, size=32, samples_per_shard=24, processes=1)
    write_triplets(checkpoints["vq"], root / "images", root / "triplets")
    # an untrained super-resolution checkpoint (randomised heads) for the cascade
    module = SuperResModule(str(root / "base"), partial(torch.optim.AdamW), tokens_per_step=4, long_side=32, image_positions=80, aligned_hints=True)
    perturb = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=perturb) * 0.3)
    module.export(root / "superres")
    return {"base": root / "base", "images": root / "images", "triplets": root / "triplets", "vq": checkpoints["vq"], "superres": root / "superres"}


def test_triplet_shards_hold_both_code_grids_and_the_caption(world):
    data = ShardDataModule(str(world["triplets"]), batch_size=8, shuffle_buffer=0, load_images=False, load_codes=True, extra_codes=["lowres"])
    batch = next(iter(data.train_dataloader()))
    assert batch["codes"].shape == (8, 8, 8) and batch["lowres_codes"].shape == (8, 4, 4)
    assert "image" not in batch and all(batch["caption"])
    # the high-res codes are the tokenizer's codes of the render itself
    vq = VQTokenizer.from_pretrained(world["vq"])
    record = batch["record"][0]
    render = torch.from_numpy(np.asarray(shapes.render(record["scene"], 32), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
    assert torch.equal(vq.encode(render[None])[0], batch["codes"][0])
    plain = ShardDataModule(str(world["images"]), batch_size=8, load_images=False, load_codes=False, extra_codes=["lowres"])
    assert list(plain.train_dataloader()) == [] and plain.skipped == 48  # no lowres member: every sample skipped, counted


def test_triplets_take_the_samples_own_lowres_render(world, tmp_path):
    """``lowres_member``: the low-res codes are the tokenizer's codes of the scene rendered at
    the low-res size (shapes shards --lowres), not of a resize; a sample without one is skipped."""
    shapes.write_shards(tmp_path / "images", 6, seed=1, size=32, lowres=16, samples_per_shard=3, processes=1)
    cfg = OmegaConf.create(dict(
        tokenizer=str(world["vq"]), input=str(tmp_path / "images"), output=str(tmp_path / "triplets"), lowres_short_side=16,
        long_side=32, degradations={"blur": 0.0, "jpeg_quality": None, "round_trip": False}, keep_images=False, batch_size=16,
        device="cpu", lowres_member="lowres.png", lowres_scale=1,
    ))
    superres_shards(cfg)
    data = ShardDataModule(str(tmp_path / "triplets"), batch_size=6, shuffle_buffer=0, load_images=False, load_codes=True, extra_codes=["lowres"])
    batch = next(iter(data.train_dataloader()))
    vq = VQTokenizer.from_pretrained(world["vq"])
    to_tensor = lambda image: torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
    renders = torch.stack([to_tensor(shapes.render(r["scene"], 16)) for r in batch["record"]])
    assert torch.equal(vq.encode(renders), batch["lowres_codes"])
    resized = torch.stack([to_tensor(shapes.render(r["scene"], 32).resize((16, 16), Image.Resampling.BICUBIC)) for r in batch["record"]])
    assert not torch.equal(vq.encode(resized), batch["lowres_codes"])  # the option changes what the model reads
    # round_trip: the codes of the tokenizer's reconstruction as an 8-bit image, what the cascade reads
    cfg.degradations.round_trip, cfg.output = True, str(tmp_path / "round_trip")
    superres_shards(cfg)
    trip = ShardDataModule(cfg.output, batch_size=6, shuffle_buffer=0, load_images=False, load_codes=True, extra_codes=["lowres"])
    again = next(iter(trip.train_dataloader()))
    assert again["key"] == batch["key"]
    decoded = ((vq.decode(vq.encode(renders)) + 1) * 127.5).round() / 127.5 - 1
    assert torch.equal(vq.encode(decoded), again["lowres_codes"])
    assert not torch.equal(again["lowres_codes"], batch["lowres_codes"])
    assert torch.equal(again["codes"], batch["codes"])  # the high-res targets are untouched
    # lowres_scale: the codes of the low-res render with each pixel repeated, on a finer grid
    cfg.degradations.round_trip, cfg.lowres_scale, cfg.output = False, 2, str(tmp_path / "scale2")
    superres_shards(cfg)
    scaled = next(iter(ShardDataModule(cfg.output, batch_size=6, shuffle_buffer=0, load_images=False, load_codes=True, extra_codes=["lowres"]).train_dataloader()))
    assert scaled["lowres_codes"].shape == (6, 8, 8) and torch.equal(scaled["codes"], batch["codes"])
    assert torch.equal(vq.encode(lowres_input(renders, 2)), scaled["lowres_codes"])
    assert torch.equal(lowres_input(renders, 2)[:, :, 5, 7], renders[:, :, 2, 3])
    # shards without the member: every sample skipped and counted, nothing written for them
    cfg.input, cfg.output = str(world["images"]), str(tmp_path / "none")
    from mars_data.tars import read_samples

    written = superres_shards(cfg)
    assert written and sum(1 for path in written for _ in read_samples(str(path))) == 0


def test_stage3_experiment_has_the_papers_settings(make_cfg):
    cfg = make_cfg(["experiment=stage3"])
    assert cfg.model._target_ == "mars_superres.SuperResModule" and cfg.model.long_side == 1024
    assert cfg.model.tokens_per_step == 4 and list(cfg.data.extra_codes) == ["lowres"]
    assert cfg.data.batch_size * cfg.trainer.devices * cfg.trainer.num_nodes == 1536 and cfg.trainer.max_epochs == 1


def test_shapes_stage3_fits_and_exports_a_loadable_checkpoint(make_cfg, world):
    cfg = make_cfg([
        "experiment=shapes_stage3", f"model.base_path={world['base']}", f"data.train_shards={world['triplets']}",
        "data.batch_size=8", "data.num_workers=1", "model.long_side=32", "model.tokens_per_step=4",
        "trainer.max_steps=3", "trainer.max_time=null", "+callbacks.built._target_=tests.test_t2i.BatchesBuiltInWorkers",
    ])
    BatchesBuiltInWorkers.seen = []
    metrics = train(cfg)
    assert metrics["global_step"] == 3
    assert BatchesBuiltInWorkers.seen == [True] * 3  # sequences built in the DataLoader worker
    assert {"train/loss_head1", "train/loss_head4"} <= set(metrics)
    export = Path(cfg.paths.output_dir) / "superres"
    model = SuperResModel.from_pretrained(export)
    assert model.num_heads == 4 and model.config.lowres == ["16x16"] and model.config.long_side == 32
    assert model.config.head_weights == [3.0, 1.0, 1.0, 1.0]  # the recipe's head1_share 0.5 at K_max 4
    assert (export / "tokenizer").is_dir() and (export / "text_tokenizer").is_dir()
    # trained: the type embedding moved off zero
    assert model.hires_embedding.abs().sum() > 0


def test_cascade_writes_high_res_images_exact_equals_one_head(make_cfg, world, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["a red circle", "一个蓝色的正方形", "a green triangle"]))

    def run(out, *extra):
        cfg = make_cfg([f"ckpt={world['base']}", f"prompts={prompts}", f"out={out}", f"superres={world['superres']}", *extra], "generate")
        return generate(cfg)

    exact = run(tmp_path / "exact", "tokens_per_step=4", "decode=exact", "grid=true", "save_base=true")
    one = run(tmp_path / "one", "tokens_per_step=1")
    assert [Image.open(p).size for p in exact["images"]] == [(32, 32)] * 3
    assert Image.open(tmp_path / "exact" / "base" / "00000.png").size == (16, 16)
    assert Image.open(exact["grid"]).width >= 2 * 128  # base and high-res side by side
    for a, b in zip(exact["images"], one["images"]):  # greedy: exact decoding is K=1 decoding
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    assert exact["stats"].forward_passes < one["stats"].forward_passes == 73  # one batch of 3 images, 73 slots
    fast = run(tmp_path / "fast", "tokens_per_step=4", "decode=fast")
    assert fast["stats"].forward_passes == -(-73 // 4)  # one batch of 3 images, ceil(73 / 4) passes
    with pytest.raises(ValueError, match="decode='fastest'"):
        run(tmp_path / "bad", "tokens_per_step=4", "decode=fastest")
    with pytest.raises(ValueError, match="tokens_per_step=5"):
        run(tmp_path / "bad", "tokens_per_step=5")


def test_stage3_with_its_own_finer_tokenizer_trains_exports_it_and_upscales_through_it(make_cfg, world, tmp_path):
    fine = VQTokenizer(VQGANConfig.from_preset("tiny", ch_mult=(1, 2))).save_pretrained(tmp_path / "fine")  # downsample 2, 32 codes
    write_triplets(fine, world["images"], tmp_path / "triplets", lowres_scale=2)  # the recipe's: 16 px coded at 32 px
    cfg = make_cfg([
        "experiment=shapes_stage3_fine", f"model.base_path={world['base']}", f"model.tokenizer_path={fine}", f"data.train_shards={tmp_path / 'triplets'}",
        "data.batch_size=4", "data.num_workers=0", "model.long_side=32", "model.tokens_per_step=2",
        "trainer.max_steps=2", "trainer.max_time=null",
    ])
    assert train(cfg)["global_step"] == 2
    export = Path(cfg.paths.output_dir) / "superres"
    assert VQTokenizer.from_pretrained(export / "tokenizer").downsample == 2  # the cascade re-encodes with stage III's tokenizer
    pipe = SuperResPipeline.from_pretrained(export)
    low = shapes.render(shapes.heldout_records(1, 0)[0]["scene"], 16, 16)
    assert pipe.model.config.lowres_scale == 2 and pipe.encode([low]).shape == (1, 16, 16)  # the cascade reads as training did
    images, stats = pipe.upscale([low], ["a red circle"], 2, "exact")
    assert images[0].size == (32, 32) and -(-273 // 2) <= stats.forward_passes <= 273  # 16x16 codes out: 273 slots (the base's grid: 73)
    # triplets made at another scale than the model's: one clear error, not a model trained on other grids
    module = SuperResModule(str(world["base"]), partial(torch.optim.AdamW), long_side=32, image_positions=80, lowres_scale=2)
    batch = next(iter(ShardDataModule(str(world["triplets"]), batch_size=2, shuffle_buffer=0, load_images=False, load_codes=True, extra_codes=["lowres"]).train_dataloader()))
    with pytest.raises(ValueError, match=r"4x4 codes: its image was encoded at lowres_scale=1, the model reads model.lowres_scale=2"):
        module.triplets.build(batch, random.Random(0))
    wide = VQTokenizer(VQGANConfig.from_preset("tiny", codebook_size=64)).save_pretrained(tmp_path / "wide")
    with pytest.raises(ValueError, match="model.tokenizer_path=.* has 64 codes; the base model draws 32"):
        SuperResModule(str(world["base"]), partial(torch.optim.AdamW), tokenizer_path=str(wide), long_side=32, image_positions=80)


@pytest.mark.slow
def test_benchmark_runs_on_a_cascade_and_checks_exact_output(world, tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "superres.py"), "--base", str(world["base"]), "--superres", str(world["superres"]),
         "--num", "4", "--rounds", "1", "--batch-size", "4", "--latency-num", "2", "--prompts-file", str(tmp_path / "heldout.jsonl")],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    batches, one_at_a_time = proc.stdout.split("one image at a time: the first 2 base images, upscaled in batches of 1, median of 3 rounds")
    variants = [[" 1 ", " exact "], [" 2 ", " fast "], [" 4 ", " fast "], [" 2 ", " exact "], [" 4 ", " exact "]]
    for table in batches, one_at_a_time:
        rows = [line.split("|") for line in table.splitlines() if line.startswith("| ") and "mode" not in line]
        assert [row[1:3] for row in rows] == variants
        assert all(re.fullmatch(r" [\d.]+x / [\d.]+x ", row[5]) for row in rows)  # wall-clock ratios, measured
        assert rows[0][5] == " 1.00x / 1.00x "
        if table is batches:
            assert all(re.fullmatch(r" [+-][\d.]+ ± [\d.]+ ", row[9]) for row in rows)  # the lead over nearest
    assert "palette match from 16x16 renders, bicubic" in proc.stdout
    assert "(the ceiling)" in proc.stdout
    assert "round trip of the 16x16 renders as the model reads them, nearest" in proc.stdout
    assert "the best any upscaler can do (shapes.ideal_upscale)" in proc.stdout


def test_training_sequences_write_the_high_res_size_and_drop_captions(world):
    data = ShardDataModule(str(world["triplets"]), batch_size=16, shuffle_buffer=0, load_images=False, load_codes=True, extra_codes=["lowres"])
    batch = next(iter(data.train_dataloader()))
    module = SuperResModule(str(world["base"]), partial(torch.optim.AdamW), tokens_per_step=2, long_side=32, image_positions=80, uncond_prob=0.5)
    out = module.sequences(batch, random.Random(0))
    vocab, tok = module.vocab, module.text_tokenizer
    dropped = 0
    for ids, mask, labels, caption in zip(out["input_ids"], out["attention_mask"], out["labels"], batch["caption"]):
        ids = ids[mask.bool()].tolist()
        text = tok.decode([i for i in ids if i < vocab.text_size], skip_special_tokens=True).strip()
        assert text.endswith("32x32")  # the requested high-res size ends the prompt, as in stage II
        dropped += text == "32x32"
        assert text in ("32x32", f"{caption}32x32")  # the text tokens, <|endoftext|> between them skipped
        assert ids.count(vocab.image_start) == 2 and ids.count(vocab.image_row_end) == 4 + 8
        assert int((labels != -100).sum()) == 8 * 9 + 1  # targets: the high-res codes, row ends, <image_end>
    assert 3 <= dropped <= 13  # about half of 16 captions dropped


def test_stage3_parts_added_from_zero_train_at_their_own_learning_rate(world):
    module = SuperResModule(str(world["base"]), partial(torch.optim.AdamW, lr=1e-3), tokens_per_step=2, long_side=32,
                            image_positions=80, aligned_hints=True, new_params_lr_scale=5.0)
    module.trainer = L.Trainer(max_steps=10, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    optimizer = module.configure_optimizers()["optimizer"]
    lr = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    model, trained = module.model, module.model.semvie.vision_head.weight
    for new in (model.hires_embedding, model.hint_embedding.weight, model.head_hint_embedding.weight):
        assert lr[id(new)] == pytest.approx(5 * lr[id(trained)])
    assert {id(p) for p in model.parameters() if p.requires_grad} == set(lr)


@pytest.mark.slow
def test_deepspeed_zero3_two_cpu_processes_fit_and_export(world, tmp_path):
    """The paper's strategy: sharded weights are gathered for the export."""
    from tests.test_train import run_cli

    run_cli([
        "experiment=shapes_stage3", f"model.base_path={world['base']}", f"data.train_shards={world['triplets']}",
        "data.resampled=true", "data.samples_per_epoch=32", "data.batch_size=8", "data.num_workers=0",
        "model.long_side=32", "model.tokens_per_step=2", "trainer.max_steps=2", "trainer.max_time=null",
        "trainer=deepspeed_zero3", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
        "hydra.run.dir=run",
    ], cwd=tmp_path)
    model = SuperResModel.from_pretrained(tmp_path / "run" / "superres")
    assert model.num_heads == 2 and model.hires_embedding.abs().sum() > 0
