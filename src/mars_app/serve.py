"""The web demo: draw and caption in the browser, a Gradio app over one ``MarsPipeline``.

``build_app(pipeline, examples)`` returns the ``gr.Blocks`` page; ``launch(app, host, port)``
serves it over HTTP (``apps/serve.py`` is the command). Tests build the app on a tiny checkpoint
and drive it through its HTTP API and in a headless browser.

Design choices:
- **One model, one job at a time.** The caller loads one pipeline; both events (draw, caption)
  share one concurrency group of size 1, so requests wait in Gradio's queue instead of running
  the model side by side (which would only split the same cores or GPU between them).
- **Options come from the checkpoint.** The resolution choices are the checkpoint's trained
  sizes (mars.json ``resolutions``, the first one preselected) and the sampling controls start
  at its ``sampling`` defaults; nothing is re-derived here. A size the model was not trained
  on is refused by the dropdown with the list of sizes it draws.
- **Same images as the command line.** Image i of a request draws with ``seed + i``, as in
  ``apps/generate.py`` (``MarsPipeline.generate`` seeds each prompt by its index), so a picture
  in the browser can be reproduced with ``python apps/generate.py ... seed=S``. They are drawn
  one per batch so that the progress bar (Gradio following the pipeline's tqdm bar) moves
  after every image.
- **The plan beside the image.** A checkpoint whose mars.json says ``plan`` first writes the
  scene's layout as text (greedy, so the same for every image of a request); the page shows
  that text, written by ``MarsPipeline.write_plans`` on the prompt the pipeline builds.
- **Captions of any image.** An uploaded image is read by ``mars_data.images.load_image`` (the
  one image reader: refuses decompression bombs; Gradio's own decoding of the input is off),
  resized to the trained size nearest in
  aspect ratio, then in area, and the answer says when it was resized and to what.
- **The cascade, when given one.** With a super-resolution checkpoint (``superres``, stage III)
  every drawn image is also upscaled (``mars_app.cascade.Cascade``, the path of
  ``apps/generate.py superres=DIR``) and the gallery shows each high-res image beside its base
  image. The sizes offered are those the base draws and the super-resolution model reads;
  ``tokens_per_step`` (K, up to the model's heads) and the decoding mode (exact: K=1's output,
  fewer passes; fast: K codes per pass) are controls, and the page says how many forward
  passes the decoding took.
- **Errors are one line.** An empty prompt, an unreadable upload or an unknown size raise
  ``gr.Error`` with a message saying what to change; the page shows it, API clients get it.
- **Offline.** Analytics (and their version check) are off and the theme's fonts are Gradio's
  bundled ones; Chinese renders with the system's CJK font (fonts-noto-cjk: ``make system-deps``).
"""

from __future__ import annotations

import math
from typing import Sequence

import gradio as gr
from PIL import Image

from mars_app.cascade import Cascade, SuperResPipeline
from mars_app.pipeline import MarsPipeline
from mars_data.images import ImageError, load_image
from mars_semvie.sequences import encode_prompt, resolution_text
from mars_superres.decoding import MODES

# small images (the shapes world draws 64x64) enlarged with visible pixels, not blurred
CSS = "#images img { image-rendering: pixelated; }"
MODEL_JOBS = "model"  # the one concurrency group of every event that runs the model


def nearest_resolution(size: tuple[int, int], resolutions: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The trained (width, height) closest to ``size`` in aspect ratio, then in pixel count."""
    width, height = size
    return min(
        resolutions,
        key=lambda r: (abs(math.log(r[0] / r[1] * height / width)), abs(math.log(r[0] * r[1] / (width * height)))),
    )


def plan_text(pipeline: MarsPipeline, prompt: str) -> str:
    """The layout text the model writes after ``prompt`` before drawing (``plan`` checkpoints);
    the resolution follows the plan, so it does not depend on the size (mars_semvie.sequences)."""
    ids = encode_prompt(pipeline.text_tokenizer, prompt)
    [planned] = pipeline.write_plans([ids])
    return pipeline.text_tokenizer.decode(planned[len(ids) : -1], skip_special_tokens=True).strip()


def build_app(
    pipeline: MarsPipeline,
    examples: Sequence[str] = (),
    max_images: int = 8,
    title: str = "MARS",
    description: str = "",
    superres: SuperResPipeline | None = None,
) -> gr.Blocks:
    """The demo page over ``pipeline``: a draw tab and a caption tab; ``examples`` are prompts;
    with ``superres`` the drawn images are upscaled too (module docstring)."""
    if max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    sizes = [resolution_text(*r) for r in pipeline.resolutions if superres is None or tuple(r) in superres.lowres]
    if not sizes:
        raise ValueError(
            f"the super-resolution model reads {', '.join(resolution_text(*r) for r in superres.lowres)}; "
            f"the checkpoint draws {', '.join(resolution_text(*r) for r in pipeline.resolutions)}: no size in common"
        )
    cascade = None if superres is None else Cascade(pipeline, superres)
    defaults = pipeline.sampling

    def require_prompt(prompt):
        if not prompt or not prompt.strip():
            raise gr.Error("The prompt is empty: write what to draw, in English or Chinese.")

    # ``progress``: Gradio fills it in and follows the pipeline's tqdm bar with it. The dropdown
    # and the slider refuse sizes and counts out of their choices before this runs.
    def draw(prompt, resolution, cfg_scale, temperature, top_k, top_p, seed, num_images,
             progress=gr.Progress(track_tqdm=True)):
        require_prompt(prompt)
        size, seed = pipeline.resolution(resolution), int(seed)
        images = pipeline.generate(
            [prompt] * int(num_images),
            cfg_scale=cfg_scale,
            temperature=temperature,
            top_k=int(top_k),
            top_p=top_p,
            seed=seed,
            batch_size=1,
            resolution=size,
            progress=True,
        )
        plan = plan_text(pipeline, prompt) if pipeline.plan else ""
        return [(image, f"seed {seed + i}") for i, image in enumerate(images)], plan

    def draw_cascade(prompt, resolution, cfg_scale, temperature, top_k, top_p, seed, num_images, tokens_per_step, mode,
                     progress=gr.Progress(track_tqdm=True)):
        require_prompt(prompt)
        seed = int(seed)
        base, high, stats = cascade.generate(
            [prompt] * int(num_images), tokens_per_step=int(tokens_per_step), mode=mode, seed=seed, batch_size=1,
            progress=True, resolution=pipeline.resolution(resolution), cfg_scale=cfg_scale, temperature=temperature,
            top_k=int(top_k), top_p=top_p,
        )
        gallery = []
        for i, (low, image) in enumerate(zip(base, high)):
            gallery += [(image, f"seed {seed + i}: {resolution_text(*image.size)}"), (low, f"seed {seed + i}: base {resolution_text(*low.size)}")]
        plan = plan_text(pipeline, prompt) if pipeline.plan else ""
        accepted = f", mean accepted length {stats.mean_accepted_length:.2f}" if mode == "exact" and int(tokens_per_step) > 1 else ""
        note = f"Super-resolution, K={int(tokens_per_step)} {mode}: {stats.forward_passes} forward passes for {stats.tokens} tokens{accepted}."
        return gallery, plan, note

    def caption(upload):  # Gradio's FileData of the upload, already in its upload cache
        if not upload:
            raise gr.Error("No image: upload one to caption.")
        try:
            image = load_image(upload["path"], what=f"the uploaded image {upload.get('orig_name') or ''}".strip())
        except ImageError as error:
            raise gr.Error(str(error)) from error
        size = nearest_resolution(image.size, pipeline.resolutions)
        if size == image.size:
            note = f"The image is {resolution_text(*size)}, a size this model was trained on."
        else:
            note = (
                f"The image is {resolution_text(*image.size)}: resized to {resolution_text(*size)}, "
                "the nearest size this model was trained on."
            )
            image = image.resize(size, Image.Resampling.LANCZOS)
        [text] = pipeline.caption(image)
        return text, note

    # delete_cache: the images and uploads Gradio keeps for the page, removed after an hour
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown(f"# {title}" + (f"\n{description}" if description else ""))
        with gr.Tab("Draw"):
            with gr.Row():
                with gr.Column():
                    prompt = gr.Textbox(label="Prompt (English or Chinese)", lines=2, elem_id="prompt")
                    button = gr.Button("Draw", variant="primary", elem_id="draw")
                    resolution = gr.Dropdown(
                        sizes, value=sizes[0], label="Resolution (width x height)", interactive=len(sizes) > 1
                    )
                    number = gr.Slider(1, max_images, value=1, step=1, label="Number of images")
                    seed = gr.Number(0, precision=0, label="Seed (image i draws with seed + i)")
                    with gr.Accordion("Sampling", open=False):
                        cfg_scale = gr.Slider(1.0, 10.0, value=defaults.cfg_scale, step=0.1,
                                              label="Guidance scale (1 = none)")
                        temperature = gr.Slider(0.0, 2.0, value=defaults.temperature, step=0.05,
                                                label="Temperature (0 = greedy)")
                        top_k = gr.Slider(0, pipeline.vocab.num_codes, value=defaults.top_k, step=1,
                                          label="Top-k (0 = no cut)")
                        top_p = gr.Slider(0.01, 1.0, value=defaults.top_p, step=0.01, label="Top-p (1 = no cut)")
                    if cascade is not None:
                        heads = superres.model.num_heads
                        with gr.Accordion("Super-resolution (stage III)", open=False):
                            tokens_per_step = gr.Slider(1, heads, value=heads, step=1, label="Tokens per step (K)",
                                                        interactive=heads > 1)
                            mode = gr.Radio(list(MODES), value="exact", label="Decoding (exact: K=1's output; fast: K codes per pass)")
                with gr.Column():
                    gallery = gr.Gallery(label="Images", format="png", columns=4, height="auto", object_fit="contain",
                                         elem_id="images")
                    plan = gr.Textbox(label="Plan the model wrote before drawing", visible=pipeline.plan,
                                      interactive=False)
                    decoding = gr.Markdown(elem_id="decoding", visible=cascade is not None)
            if examples:
                gr.Examples([[e] for e in examples], inputs=[prompt], label="Examples (English and Chinese)")
        with gr.Tab("Caption"):
            with gr.Row():
                with gr.Column():
                    upload = gr.Image(type="filepath", format="png", sources=["upload", "clipboard"], label="Image",
                                      elem_id="upload")
                    caption_button = gr.Button("Caption", variant="primary", elem_id="caption")
                with gr.Column():
                    caption_box = gr.Textbox(label="Caption", interactive=False)
                    note = gr.Markdown(elem_id="caption-note")
        inputs = [prompt, resolution, cfg_scale, temperature, top_k, top_p, seed, number]
        if cascade is None:
            gr.on([button.click, prompt.submit], draw, inputs, [gallery, plan], api_name="draw", concurrency_id=MODEL_JOBS)
        else:
            gr.on([button.click, prompt.submit], draw_cascade, [*inputs, tokens_per_step, mode], [gallery, plan, decoding],
                  api_name="draw", concurrency_id=MODEL_JOBS)
        # preprocess=False: the upload reaches load_image undecoded, whose errors are one line
        caption_button.click(caption, [upload], [caption_box, note], api_name="caption", concurrency_id=MODEL_JOBS,
                             preprocess=False)
    app.queue(default_concurrency_limit=1)
    return app


def launch(
    app: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, block: bool = True, max_file_size: str | int | None = "20mb"
) -> gr.Blocks:
    """Serve ``app`` at http://host:port; ``block=False`` returns once it is up (tests)."""
    try:
        app.launch(
            server_name=host,
            server_port=port,
            prevent_thread_lock=not block,
            css=CSS,
            max_file_size=max_file_size,
            ssr_mode=False,  # server-side rendering needs Node; the page renders in the browser
            show_error=True,
        )
    except OSError as error:  # Gradio's message for a port in use
        raise OSError(f"port={port}: {error}") from error
    return app


def describe(pipeline: MarsPipeline, name: str, superres: SuperResPipeline | None = None) -> str:
    """One line about the checkpoint (and the super-resolution model) for the page's header."""
    sizes = ", ".join(resolution_text(*r) for r in pipeline.resolutions)
    line = f"Checkpoint `{name}`: draws {sizes}" + ("; writes a plan before drawing" if pipeline.plan else "")
    if superres is not None:
        line += f"; upscales to a long side of {superres.model.config.long_side} px (stage III, up to {superres.model.num_heads} tokens per step)"
    return line + "."
