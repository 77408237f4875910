"""The benchmark scorers and layouts (mars_app.evaluation) on tiny random models saved to disk."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from torch import nn
from transformers import (
    BertTokenizerFast, BlipConfig, BlipForQuestionAnswering, BlipImageProcessor, BlipProcessor, CLIPConfig,
    CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer,
)

from mars_app.evaluation.benchmarks import benchmark_plan
from mars_app.evaluation.clipscore import clip_score, load_clip
from mars_app.evaluation.compbench import BlipVQA, blip_vqa_score, split_noun_phrases
from mars_app.evaluation.fid import Preprocess, frechet_inception_distance
from mars_app.evaluation.geneval import check_layout, summarize_results
from mars_app.evaluation.inception import FIDInceptionV3

WORDS = "a an the red green blue cat dog bench bowl and photo of yes no".split()


# ------------------------------------------------------------------------ tiny models on disk
def save_tiny_clip(directory, seed: int = 0):
    """A random CLIP (hidden 16, 32x32 images) with a character-level CLIP tokenizer, saved by save_pretrained."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in "abcdefghijklmnopqrstuvwxyz":
        vocab[char], vocab[char + "</w>"] = len(vocab), len(vocab) + 1
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8,
    )
    processor = CLIPProcessor(CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}), tokenizer)
    CLIPModel(config).save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def save_tiny_blip(directory, seed: int = 0):
    """A random BLIP VQA (hidden 16, 32x32 images) with a word-level BERT tokenizer that has yes/no."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "?", *WORDS, "[DEC]"]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(str(directory / "vocab.txt"))
    torch.manual_seed(seed)
    config = BlipConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, encoder_hidden_size=16, bos_token_id=len(vocab) - 1,
                         pad_token_id=0, sep_token_id=3, initializer_range=0.5),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8,
    )
    BlipForQuestionAnswering(config).save_pretrained(directory)
    BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer).save_pretrained(directory)
    return directory


class PixelFeatures(nn.Module):
    """A tiny random feature network in float64: mean-pooled 4x4 image -> fixed random projection."""

    def __init__(self, features: int = 6, seed: int = 0):
        super().__init__()
        self.register_buffer("projection", torch.randn(48, features, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
        self.num_features = features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pooled = nn.functional.adaptive_avg_pool2d(images.double() / 255, 4)
        return torch.tanh(pooled.flatten(1) @ self.projection)


def random_images(folder, count: int, seed: int, shift: int = 0, size=(24, 20)):
    """``count`` random smooth images (png) in ``folder``; ``shift`` brightens every pixel."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        small = rng.integers(0, 200, (4, 4, 3)).astype(np.uint8)
        image = Image.fromarray(small).resize(size, Image.BILINEAR)
        pixels = np.clip(np.asarray(image).astype(int) + shift, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:04d}.png")
    return folder


# ------------------------------------------------------------------------------------- FID
def test_fid_of_a_set_against_itself_is_zero_and_grows_with_a_shift(tmp_path):
    real = random_images(tmp_path / "real", 40, seed=0)
    fid = lambda folder: frechet_inception_distance(folder, real, PixelFeatures(), "sha", batch_size=16)[0]
    same, near, far = fid(real), fid(random_images(tmp_path / "near", 40, seed=0, shift=20)), fid(random_images(tmp_path / "far", 40, seed=0, shift=60))
    assert abs(same) < 1e-6
    assert 1e-3 < near < far


def test_fid_equals_scipy_closed_form_on_the_same_features(tmp_path):
    real, fake = random_images(tmp_path / "real", 30, seed=1), random_images(tmp_path / "fake", 25, seed=2, size=(20, 30))
    preprocess = Preprocess(resize=64, crop="center", resample="bicubic")
    network = PixelFeatures(features=5, seed=3)
    ours, record = frechet_inception_distance(fake, real, network, "sha", preprocess, batch_size=7)
    assert record["images"] == 25 and record["reference_images"] == 30 and record["resize"] == 64

    def features(folder):
        images = [preprocess(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.png"))]
        return network(torch.stack(images)).numpy()

    a, b = features(real), features(fake)
    mu_a, mu_b, cov_a, cov_b = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * scipy.linalg.sqrtm(cov_a @ cov_b).real)
    assert ours == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert expected > 1e-3


def test_reference_statistics_are_cached_by_folder_protocol_and_weights(tmp_path):
    real, fake = random_images(tmp_path / "real", 12, seed=4), random_images(tmp_path / "fake", 10, seed=5)
    run = lambda **kw: frechet_inception_distance(fake, real, PixelFeatures(), kw.pop("sha", "w1"), cache_dir=tmp_path / "cache", **kw)
    first, record = run()
    again, cached = run()
    assert again == first and cached["reference_cache"] == record["reference_cache"]
    assert len(list((tmp_path / "cache").iterdir())) == 1
    run(sha="w2")  # other weights
    run(preprocess=Preprocess(resize=32))  # other protocol
    random_images(tmp_path / "extra", 1, seed=6)
    (tmp_path / "extra" / "0000.png").rename(real / "9999.png")  # other folder content
    changed, _ = run()
    assert len(list((tmp_path / "cache").iterdir())) == 4 and changed != first


def test_unreadable_images_are_skipped_and_reported(tmp_path):
    real, fake = random_images(tmp_path / "real", 6, seed=7), random_images(tmp_path / "fake", 6, seed=8)
    (fake / "0002.png").write_bytes(b"not a png")
    _, record = frechet_inception_distance(fake, real, PixelFeatures(), "sha")
    assert record["images"] == 5 and len(record["skipped"]) == 1 and "0002.png" in record["skipped"][0]


def test_preprocess_takes_the_centre_square_then_resizes():
    image = Image.new("RGB", (30, 10), "red")
    image.paste((0, 0, 255), (10, 0, 20, 10))  # the centre square is blue
    pixels = Preprocess(resize=16, crop="center", resample="nearest")(image)
    assert pixels.shape == (3, 16, 16) and pixels.dtype == torch.uint8
    assert (pixels[:, :, :] == torch.tensor([0, 0, 255], dtype=torch.uint8)[:, None, None]).all()
    assert Preprocess(resize=None, crop="none")(image).shape == (3, 10, 30)
    with pytest.raises(ValueError, match="fid.crop"):
        Preprocess(crop="random")


def test_fid_inception_loads_its_state_dict_layout_strictly(tmp_path):
    torch.manual_seed(0)
    network = FIDInceptionV3()
    state = network.state_dict()
    assert state["fc.weight"].shape == (1008, 2048) and "Mixed_7c.branch3x3dbl_3b.bn.running_var" in state
    assert not any("AuxLogits" in key for key in state)
    torch.save(state, tmp_path / "inception.pth")
    loaded = FIDInceptionV3.from_file(tmp_path / "inception.pth")
    images = torch.randint(0, 256, (2, 3, 40, 48), dtype=torch.uint8)
    features = loaded(images)
    assert features.shape == (2, 2048) and features.dtype == torch.float64
    torch.testing.assert_close(features, network(images))
    loaded.train()
    assert not loaded.training  # batch-norm statistics stay the reference's
    del state["fc.bias"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="not the FID Inception state dict"):
        FIDInceptionV3.from_file(tmp_path / "partial.pth")


# ------------------------------------------------------------------------------- CLIPScore
def test_clipscore_equals_a_direct_transformers_computation(tmp_path):
    directory = save_tiny_clip(tmp_path / "clip", seed=1)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)) for _ in range(5)]
    texts = ["a red cat", "a blue dog", "the green bench", "a photo of a bowl", "a cat and a dog"]
    model, processor = load_clip(directory)
    ours, count = clip_score(model, processor, zip(images, texts), batch_size=2)

    direct = CLIPModel.from_pretrained(directory).eval()
    inputs = CLIPProcessor.from_pretrained(directory)(text=texts, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = direct(**inputs)
    cosine = out.logits_per_image.diag() / direct.logit_scale.exp()
    assert count == 5
    assert abs(cosine.mean().item()) > 0.01  # a non-trivial value, not the clamp at 0
    assert ours == pytest.approx(max(100 * cosine.mean().item(), 0.0), rel=1e-5)


# ------------------------------------------------------------------------ T2I-CompBench
def test_blip_yes_probability_equals_the_model_s_own_first_answer_token(tmp_path):
    directory = save_tiny_blip(tmp_path / "blip")
    vqa = BlipVQA(directory)
    images = [Image.new("RGB", (40, 30), "red"), Image.new("RGB", (30, 30), "blue")]
    questions = ["a red cat?", "a blue bench?"]
    ours = vqa.yes_probability(images, questions)
    inputs = vqa.processor(images=images, text=questions, return_tensors="pt", padding=True)
    out = vqa.model.generate(**inputs, max_new_tokens=1, output_scores=True, return_dict_in_generate=True)
    probs = out.scores[0].softmax(-1)
    yes, no = vqa.processor.tokenizer.convert_tokens_to_ids(["yes", "no"])
    torch.testing.assert_close(ours, probs[:, yes] / (probs[:, yes] + probs[:, no]))
    assert 0 < ours.min() and ours.max() < 1 and abs(ours[0] - ours[1]) > 1e-4


def test_blip_vqa_score_is_the_mean_of_products_over_noun_phrases(tmp_path):
    vqa = BlipVQA(save_tiny_blip(tmp_path / "blip"))
    folder = tmp_path / "samples"
    folder.mkdir()
    items = []
    for index, (prompt, colour) in enumerate([("a red cat and a blue dog", "red"), ("a green bowl", "green")]):
        Image.new("RGB", (32, 32), colour).save(folder / f"{prompt}_{index:06d}.png")
        items.append((folder / f"{prompt}_{index:06d}.png", prompt))
    score, rows = blip_vqa_score(vqa, items, [], batch_size=2)
    red, green = Image.new("RGB", (32, 32), "red"), Image.new("RGB", (32, 32), "green")
    p = vqa.yes_probability([red, red, green], ["a red cat?", "a blue dog?", "a green bowl?"]).tolist()
    assert rows[0]["questions"] == ["a red cat?", "a blue dog?"]
    assert rows[0]["score"] == pytest.approx(p[0] * p[1], rel=1e-5) and rows[1]["score"] == pytest.approx(p[2], rel=1e-5)
    assert score == pytest.approx((p[0] * p[1] + p[2]) / 2, rel=1e-5)


def test_noun_phrases_of_compbench_prompts():
    assert split_noun_phrases("a green bench and a blue bowl") == ["a green bench", "a blue bowl"]
    assert split_noun_phrases("The fluffy pillow, a glass vase and a wooden table.") == ["the fluffy pillow", "a glass vase", "a wooden table"]
    assert split_noun_phrases("a sandwich") == ["a sandwich"]  # "and" only as a word


# ------------------------------------------------------------------------------- layouts
def test_coco_layout_from_llamagen_csv_and_coco_json(tmp_path):
    with open(tmp_path / "coco_captions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerows([["Prompt"], ["A man riding a horse."], ["Two cats, one dog"], ["A red bus"]])
    plan = benchmark_plan("coco", tmp_path / "coco_captions.csv", images_per_prompt=2, limit=2)
    assert plan.images == [("samples/000000.png", "A man riding a horse."), ("samples/000001.png", "A man riding a horse."),
                           ("samples/000002.png", "Two cats, one dog"), ("samples/000003.png", "Two cats, one dog")]
    rows = [json.loads(line) for line in plan.files["captions.jsonl"].splitlines()]
    assert rows[2] == {"image": "samples/000002.png", "prompt": "Two cats, one dog"}
    annotations = {"annotations": [{"image_id": 9, "id": 5, "caption": "a  dog\n"}, {"image_id": 3, "id": 7, "caption": "later"},
                                   {"image_id": 3, "id": 2, "caption": "first"}, {"image_id": 9, "id": 6, "caption": "second"}]}
    (tmp_path / "captions_val2014.json").write_text(json.dumps(annotations))
    assert [p for _, p in benchmark_plan("coco", tmp_path / "captions_val2014.json").images] == ["first", "a dog"]


def test_compbench_layout_is_what_its_scorers_parse(tmp_path):
    (tmp_path / "color_val.txt").write_text("a green bench and a blue bowl\na red cat and a blue dog\n\n")
    (tmp_path / "non_spatial_val.txt").write_text("A dog is playing with a chew toy.\n")
    plan = benchmark_plan("compbench", tmp_path, images_per_prompt=3)
    color = [name for name, _ in plan.images if name.startswith("color/samples/")]
    assert color[0] == "color/samples/a green bench and a blue bowl_000000.png" and len(color) == 6
    files = [name.split("/")[-1] for name in color]
    # the official scorers: prompt = name.split('_')[0], order = int(name.split('_')[-1].split('.')[0])
    assert [int(f.split("_")[-1].split(".")[0]) for f in files] == list(range(6))
    assert [f.split("_")[0] for f in files] == ["a green bench and a blue bowl"] * 3 + ["a red cat and a blue dog"] * 3
    assert ("non_spatial/samples/A dog is playing with a chew toy._000002.png", "A dog is playing with a chew toy.") in plan.images
    assert len(benchmark_plan("compbench", tmp_path / "color_val.txt", limit=1).images) == 10  # the protocol's 10 per prompt
    (tmp_path / "bad_val.txt").write_text("a cat_dog\n")
    with pytest.raises(ValueError, match=r"bad_val.txt:1: a prompt with '_'"):
        benchmark_plan("compbench", tmp_path)


def test_geneval_layout_is_what_its_scorer_reads(tmp_path):
    rows = [{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
            {"tag": "position", "include": [{"class": "dog", "count": 1, "position": ["right of", 0]}], "exclude": [],
             "prompt": "a photo of a dog right of a cat"}]
    (tmp_path / "evaluation_metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plan = benchmark_plan("geneval", tmp_path / "evaluation_metadata.jsonl")
    assert [name for name, _ in plan.images[:5]] == [*(f"00000/samples/{j:04d}.png" for j in range(4)), "00001/samples/0000.png"]
    assert json.loads(plan.files["00001/metadata.jsonl"]) == rows[1]  # its scorer json.load()s the file
    assert all(re.match(r"\d+\.png", name.split("/")[-1]) for name, _ in plan.images)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a cat"}\n')
    with pytest.raises(ValueError, match="bad.jsonl: prompt 1: a GenEval metadata row needs tag, include"):
        benchmark_plan("geneval", tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="unknown benchmark 'parti'"):
        benchmark_plan("parti", tmp_path / "bad.jsonl")


def test_geneval_summary_follows_its_summary_scores(tmp_path):
    rows = [("single_object", "m1", True), ("single_object", "m1", False), ("single_object", "m2", True), ("single_object", "m2", True),
            ("position", "m3", False), ("position", "m3", False)]
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps({"tag": t, "metadata": m, "correct": c}) + "\n" for t, m, c in rows))
    scores = summarize_results(path)
    assert scores["single_object"] == 0.75 and scores["position"] == 0.0 and scores["overall"] == 0.375
    assert scores["correct_images"] == pytest.approx(0.5) and scores["correct_prompts"] == pytest.approx(2 / 3)
    (tmp_path / "00000").mkdir()
    with pytest.raises(ValueError, match="no metadata.jsonl"):
        check_layout(tmp_path)
