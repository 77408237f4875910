"""MARS stages I and II (mars_app.t2i): experiments, gradients, text parity, DeepSpeed, export.

A tiny text LLM (Qwen2, trimmed Qwen tokenizer) and a tiny VQ tokenizer are built here and
saved to directories, then loaded by path as real checkpoints are. Images are 16 px (4x4 codes
with the tiny VQ's downsampling 4).
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import hydra
import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

from apps.tokenize_shards import tokenize_shards
from apps.train import train
from mars_app.cli import root_error
from mars_app.lm_corpus import corpus_text
from mars_app.pipeline import MarsPipeline
from mars_core.schedule import warmup_cosine
from mars_data import shapes
from mars_data.shapes import caption_correct, parse_restatement, restate_caption, restatement
from mars_semvie.text import qwen_tokenizer
from mars_tokenizer import VQGANConfig, VQTokenizer
from tests.test_train import run_cli

EVAL = ["model.evaluator.num=8", "model.evaluator.periodic_num=4", "model.evaluator.batch_size=8"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    return make_checkpoints(tmp_path_factory.mktemp("checkpoints"))


def make_checkpoints(root: Path) -> dict[str, Path]:
    """{"llm": tiny Qwen2 + tokenizer dir, "vq": tiny VQ tokenizer dir, "shards": 16 px shards}."""
    rng = random.Random(0)
    texts = [shapes.sample_record(rng)["prompt"] for _ in range(400)] + ["64x64 16x16 32x16"]
    tokenizer = qwen_tokenizer(trim_to=texts)
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    VQTokenizer(VQGANConfig.from_preset("tiny")).save_pretrained(root / "vq")
    shapes.write_shards(root / "shards", 64, seed=0, size=16, samples_per_shard=32, processes=1)
    return {"llm": root / "llm", "vq": root / "vq", "shards": root / "shards"}


def tiny_overrides(checkpoints, tmp_path, experiment="shapes_stage1") -> list[str]:
    return [
        f"experiment={experiment}",
        f"model.llm_path={checkpoints['llm']}",
        f"model.tokenizer_path={checkpoints['vq']}",
        f"model.evaluator.prompts={tmp_path / 'eval.jsonl'}",
        "data.batch_size=8",
        "model.resolutions=[16x16]",
        "trainer.max_time=null",
        *EVAL,
    ]


def test_stage1_from_pretokenized_codes_fits_evaluates_and_exports(make_cfg, checkpoints, tmp_path):
    codes = tmp_path / "codes"
    tokenize_shards(OmegaConf.create(dict(tokenizer=str(checkpoints["vq"]), input=str(checkpoints["shards"]), output=str(codes), batch_size=32, device="cpu", resolutions=["16x16"])))
    cfg = make_cfg([
        *tiny_overrides(checkpoints, tmp_path), f"data.train_shards={codes}", "data.num_workers=0",
        "model.evaluator.every_n_steps=2", "trainer.max_steps=4",
    ])
    metrics = train(cfg)
    assert metrics["global_step"] == 4
    for lang in ("en", "zh"):
        for key in ("single_binding", "pair_binding", "spatial"):
            assert 0.0 <= metrics[f"eval/{lang}_{key}"] <= 1.0
    assert 0.0 <= metrics["eval/caption"] <= 1.0
    assert json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())["eval/en_pair_binding"] == metrics["eval/en_pair_binding"]
    pipe = MarsPipeline.from_pretrained(Path(cfg.paths.output_dir) / "mars")
    assert pipe.generate("a red circle", batch_size=1)[0].size == (16, 16)


def test_stage2_from_images_of_several_aspect_ratios(make_cfg, checkpoints, tmp_path):
    """Codes are encoded on the fly; prompts carry the resolution and rows end with row ends."""
    cfg = make_cfg([
        *tiny_overrides(checkpoints, tmp_path, "shapes_stage2"), "data=shapes", "data.size=16",
        "data.num_train_samples=32", "data.num_val_samples=0", "data.samples_per_shard=16",
        "~data.train_shards", "data.aspect_ratios=[1:1,2:1]", "data.processes=1", "model.resolutions=[32x16,16x16]",
        "trainer.max_steps=3",
    ])
    metrics = train(cfg)
    assert metrics["global_step"] == 3 and "eval/en_pair_binding" in metrics
    pipe = MarsPipeline.from_pretrained(Path(cfg.paths.output_dir) / "mars")
    assert pipe.row_end and pipe.resolution_in_prompt and pipe.model.config.grid_features == 8  # the recipe's
    assert pipe.model.config.grid_heads == ["4x8", "4x4"]  # a head per size (the tiny tokenizer's 4 px codes)
    [image] = pipe.generate("a red circle", batch_size=1, resolution="32x16")
    assert image.size == (32, 16)
    assert isinstance(pipe.caption(image)[0], str)  # reading an image needs its grid too


def build_module(make_cfg, checkpoints, tmp_path, *overrides):
    cfg = make_cfg([*tiny_overrides(checkpoints, tmp_path), *overrides])
    module = hydra.utils.instantiate(cfg.model)
    module.configure_model()  # what the trainer calls
    return module


def test_grid_heads_start_as_the_vision_head_of_the_checkpoint_they_start_from(make_cfg, checkpoints, tmp_path):
    first = build_module(make_cfg, checkpoints, tmp_path)  # a stage I model: one vision head
    with torch.no_grad():
        first.model.vision_head.weight.normal_()
    first.model.save_pretrained(tmp_path / "stage1")
    second = build_module(make_cfg, checkpoints, tmp_path, f"model.init_from={tmp_path / 'stage1'}", "model.grid_heads=true",
                          "model.resolutions=[32x16,16x16]", "model.resolution_in_prompt=true")
    assert second.model.config.grid_heads == ["4x8", "4x4"]  # rows x columns of the tiny tokenizer's 4 px codes
    for head in second.model.grid_heads.values():
        assert torch.equal(head.weight, first.model.vision_head.weight)


def image_batch(n=8, size=16):
    """A datamodule batch of rendered scenes (images in [-1, 1]) and their captions."""
    rng = random.Random(1)
    records = [shapes.sample_record(rng) for _ in range(n)]
    pixels = [np.asarray(shapes.render(r["scene"], size), dtype=np.float32) for r in records]
    images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2) / 127.5 - 1
    return {"image": images, "caption": [r["prompt"] for r in records]}


def test_sequences_of_a_batch_follow_the_task_mix(make_cfg, checkpoints, tmp_path):
    module = build_module(make_cfg, checkpoints, tmp_path, "model.task_mix.t2i=0.5", "model.task_mix.caption=0.5", "model.uncond_prob=0.5")
    batch = module.sequences(image_batch(64), random.Random(0))
    vocab = module.vocab
    first = batch["input_ids"].gather(1, (batch["attention_mask"] == 0).sum(1, keepdim=True))[:, 0]
    captioning = first == vocab.image_start
    assert 10 < int(captioning.sum()) < 54  # about half of 64
    labels = batch["labels"]
    targets_visual = vocab.is_visual(labels.clamp(min=0)) & (labels != -100)
    # text-to-image rows: every target is an image token; captioning rows: none is
    assert not targets_visual[captioning].any()
    assert all(bool((labels[row][labels[row] != -100] >= vocab.text_size).all()) for row in (~captioning).nonzero()[:, 0])
    eot = module.text_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    uncond = [row for row in (~captioning).nonzero()[:, 0] if batch["input_ids"][row].tolist().count(eot) == 2 and (batch["input_ids"][row] < vocab.text_size).sum() == 2]
    assert 5 < len(uncond) < 30  # about half of the text-to-image rows dropped to the unconditional prompt


def test_a_plan_restates_the_caption_before_the_image(make_cfg, checkpoints, tmp_path):
    module = build_module(make_cfg, checkpoints, tmp_path, "model.task_mix.caption=0", "model.uncond_prob=0")
    assert module.plan("a red circle") == "red circle" and module.pipeline().plan
    batch = image_batch(4)
    sequences = module.sequences(batch, random.Random(0))
    eot = module.text_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    for ids, mask, caption in zip(sequences["input_ids"], sequences["attention_mask"], batch["caption"]):
        text = ids[mask.bool()].tolist()
        text = text[: text.index(module.vocab.image_start)]
        assert text[-1] == eot and text.count(eot) == 3
        assert module.text_tokenizer.decode(text[text.index(eot, 1) + 1 : -1]) == restate_caption(caption)


@pytest.mark.parametrize("visual_expert", [True, False])
def test_gradients_reach_only_trainable_weights(make_cfg, checkpoints, tmp_path, visual_expert):
    module = build_module(make_cfg, checkpoints, tmp_path, f"model.visual_expert={visual_expert}", "model.task_mix.caption=0.5")
    loss = module(**module.sequences(image_batch(), random.Random(0))).loss
    loss.backward()
    for name, p in module.named_parameters():
        if name.startswith("model.llm.") and visual_expert:
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.requires_grad and p.grad is not None, name
    assert any(float(p.grad.abs().sum()) > 0 for n, p in module.named_parameters() if n.startswith("model.experts." if visual_expert else "model.llm."))


def test_text_logits_equal_the_llm_after_training(make_cfg, checkpoints, tmp_path):
    module = build_module(make_cfg, checkpoints, tmp_path, "model.task_mix.caption=0.5")
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        optimizer.zero_grad()
        module(**module.sequences(image_batch(), random.Random(step))).loss.backward()
        optimizer.step()
    llm = AutoModelForCausalLM.from_pretrained(checkpoints["llm"]).eval()
    ids = torch.randint(0, llm.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    module.eval()
    with torch.no_grad():
        logits = module(ids).logits
        assert_close(logits[..., : llm.config.vocab_size], llm(ids).logits)
        assert float(module.model.experts[0].mlp.down_proj.weight.sub(llm.model.layers[0].mlp.down_proj.weight).abs().max()) > 0


def test_restatement_corpus_puts_objects_in_reading_order():
    scene = {"objects": [{"color": "red", "shape": "circle"}, {"color": "blue", "shape": "square"}], "relation": "right of"}
    assert restatement(scene) == "blue square left of red circle"
    assert restatement({**scene, "relation": "above"}) == "red circle above blue square"
    assert restatement({"objects": scene["objects"][:1]}) == "red circle"
    record = {"prompt": "一个红色的圆形在一个蓝色的正方形的下面", "scene": {**scene, "relation": "below"}}
    assert corpus_text(record) == "一个红色的圆形在一个蓝色的正方形的下面<|endoftext|>blue square above red circle"
    assert restate_caption(record["prompt"]) == "blue square above red circle"
    blue, red = {"color": "blue", "shape": "square"}, {"color": "red", "shape": "circle"}
    assert parse_restatement("blue square above red circle") == {"objects": [blue, red], "relation": "above"}
    assert parse_restatement("red circle") == {"objects": [red]}
    with pytest.raises(ValueError, match="not a restatement"):
        parse_restatement("red circle below blue square")  # not canonical: the swap is the LM's job


def test_caption_correct_accepts_any_form_of_the_scene():
    scene = {"objects": [{"color": "red", "shape": "circle"}, {"color": "blue", "shape": "square"}], "relation": "right of"}
    record = {"scene": scene}
    for caption in ("a red circle right of a blue square", "one blue square left of one red circle",
                    "一个红色的圆形在一个蓝色的正方形的右边", "blue square left of red circle"):
        assert caption_correct(caption, record), caption
    for caption in ("red circle left of blue square", "a red circle", "a red circle right of a green square", "hello"):
        assert not caption_correct(caption, record), caption


class BuiltInSlices(L.Callback):
    """Before the first step of a ZeRO-3 run: every weight is split across the ranks, and
    gathered it holds what it should: the LLM its checkpoint's values, each visual expert a
    copy of its text layer, the visual embedding the mean text embedding."""

    def on_fit_start(self, trainer, pl_module):
        import deepspeed
        from safetensors.torch import load_file

        model, world = pl_module.model, trainer.world_size
        assert all(p.ds_tensor.numel() == -(-p.ds_numel // world) for p in model.parameters())
        saved = load_file(Path(pl_module.llm_path) / "model.safetensors")
        pairs = [(model.llm.model.embed_tokens.weight, None), (model.visual_embed.weight, None)]
        for expert, layer in zip(model.experts, model.llm.model.layers):
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                pairs += zip(getattr(expert, name).parameters(), getattr(layer.self_attn, name).parameters(), strict=True)
            pairs += zip(expert.mlp.parameters(), layer.mlp.parameters(), strict=True)
        with deepspeed.zero.GatheredParameters([p for pair in pairs for p in pair if p is not None]):
            text = model.llm.model.embed_tokens.weight
            assert torch.equal(text, saved["model.embed_tokens.weight"].to(text.dtype))
            assert torch.equal(model.visual_embed.weight[0], text.mean(0))
            for expert_weight, text_weight in pairs[2:]:
                assert torch.equal(expert_weight, text_weight)


def test_a_missing_model_directory_is_one_error_naming_its_option(make_cfg, checkpoints, tmp_path):
    """transformers would read a missing LLM directory as a hub repo id; the module refuses it first."""
    nowhere = tmp_path / "nowhere"
    failed = run_cli([*tiny_overrides(checkpoints, tmp_path), f"model.llm_path={nowhere}"], cwd=tmp_path, check=False)
    assert failed.returncode == 2
    assert failed.stderr.strip().splitlines()[-1] == (
        f"error: model.llm_path={nowhere}: no such directory (the text LLM: a Hugging Face causal LM directory with its tokenizer)")
    for option in ("model.tokenizer_path", "model.init_from"):
        with pytest.raises(hydra.errors.InstantiationException) as raised:
            train(make_cfg([*tiny_overrides(checkpoints, tmp_path), f"{option}={nowhere}"]))
        error = root_error(raised.value)
        assert isinstance(error, FileNotFoundError) and str(error).startswith(f"{option}={nowhere}: no such directory")


def test_deepspeed_zero3_two_cpu_processes_fit_save_and_resume(checkpoints, tmp_path):
    args = [
        "experiment=shapes_stage1", f"model.llm_path={checkpoints['llm']}", f"model.tokenizer_path={checkpoints['vq']}",
        f"data.train_shards={checkpoints['shards']}", "data.load_images=true", "data.load_codes=false",
        "data.resampled=true", "data.samples_per_epoch=64", "data.batch_size=8", "data.num_workers=0",
        "model.evaluator=null", "model.resolutions=[16x16]", "trainer.max_time=null",
        "trainer=deepspeed_zero3", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
    ]
    run_cli([*args, "trainer.max_steps=3", "callbacks.model_checkpoint.every_n_train_steps=3", "hydra.run.dir=first",
             "+callbacks.slices._target_=tests.test_t2i.BuiltInSlices"], cwd=tmp_path)
    checkpoint = tmp_path / "first" / "checkpoints" / "last.ckpt"
    assert checkpoint.is_dir()
    assert (tmp_path / "first" / "mars" / "mars.json").exists()
    run_cli([*args, "trainer.max_steps=5", f"ckpt_path={checkpoint}", "hydra.run.dir=second"], cwd=tmp_path)
    assert json.loads((tmp_path / "second" / "metrics.json").read_text())["global_step"] == 5
    MarsPipeline.from_pretrained(tmp_path / "second" / "mars").generate("a red circle", batch_size=1)


def test_shapes_lm_pretrains_on_the_restatement_corpus(make_cfg):
    cfg = make_cfg([
        "experiment=shapes_lm", "logger=csv", "trainer.max_steps=2", "trainer.val_check_interval=2",
        "data.make_missing.0.python.3=600", "data.make_missing.1.python.3=100",  # --num: small corpora
        "model.config.hidden_size=32", "model.config.intermediate_size=64", "model.config.num_hidden_layers=1",
        "model.config.num_attention_heads=2", "model.config.num_key_value_heads=2",
    ])
    assert train(cfg)["global_step"] == 2
    texts = [json.loads(line)["prompt"] for line in Path(cfg.data.train_files[0]).read_text().splitlines()]
    assert all(text.count("<|endoftext|>") == 1 for text in texts)
    tokenizer = AutoTokenizer.from_pretrained(Path(cfg.paths.output_dir) / "llm")
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert tokenizer(texts[0], add_special_tokens=False)["input_ids"].count(eot) == 1


class BatchesBuiltInWorkers(L.Callback):
    """Records whether each training batch arrived with its sequences already built."""

    seen: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        BatchesBuiltInWorkers.seen.append("input_ids" in batch and "labels" in batch)


def test_schedule_spans_the_declared_epochs_of_an_unsized_stream(make_cfg, checkpoints, tmp_path):
    """max_epochs with samples_per_epoch on a webdataset stream (no length of its own): the
    logged learning rate warms up, then decays to its floor at the last step; sequences are
    built in the DataLoader worker; held-out shards give val/loss."""
    codes = tmp_path / "codes"
    tokenize_shards(OmegaConf.create(dict(tokenizer=str(checkpoints["vq"]), input=str(checkpoints["shards"]), output=str(codes), batch_size=32, device="cpu", resolutions=["16x16"])))
    common = [
        *tiny_overrides(checkpoints, tmp_path), f"data.train_shards={codes}", "data.num_workers=1", "model.evaluator=null",
        "trainer.max_steps=-1", "trainer.max_epochs=2", "model.warmup_ratio=0.25", "model.min_lr_ratio=0.1",
    ]
    with pytest.raises(ValueError, match="set trainer.max_steps, or data.samples_per_epoch"):
        train(make_cfg(common))
    BatchesBuiltInWorkers.seen = []
    cfg = make_cfg([
        *common, "data.samples_per_epoch=64", f"data.val_shards={codes}", "+trainer.val_check_interval=8",
        "trainer.check_val_every_n_epoch=null", "logger=csv", "trainer.log_every_n_steps=1",
        "+callbacks.built._target_=tests.test_t2i.BatchesBuiltInWorkers",
    ])
    metrics = train(cfg)
    assert metrics["global_step"] == 16 and metrics["val/loss"] > 0  # 2 epochs x 64 samples / batch 8
    assert BatchesBuiltInWorkers.seen == [True] * 16
    rows = list(csv.DictReader(open(Path(cfg.paths.output_dir) / "csv" / "metrics.csv")))
    lrs = [float(r["lr-AdamW/pg1"]) for r in rows if r.get("lr-AdamW/pg1")]
    peak = cfg.model.optimizer.lr
    assert len(lrs) == 16
    assert lrs[:4] == sorted(lrs[:4]) and lrs[3] == pytest.approx(peak)
    assert lrs[4:] == sorted(lrs[4:], reverse=True)
    assert lrs[-1] == pytest.approx(peak * warmup_cosine(15, 16, 4, 0.1))


def test_a_codebook_other_than_the_tokenizers_is_refused_before_training(make_cfg, checkpoints, tmp_path):
    with pytest.raises(hydra.errors.InstantiationException, match="num_visual_codes=8192 but the VQ tokenizer"):
        build_module(make_cfg, checkpoints, tmp_path, "model.num_visual_codes=8192")


def test_paper_experiments_run_on_one_machine_with_trainer_cpu(make_cfg):
    for stage in ("stage1", "stage2"):
        cfg = make_cfg([f"experiment={stage}", "trainer=cpu"])
        assert cfg.trainer.devices == 1 and cfg.trainer.num_nodes == 1 and "strategy" not in cfg.trainer
        assert cfg.trainer.max_epochs == (1 if stage == "stage1" else 2)
