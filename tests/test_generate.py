"""MarsPipeline (checkpoint directory, generate, caption) and apps/generate.py, on tiny models."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

from apps.generate import generate
from mars_data.shapes import read_prompts
from mars_app.pipeline import CONFIG_NAME, MarsPipeline
from mars_semvie import SemVIEForCausalLM
from mars_semvie.vocab import ENDOFTEXT
from mars_tokenizer import VQGANConfig, VQTokenizer
from tests.conftest import ROOT

WORDS = "a one an image of red blue green circle square triangle left right above below there is".split()
PROMPTS = ["a red circle", "one blue square left of a green triangle", "an image of a blue circle"]


def tiny_text_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer of the shapes words (the Qwen one takes seconds to convert)."""
    vocab = {word: i for i, word in enumerate([ENDOFTEXT, "[UNK]", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=ENDOFTEXT, pad_token=ENDOFTEXT, unk_token="[UNK]")


def tiny_pipeline(seed: int = 0, **kwargs) -> MarsPipeline:
    """A random SemVIE (2 layers, hidden 32) + a random VQ tokenizer (downsample 4, 32 codes)."""
    text_tokenizer = tiny_text_tokenizer()
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(text_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3,
    )
    vq = VQTokenizer(VQGANConfig.from_preset("tiny")).eval()
    model = SemVIEForCausalLM.from_llm(AutoModelForCausalLM.from_config(config), vq.codebook_size)
    with torch.no_grad():  # a visual side away from its initialisation: codes differ by prompt
        for name, p in model.named_parameters():
            if not name.startswith("llm."):
                p.add_(torch.randn(p.shape) * 0.5)
    return MarsPipeline(model, vq, text_tokenizer, **{"resolutions": ["16x16"], **kwargs})


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A saved stage I checkpoint (16x16 images, 4x4 codes), sampling with temperature by default."""
    pipeline = tiny_pipeline(sampling={"cfg_scale": 2.0, "temperature": 1.0})
    return pipeline.save_pretrained(tmp_path_factory.mktemp("ckpt") / "mars")


@pytest.fixture(scope="module")
def pipeline(ckpt):
    return MarsPipeline.from_pretrained(ckpt)


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(image) for image in images])


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": p, "lang": "en"} for p in PROMPTS]
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n")
    return path


# --------------------------------------------------------------------------- the pipeline
def test_checkpoint_round_trip_draws_the_same_images(ckpt, pipeline):
    assert sorted(p.name for p in ckpt.iterdir()) == [CONFIG_NAME, "semvie", "text_tokenizer", "tokenizer"]
    config = json.loads((ckpt / CONFIG_NAME).read_text())
    assert config["resolutions"] == ["16x16"] and config["sampling"]["cfg_scale"] == 2.0
    original = tiny_pipeline(sampling={"cfg_scale": 2.0, "temperature": 1.0})
    images = original.generate(PROMPTS, seed=3)
    assert [image.size for image in images] == [(16, 16)] * 3
    np.testing.assert_array_equal(pixels(images), pixels(pipeline.generate(PROMPTS, seed=3)))
    assert original.caption(images) == pipeline.caption(images)


def test_a_prompt_draws_the_same_image_in_any_batch(pipeline):
    together = pipeline.generate(PROMPTS, seed=7, batch_size=3)
    one_by_one = pipeline.generate(PROMPTS, seed=7, batch_size=1)
    np.testing.assert_array_equal(pixels(together), pixels(one_by_one))
    np.testing.assert_array_equal(pixels(together[1:]), pixels(pipeline.generate(PROMPTS[1:], seed=8)))
    assert len({image.tobytes() for image in together}) > 1
    assert pixels(pipeline.generate(PROMPTS, seed=8)).tobytes() != pixels(together).tobytes()


def test_kv_cache_off_draws_the_same_greedy_images(pipeline):
    cached = pipeline.generate(PROMPTS, temperature=0.0, kv_cache=True)
    recomputed = pipeline.generate(PROMPTS, temperature=0.0, kv_cache=False)
    np.testing.assert_array_equal(pixels(cached), pixels(recomputed))


def test_stage_two_draws_the_requested_resolution():
    pipeline = tiny_pipeline(resolutions=["16x16", "24x16"], resolution_in_prompt=True, row_end=True)
    assert pipeline.generate("a red circle")[0].size == (16, 16)
    wide = pipeline.generate(["a red circle", "a blue square"], resolution="24x16")
    assert [image.size for image in wide] == [(24, 16)] * 2
    assert pipeline.caption(wide)[0]  # captions an image of a trained, non-default size
    with pytest.raises(ValueError, match="unknown resolution 32x16: this model draws 16x16, 24x16"):
        pipeline.generate("a red circle", resolution="32x16")
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        pipeline.generate("a red circle", resolution="wide")


def test_a_plan_is_the_text_llm_s_own_continuation_and_the_image_follows_it(tmp_path):
    pipeline = tiny_pipeline(plan=True)
    eot = pipeline.eot
    prompts = [[eot, *pipeline.text_tokenizer(p)["input_ids"], eot] for p in PROMPTS]
    planned = pipeline.write_plans(prompts, max_new_tokens=5)
    for prompt, ids in zip(prompts, planned):
        llm = pipeline.model.llm.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False, eos_token_id=eot, pad_token_id=eot)
        continuation = llm[0, len(prompt) :].tolist()
        assert ids == prompt + continuation[: continuation.index(eot) if eot in continuation else 5] + [eot]
    loaded = MarsPipeline.from_pretrained(pipeline.save_pretrained(tmp_path / "mars"))
    assert loaded.plan and json.loads((tmp_path / "mars" / CONFIG_NAME).read_text())["plan"] is True
    images = pixels(pipeline.generate(PROMPTS, temperature=0.0))
    np.testing.assert_array_equal(images, pixels(loaded.generate(PROMPTS, temperature=0.0)))
    assert images.tobytes() != pixels(tiny_pipeline().generate(PROMPTS, temperature=0.0)).tobytes()


def test_captions_are_text_until_end_of_text(pipeline):
    images = pipeline.generate(PROMPTS)
    captions = pipeline.caption(images, max_new_tokens=6)
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)
    assert all(set(c.split()) <= set(WORDS) | {"[UNK]"} for c in captions)  # text ids only, no specials
    assert pipeline.caption(images, max_new_tokens=6, kv_cache=False) == captions


def test_pipeline_refuses_bad_input(tmp_path, ckpt, pipeline):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        pipeline.generate(["a red circle", "  "])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MarsPipeline.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / CONFIG_NAME).write_text("{}")
    with pytest.raises(FileNotFoundError, match="missing semvie, tokenizer, text_tokenizer"):
        MarsPipeline.from_pretrained(tmp_path / "partial")
    with pytest.raises(FileNotFoundError, match="pass llm_path=<its directory> if it moved"):
        MarsPipeline.from_pretrained(ckpt, llm_path=str(tmp_path / "moved"))
    with pytest.raises(ValueError, match="unknown resolution 8x8"):
        pipeline.generate("a red circle", resolution="8x8")


def test_captioning_fits_any_image_to_a_trained_size(pipeline):
    photo = Image.new("RGB", (90, 30), "white")
    photo.paste((255, 0, 0), (30, 0, 60, 30))
    prepared = pipeline.prepare(photo)
    assert prepared.size in pipeline.resolutions
    assert torch.equal(pipeline.encode(photo), pipeline.encode(prepared))
    assert pipeline.caption(photo) == pipeline.caption(prepared)


# ------------------------------------------------------------------------------- the app
def test_generate_app_writes_images_in_row_order_and_a_grid(make_cfg, tmp_path, ckpt, pipeline, prompt_file):
    out = tmp_path / "images"
    cfg = make_cfg([f"ckpt={ckpt}", f"prompts={prompt_file}", f"out={out}", "seed=10", "batch_size=2", "grid=true"], "generate")
    result = generate(cfg)
    assert [p.name for p in result["images"]] == ["00000.png", "00001.png", "00002.png"]
    for index, (path, prompt) in enumerate(zip(result["images"], PROMPTS)):
        alone = pipeline.generate(prompt, seed=10 + index)  # row i draws with seed + i
        np.testing.assert_array_equal(np.asarray(Image.open(path)), pixels(alone)[0])
    with Image.open(result["grid"]) as grid:
        assert grid.width == 3 * 128 and grid.height > 128  # 16 px images enlarged 8x, labels under them


def test_generate_app_takes_one_prompt_and_sampling_options(make_cfg, tmp_path, ckpt, pipeline):
    options = ["cfg_scale=1.0", "temperature=0.5", "top_k=5", "top_p=0.9", "seed=4", "kv_cache=false"]
    cfg = make_cfg([f"ckpt={ckpt}", "prompt=one blue square left of a green triangle", f"out={tmp_path}", *options], "generate")
    [path] = generate(cfg)["images"]
    expected = pipeline.generate(PROMPTS[1], cfg_scale=1.0, temperature=0.5, top_k=5, top_p=0.9, seed=4)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), pixels(expected)[0])


def test_caption_app_writes_one_row_per_image(make_cfg, tmp_path, ckpt, pipeline):
    images = pipeline.generate(PROMPTS)
    for index, image in enumerate(images):
        image.save(tmp_path / f"{index:05d}.png")
    out = tmp_path / "captions.jsonl"
    cfg = make_cfg([f"ckpt={ckpt}", "task=caption", f"images={tmp_path}", f"out={out}", "max_new_tokens=6"], "generate")
    generate(cfg)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["image"] for r in rows] == ["00000.png", "00001.png", "00002.png"]
    assert [r["caption"] for r in rows] == pipeline.caption(images, max_new_tokens=6)
    assert "resized" not in rows[0]


def test_caption_app_fits_other_sizes_and_skips_unreadable_files(make_cfg, tmp_path, ckpt, pipeline):
    Image.new("RGB", (50, 30), "blue").save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"not a png")
    out = tmp_path / "captions.jsonl"
    cfg = make_cfg([f"ckpt={ckpt}", "task=caption", f"images={tmp_path}", f"out={out}", "max_new_tokens=4"], "generate")
    generate(cfg)
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    width, height = pipeline.prepare(Image.new("RGB", (50, 30))).size
    assert row["image"] == "a.png" and row["resized"] == f"50x30 -> {width}x{height}"


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (["ckpt={tmp}/nowhere", "prompt=a red circle"], FileNotFoundError, "does not exist"),
        (["ckpt={ckpt}", "prompt=' '"], ValueError, "empty"),
        (["ckpt={ckpt}"], ValueError, "exactly one of prompts"),
        (["ckpt={ckpt}", "prompts={tmp}/bad.jsonl"], ValueError, r"bad.jsonl:2: not a JSON line"),
        (["ckpt={ckpt}", "prompts={tmp}/no_prompt.jsonl"], ValueError, r'no_prompt.jsonl:1: a row needs a non-empty "prompt"'),
        (["ckpt={ckpt}", "prompts={tmp}/missing.jsonl"], FileNotFoundError, "prompt file"),
        (["ckpt={ckpt}", "prompt=a red circle", "resolution=32x32"], ValueError, "unknown resolution 32x32"),
        (["ckpt={ckpt}", "task=caption"], ValueError, "images=DIR"),
        (["ckpt={ckpt}", "task=draw"], ValueError, "unknown task"),
    ],
)
def test_generate_app_errors(make_cfg, tmp_path, ckpt, overrides, error, match):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a red circle"}\n{"prompt": \n')
    (tmp_path / "no_prompt.jsonl").write_text('{"caption": "a red circle"}\n')
    cfg = make_cfg([o.format(tmp=tmp_path, ckpt=ckpt) for o in overrides], "generate")
    with pytest.raises(error, match=match):
        generate(cfg)


def test_read_prompts_skips_blank_lines(prompt_file):
    assert [record["prompt"] for record in read_prompts(prompt_file)] == PROMPTS


@pytest.mark.slow
def test_generate_command_line_with_a_chinese_prompt(tmp_path, ckpt):
    """The documented command, end to end in a subprocess (non-ASCII prompts are quoted for Hydra)."""
    command = [sys.executable, "apps/generate.py", f"ckpt={ckpt}", 'prompt="一个红色的圆形"', f"out={tmp_path}", "grid=true"]
    subprocess.run(command, cwd=ROOT, check=True, env={"MARS_ROOT": str(tmp_path), "PATH": ""})
    assert (tmp_path / "00000.png").is_file() and (tmp_path / "grid.png").is_file()


@pytest.mark.parametrize("app", ["generate.py", "evaluate.py", "tokenize_shards.py", "superres_shards.py"])
def test_apps_that_train_nothing_import_no_lightning(app):
    # importing Lightning costs 2.5-5 s in every process, about half of a short demo step
    code = (
        "import runpy, sys\n"
        f"sys.argv = [{str(ROOT / 'apps' / app)!r}, '--help']\n"
        "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "print('lightning' in sys.modules, 'lightning.pytorch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "False False"
