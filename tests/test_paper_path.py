"""The paper's path end to end on tiny stand-ins for its pieces, as a researcher would run it.

Stand-ins: a random Qwen2 config with the REAL Qwen tokenizer (151,643 entries) for Qwen-7B;
an f16 VQ tokenizer with 8,192 codes (the paper's factor and codebook, tiny channels); and
img2dataset-layout shards of photos of mixed sizes and aspect ratios (jpg and png, English and
Chinese captions) with broken members. The chain: tokenize_shards (stage I) -> stage1 ->
tokenize_shards (stage II) -> stage2 from stage I's weights -> generate at three trained
resolutions -> caption images of arbitrary size. Every stage I grid must be the training size,
every stage II grid one of the trained sizes, and broken samples counted, never a crash.
Then stage III: superres_shards (the same photos, low-res short side 32, high-res long side 64,
aspect ratio kept) -> stage3 from stage II's weights -> the cascade at one of stage II's sizes.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from transformers import AutoModelForCausalLM, Qwen2Config

from apps.generate import generate
from apps.superres_shards import superres_shards
from apps.tokenize_shards import REPORT, tokenize_shards
from apps.train import train
from mars_app.pipeline import MarsPipeline
from mars_data.tars import member, read_samples
from mars_semvie.text import qwen_tokenizer
from mars_superres import SuperResModel
from mars_tokenizer import VQGANConfig, VQTokenizer

SIZES = [(80, 60), (60, 90), (50, 50), (100, 40), (33, 47), (64, 64), (90, 45), (40, 70)]
CAPTIONS = ["a photo of a red car on a street", "一只猫坐在窗台上", "two people walking a dog", "夜晚城市的灯光"]
STAGE2 = ["32x32", "48x32", "32x48"]


def image_bytes(size: tuple[int, int], fmt: str, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def write_img2dataset_shard(path: Path, start: int, broken: bool) -> int:
    """A shard of 8 good samples (+3 broken ones); returns the number of good samples."""
    with tarfile.open(path, "w") as tar:
        def add(name, data):
            info, data = member(name, data)
            tar.addfile(info, io.BytesIO(data))

        for i, size in enumerate(SIZES):
            key, fmt = f"{start + i:09d}", ("JPEG", "PNG")[i % 2]
            add(f"{key}.{fmt.lower().replace('jpeg', 'jpg')}", image_bytes(size, fmt, start + i))
            add(f"{key}.txt", CAPTIONS[i % len(CAPTIONS)].encode())
            add(f"{key}.json", json.dumps({"url": f"https://example.com/{key}.jpg", "width": size[0], "height": size[1]}).encode())
        if broken:
            add(f"{start + 90:09d}.jpg", b"\xff\xd8 not really a jpeg")
            add(f"{start + 90:09d}.txt", b"a broken image")
            add(f"{start + 91:09d}.png", image_bytes((64, 64), "PNG", 1)[:300])  # truncated
            add(f"{start + 91:09d}.txt", "截断的图片".encode())
            add(f"{start + 92:09d}.txt", b"a caption without an image")
    return len(SIZES)


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("paper")
    tokenizer = qwen_tokenizer()
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=151_936, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=True,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "qwen")
    tokenizer.save_pretrained(root / "qwen")
    vq = VQGANConfig(
        resolution=32, patch_size=4, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(),
        z_channels=8, codebook_size=8192, codebook_dim=4, norm_groups=4,
    )
    VQTokenizer(vq).save_pretrained(root / "vqgan")
    (root / "shards").mkdir()
    good = sum(write_img2dataset_shard(root / "shards" / f"{n:05d}.tar", 100 * n, broken=n == 1) for n in range(2))
    return {"root": root, "llm": root / "qwen", "vq": root / "vqgan", "shards": root / "shards", "good": good}


def tokenize(stand_ins, out: Path, resolutions: list[str]) -> dict:
    tokenize_shards(OmegaConf.create(dict(
        tokenizer=str(stand_ins["vq"]), input=str(stand_ins["shards"]), output=str(out),
        batch_size=4, device="cpu", resolutions=resolutions,
    )))
    return json.loads((out / REPORT).read_text())


def grids(directory: Path) -> list[tuple[int, int]]:
    found = []
    for shard in sorted(directory.glob("*.tar")):
        for _, members in read_samples(shard):
            codes = [np.load(io.BytesIO(data)) for info, data in members if info.name.endswith(".codes.npy")]
            found += [tuple(c.shape) for c in codes]
    return found


def run(make_cfg, stand_ins, experiment: str, shards: Path, resolutions: list[str], *extra: str) -> Path:
    cfg = make_cfg([
        f"experiment={experiment}", "trainer=cpu", f"model.llm_path={stand_ins['llm']}",
        f"model.tokenizer_path={stand_ins['vq']}", f"data.train_shards={shards}", "data.batch_size=4",
        "data.num_workers=1", "data.shuffle_buffer=0", f"model.resolutions=[{','.join(resolutions)}]",
        "trainer.max_steps=4", "logger=csv", *extra,
    ])
    assert train(cfg)["global_step"] == 4
    return Path(cfg.paths.output_dir) / "mars"


def test_tokenize_stage1_stage2_generate_caption(make_cfg, stand_ins, tmp_path):
    # stage I: every image resized and centre-cropped to 32x32 -> 2x2 codes of 8,192
    report = tokenize(stand_ins, tmp_path / "codes1", ["32x32"])
    assert grids(tmp_path / "codes1") == [(2, 2)] * stand_ins["good"]
    assert report["skipped"] == {"unreadable image": 2, "no image member": 1}
    assert [e.split(": ")[0].rsplit("/", 2)[-2:] for e in report["skipped_examples"]["unreadable image"]] == [
        ["00001.tar", "000000190"], ["00001.tar", "000000191"]]
    stage1 = run(make_cfg, stand_ins, "stage1", tmp_path / "codes1", ["32x32"])
    assert json.loads((stage1 / "mars.json").read_text())["resolutions"] == ["32x32"]

    # stage II: each image to the size of its nearest aspect ratio (2.5 and 0.57 are cropped)
    report = tokenize(stand_ins, tmp_path / "codes2", STAGE2)
    assert report["skipped"] == {"unreadable image": 2, "no image member": 1}
    assert set(grids(tmp_path / "codes2")) == {(2, 2), (2, 3), (3, 2)}
    stage2 = run(make_cfg, stand_ins, "stage2", tmp_path / "codes2", STAGE2, f"model.init_from={stage1 / 'semvie'}",
                 "trainer.max_epochs=-1")
    exported = json.loads((stage2 / "mars.json").read_text())
    assert set(exported["resolutions"]) <= set(STAGE2) and exported["resolution_in_prompt"] and exported["row_end"]

    pipe = MarsPipeline.from_pretrained(stage2)
    assert pipe.vocab.num_codes == 8192
    for resolution in exported["resolutions"]:
        width, height = map(int, resolution.split("x"))
        (image,) = pipe.generate("一只猫坐在窗台上", resolution=resolution, batch_size=1)
        assert image.size == (width, height)

    # captioning: any size, broken files reported and skipped
    images = tmp_path / "photos"
    images.mkdir()
    Image.fromarray(np.zeros((37, 91, 3), dtype=np.uint8)).save(images / "wide.png")
    Image.fromarray(np.zeros((120, 45, 3), dtype=np.uint8)).save(images / "tall.jpg")
    (images / "broken.png").write_bytes(b"\x89PNG not an image")
    out = tmp_path / "captions.jsonl"
    generate(make_cfg([f"ckpt={stage2}", "task=caption", f"images={images}", f"out={out}", "max_new_tokens=4"], "generate"))
    rows = {r["image"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"wide.png", "tall.jpg"}
    assert rows["wide.png"]["resized"].startswith("91x37 -> ") and rows["tall.jpg"]["resized"].startswith("45x120 -> ")

    # stage III: (low-res codes, caption, high-res codes) triplets of the same photos, the paper's
    # experiment a few steps from stage II's weights, then the cascade writes the high-res images
    superres_shards(OmegaConf.create(dict(
        tokenizer=str(stand_ins["vq"]), input=str(stand_ins["shards"]), output=str(tmp_path / "triplets"),
        lowres_short_side=32, long_side=64, lowres_member=None, lowres_scale=1, keep_images=False,
        degradations={"blur": 0.0, "jpeg_quality": None, "round_trip": True}, batch_size=4, device="cpu",
    )))
    pairs = set()
    for _, members in read_samples(next((tmp_path / "triplets").glob("*.tar"))):
        codes = {info.name.split(".", 1)[1]: np.load(io.BytesIO(data)) for info, data in members if info.name.endswith(".codes.npy")}
        pairs.add((codes["lowres.codes.npy"].shape, codes["codes.npy"].shape))
    assert {((2, 2), (4, 4)), ((2, 3), (3, 4)), ((3, 2), (4, 3))} <= pairs  # (rows, columns): aspect ratio kept, long side 64 px
    cfg = make_cfg([
        "experiment=stage3", "trainer=cpu", f"model.base_path={stage2}", "model.long_side=64",
        f"data.train_shards={tmp_path / 'triplets'}", "data.batch_size=4", "data.num_workers=1", "data.shuffle_buffer=0",
        "trainer.max_steps=4", "trainer.max_epochs=-1", "logger=csv",
    ])
    assert train(cfg)["global_step"] == 4
    superres = Path(cfg.paths.output_dir) / "superres"
    assert SuperResModel.from_pretrained(superres).num_heads == 4  # the paper's K
    written = generate(make_cfg([
        f"ckpt={stage2}", f"superres={superres}", "prompt=a photo of a red car on a street", "resolution=48x32",
        f"out={tmp_path / 'cascade'}", "tokens_per_step=4", "decode=exact", "save_base=true",
    ], "generate"))
    assert Image.open(written["images"][0]).size == (64, 48)
    assert Image.open(tmp_path / "cascade" / "base" / "00000.png").size == (48, 32)
