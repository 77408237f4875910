"""T2I-CompBench scoring of images in its layout (``<category>/samples/<prompt>_NNNNNN.png``).

| category | official scorer | here |
|---|---|---|
| color, shape, texture | BLIP-VQA (``BLIPvqa_eval/BLIP_vqa.py``) | yes: ``blip_vqa_score`` with BLIP VQA loaded by path through transformers |
| non_spatial | CLIP ViT-B/32 cosine (``CLIPScore_eval/CLIP_similarity.py``) | yes: torchmetrics CLIPScore / 100 (``clipscore``) with a CLIP by path |
| spatial (2D) | UniDet detector (``UniDet_eval/2D_spatial_eval.py``, detectron2) | no: detectron2 + UniDet weights cannot be installed here; run the official scorer on our layout (docs/EVALUATION.md) |
| complex | 3-in-1: mean of BLIP-VQA, UniDet spatial and CLIP (``3_in_1_eval/3_in_1.py``) | no: needs the UniDet part; same |

BLIP-VQA as the official scorer computes it: for each noun phrase of the prompt, the question
``"<noun phrase>?"`` about the image; the answer score is p(yes) / (p(yes) + p(no)) of the
answer decoder's first token after its start token; an image scores the product over its noun
phrases; a category scores the mean over its images (reported in [0, 1]; the paper's table
gives percentages).

Noun phrases: the official scorer takes spaCy ``en_core_web_sm``'s noun chunks (minus "top",
"the side", "the left", "the right"). spaCy's English model is not on PyPI, so here
``noun_phrases="split"`` splits the prompt at " and " and commas: on the benchmark's template
prompts ("a green bench and a blue bowl", the large majority of color/shape/texture) that gives
the same phrases; on the free-form ones ("A traffic light with a smile red light above a green
sign.") it gives fewer, longer questions. The summary states which was used; for the official
numbers run the official scorer on our layout (docs/EVALUATION.md).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from tqdm import tqdm

from .protocol import list_images, read_images

BLIP_VQA = ("color", "shape", "texture")
CLIP_CATEGORIES = ("non_spatial",)
OFFICIAL_ONLY = {"spatial": "UniDet (detectron2)", "3d_spatial": "UniDet + depth", "complex": "3-in-1 (needs UniDet)",
                 "numeracy": "UniDet"}
BLIP_VQA_PROTOCOL = {
    "score": "mean over images of the product over noun phrases of p(yes) / (p(yes) + p(no))",
    "noun_phrases": "split at ' and ' and commas (official: spaCy en_core_web_sm noun chunks)",
}
NAME = re.compile(r"^(?P<prompt>.+)_(?P<index>\d{6})\.png$")


def category_images(folder: Path) -> list[tuple[Path, str]]:
    """(path, prompt) of ``folder/samples/<prompt>_NNNNNN.png`` in index order, as the official scorers sort them."""
    found = []
    for path in list_images(folder / "samples"):
        match = NAME.match(path.name)
        if match is None:
            raise ValueError(f"{path}: not a T2I-CompBench sample name (<prompt>_NNNNNN.png)")
        found.append((int(match["index"]), path, match["prompt"]))
    return [(path, prompt) for _, path, prompt in sorted(found)]


def split_noun_phrases(prompt: str) -> list[str]:
    """The prompt's phrases between " and " and commas, lower-cased, final full stop dropped."""
    text = prompt.strip().rstrip(".").lower()
    return [phrase.strip() for phrase in re.split(r",|\band\b", text) if phrase.strip()]


class BlipVQA:
    """p(yes) / (p(yes) + p(no)) of a transformers ``BlipForQuestionAnswering`` for (image, question) pairs."""

    def __init__(self, directory: Path, device: str = "cpu"):
        from transformers import AutoProcessor, BlipForQuestionAnswering

        self.model = BlipForQuestionAnswering.from_pretrained(directory).eval().to(device)
        self.processor = AutoProcessor.from_pretrained(directory)
        tokenizer = self.processor.tokenizer
        self.yes, self.no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
        if tokenizer.unk_token_id in (self.yes, self.no):
            raise ValueError(f"{directory}: the tokenizer has no 'yes'/'no' tokens: not a BLIP VQA model")
        self.device = device

    @torch.no_grad()
    def yes_probability(self, images: list, questions: list[str]) -> torch.Tensor:
        # the same path as BlipForQuestionAnswering.forward/generate: image -> question encoder
        # (cross-attending the image) -> answer decoder from its start token
        inputs = self.processor(images=images, text=questions, return_tensors="pt", padding=True).to(self.device)
        model = self.model
        image_embeds = model.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state
        question = model.text_encoder(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device),
        ).last_hidden_state
        start = torch.full((len(questions), 1), model.decoder_start_token_id, dtype=torch.long, device=self.device)
        logits = model.text_decoder(
            input_ids=start, encoder_hidden_states=question, encoder_attention_mask=inputs["attention_mask"]
        ).logits[:, 0].float()
        probs = logits.softmax(-1)
        return (probs[:, self.yes] / (probs[:, self.yes] + probs[:, self.no])).cpu()


def blip_vqa_score(vqa: BlipVQA, items: list[tuple[Path, str]], skipped: list[str], batch_size: int = 16,
                   desc: str = "BLIP-VQA") -> tuple[float, list[dict]]:
    """Mean over images of the product over noun phrases of the yes-probability; also the per-image rows."""
    rows = []
    prompts = dict(items)
    pending: list[tuple[int, object, str]] = []  # (row, image, question)

    def flush():
        if pending:
            scores = vqa.yes_probability([image for _, image, _ in pending], [q for _, _, q in pending])
            for (row, _, _), score in zip(pending, scores.tolist()):
                rows[row]["score"] *= score
                rows[row]["answers"].append(round(score, 6))
            pending.clear()

    for path, image in tqdm(read_images([p for p, _ in items], skipped), total=len(items), desc=desc, unit="image"):
        phrases = split_noun_phrases(prompts[path])
        rows.append({"image": path.name, "prompt": prompts[path], "questions": [f"{p}?" for p in phrases],
                     "answers": [], "score": 1.0})
        for question in rows[-1]["questions"]:
            pending.append((len(rows) - 1, image, question))
            if len(pending) >= batch_size:
                flush()
    flush()
    if not rows:
        raise ValueError("BLIP-VQA: no readable image")
    return sum(r["score"] for r in rows) / len(rows), rows
