"""The web demo (apps/serve.py, mars_app.serve) served over HTTP on a tiny checkpoint and driven
through its API with gradio_client, as any client of the page's endpoints would."""

from __future__ import annotations

import socket
import time
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from gradio_client.utils import Status
from PIL import Image

from apps.serve import serve
from mars_app.cascade import SuperResPipeline
from mars_app.pipeline import MarsPipeline
from mars_app.serve import build_app, launch, nearest_resolution
from tests.conftest import compose_config
from tests.test_generate import tiny_pipeline
from tests.test_superres_app import world  # noqa: F401  (a stage II checkpoint at 16x16 and a stage III one over it)
from tests.test_t2i import checkpoints  # noqa: F401  (world's tiny LLM and VQ)

EN, ZH = "one blue square left of a green triangle", "一个红色的圆形"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def stage2_ckpt(tmp_path_factory):
    """A stage II checkpoint that plans: two sizes (16x16 first), resolution in the prompt, row ends."""
    pipeline = tiny_pipeline(
        resolutions=["16x16", "24x16", "64x64"], resolution_in_prompt=True, row_end=True, plan=True,
        sampling={"cfg_scale": 2.0, "temperature": 1.0, "top_k": 20, "top_p": 0.9},
    )
    return pipeline.save_pretrained(tmp_path_factory.mktemp("ckpt") / "mars")


@pytest.fixture(scope="module")
def pipeline(stage2_ckpt):
    return MarsPipeline.from_pretrained(stage2_ckpt)


@contextmanager
def running_server(ckpt, run_dir, *overrides: str) -> Iterator[str]:
    """apps/serve.py's serve() on a free port, in this process; yields its URL."""
    port = free_port()
    app = serve(compose_config([f"ckpt={ckpt}", f"port={port}", *overrides], run_dir, "serve"), block=False)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        app.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, stage2_ckpt):
    with running_server(stage2_ckpt, tmp_path_factory.mktemp("run"), "max_images=3") as url:
        yield url


@pytest.fixture(scope="module")
def client(server, tmp_path_factory):
    return Client(server, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))


def draw(client, prompt, resolution="16x16", cfg_scale=2.0, temperature=1.0, top_k=20, top_p=0.9, seed=0, number=1):
    return client.predict(prompt, resolution, cfg_scale, temperature, top_k, top_p, seed, number, api_name="/draw")


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_draws_english_at_the_requested_size_with_the_plan(client, pipeline):
    gallery, plan = draw(client, EN, resolution="24x16", seed=5, number=2)
    assert [item["caption"] for item in gallery] == ["seed 5", "seed 6"]
    images = [Image.open(item["image"]) for item in gallery]
    assert [image.size for image in images] == [(24, 16)] * 2
    # the checkpoint's sampling defaults; one per batch as the server draws (batches differ in the last bit)
    expected = pipeline.generate([EN, EN], seed=5, resolution="24x16", batch_size=1)
    for got, want in zip(images, expected):
        np.testing.assert_array_equal(pixels(got), pixels(want))
    # the plan is the frozen LLM's own greedy continuation of the prompt the pipeline builds
    tokenizer, eot = pipeline.text_tokenizer, pipeline.eot
    prompt = [eot, *tokenizer(EN)["input_ids"], eot]  # the resolution follows the plan
    continued = pipeline.model.llm.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=eot, pad_token_id=eot)
    written = continued[0, len(prompt) :].tolist()
    assert plan == tokenizer.decode(written[: written.index(eot)] if eot in written else written, skip_special_tokens=True).strip()


def test_draws_chinese_and_honours_the_sampling_options(client, pipeline):
    gallery, _ = draw(client, ZH, cfg_scale=1.0, temperature=0.0, top_k=0, top_p=1.0, seed=3)
    [image] = [Image.open(item["image"]) for item in gallery]
    assert image.size == (16, 16)
    greedy = pipeline.generate(ZH, cfg_scale=1.0, temperature=0.0, seed=3)[0]
    np.testing.assert_array_equal(pixels(image), pixels(greedy))
    sampled = pipeline.generate(ZH, seed=3)[0]  # the defaults (temperature 1) draw something else
    assert pixels(sampled).tobytes() != pixels(greedy).tobytes()


def test_the_progress_bar_counts_the_images(client):
    job = client.submit(EN, "64x64", 2.0, 1.0, 20, 0.9, 0, 3, api_name="/draw")  # 64x64: long enough to watch
    progress = set()
    while not job.done():
        progress |= {(p.desc, p.index, p.length) for p in job.status().progress_data or []}
        time.sleep(0.01)
    assert len(job.result()[0]) == 3
    assert progress and all(desc == "generating" and length == 3 for desc, _, length in progress)


def test_requests_wait_for_the_one_model(stage2_ckpt, pipeline, tmp_path):
    """A caption sent while a drawing runs starts only after it (run side by side, it would end first).

    The order is read on the server: the served pipeline notes when each model call starts and ends
    (the client's status of two jobs can lag one another, so it cannot tell)."""
    served = MarsPipeline.from_pretrained(stage2_ckpt)
    calls = []

    def noted(name, method):
        def call(*args, **kwargs):
            start = time.monotonic()
            try:
                return method(*args, **kwargs)
            finally:
                calls.append((name, start, time.monotonic()))
        return call

    served.generate, served.caption = noted("draw", served.generate), noted("caption", served.caption)
    port = free_port()
    app = launch(build_app(served), port=port, block=False)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=str(tmp_path / "downloads"))
        pipeline.generate(EN)[0].save(tmp_path / "image.png")
        drawing = client.submit(EN, "64x64", 2.0, 1.0, 20, 0.9, 0, 3, api_name="/draw")
        while drawing.status().code not in (Status.PROCESSING, Status.PROGRESS):
            assert not drawing.done()
            time.sleep(0.005)
        captioning = client.submit(handle_file(str(tmp_path / "image.png")), api_name="/caption")
        assert drawing.result() and captioning.result()
    finally:
        app.close()
    (first, _, drawn), (second, started, _) = sorted(calls, key=lambda call: call[1])
    assert (first, second) == ("draw", "caption") and started >= drawn


def test_captions_an_upload_resized_to_the_nearest_trained_size(client, pipeline, tmp_path):
    wide = pipeline.generate(EN, resolution="24x16")[0].resize((60, 40))
    wide.save(tmp_path / "wide.png")
    caption, note = client.predict(handle_file(str(tmp_path / "wide.png")), api_name="/caption")
    assert "60x40: resized to 24x16" in note
    assert caption == pipeline.caption(wide.resize((24, 16), Image.Resampling.LANCZOS))[0]
    square = pipeline.generate(EN)[0]
    square.save(tmp_path / "square.png")
    caption, note = client.predict(handle_file(str(tmp_path / "square.png")), api_name="/caption")
    assert note == "The image is 16x16, a size this model was trained on." and caption == pipeline.caption(square)[0]
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(AppError, match=r"the uploaded image notes.png: not a readable image \(cannot identify"):
        client.predict(handle_file(str(tmp_path / "notes.png")), api_name="/caption")
    with pytest.raises(AppError, match="No image: upload one to caption"):
        client.predict(None, api_name="/caption")


@pytest.mark.parametrize(
    "prompt, options, message",
    [
        ("  ", {}, "The prompt is empty: write what to draw"),
        (EN, {"resolution": "32x32"}, r"Value: 32x32 is not in the list of choices: \['16x16', '24x16', '64x64'\]"),
        (EN, {"number": 4}, "Value 4 is greater than maximum value 3"),
    ],
)
def test_bad_requests_get_one_clear_message(client, prompt, options, message):
    with pytest.raises(AppError, match=message):
        draw(client, prompt, **options)


def test_serves_the_cascade_each_high_res_image_beside_its_base(world, tmp_path):
    with running_server(world["base"], tmp_path / "run", f"superres={world['superres']}") as url:
        client = Client(url, verbose=False, download_files=str(tmp_path / "downloads"))

        def draw_cascade(K, mode):  # greedy, two images (seeds 4 and 5)
            gallery, _, note = client.predict("a red circle", "16x16", 1.5, 0.0, 0, 1.0, 4, 2, K, mode, api_name="/draw")
            return [Image.open(item["image"]) for item in gallery], [item["caption"] for item in gallery], note

        exact, captions, note = draw_cascade(4, "exact")
        assert captions == ["seed 4: 32x32", "seed 4: base 16x16", "seed 5: 32x32", "seed 5: base 16x16"]
        assert [image.size for image in exact] == [(32, 32), (16, 16)] * 2
        assert note.startswith("Super-resolution, K=4 exact: ") and "mean accepted length" in note
        one, _, note = draw_cascade(1, "exact")
        for a, b in zip(exact, one):  # greedy exact decoding is K=1 decoding, token for token
            np.testing.assert_array_equal(pixels(a), pixels(b))
        assert note == "Super-resolution, K=1 exact: 146 forward passes for 146 tokens."  # 73 slots per image
        _, _, note = draw_cascade(4, "fast")
        assert note == "Super-resolution, K=4 fast: 38 forward passes for 146 tokens."  # ceil(73 / 4) per image


def test_a_cascade_without_a_size_in_common_or_checkpoint_is_refused(world, make_cfg, tmp_path):
    superres = SuperResPipeline.from_pretrained(world["superres"])
    superres.lowres = [(8, 8)]
    with pytest.raises(ValueError, match="the super-resolution model reads 8x8; the checkpoint draws 16x16: no size in common"):
        build_app(MarsPipeline.from_pretrained(world["base"]), superres=superres)
    with pytest.raises(FileNotFoundError, match="super-resolution checkpoint directory .*nowhere does not exist"):
        serve(make_cfg([f"ckpt={world['base']}", f"superres={tmp_path}/nowhere"], "serve"), block=False)


def test_nearest_resolution_takes_the_aspect_ratio_then_the_area():
    sizes = [(64, 64), (96, 64), (64, 96), (128, 128)]
    assert nearest_resolution((300, 200), sizes) == (96, 64)
    assert nearest_resolution((20, 30), sizes) == (64, 96)
    assert nearest_resolution((70, 70), sizes) == (64, 64)
    assert nearest_resolution((1000, 1000), sizes) == (128, 128)
