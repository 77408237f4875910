"""The shapes world's evaluator: find the objects in an image and score it against its prompt.

Detection uses only the world's definitions, no learned model:
1. every pixel within ``COLOR_TOLERANCE`` (RGB distance) of a palette colour, and nearer to it
   than to any other palette colour or to the white background, takes that colour; the rest
   is background or unclassified;
2. the 4-connected regions of each colour are candidate objects; regions smaller than
   ``MIN_AREA_FRACTION`` of the canvas are specks (noise, edge fringes) and are ignored;
3. a region's shape is the ideal shape (circle, square or apex-up triangle, drawn in the
   region's bounding box) that overlaps it best by intersection over union; below
   ``MIN_SHAPE_IOU`` it is an object of unknown shape. Comparing with ideal shapes in the
   bounding box is scale- and aspect-free, so it works at any size and on stretched canvases;
4. its centre is the centre of its bounding box, which is the scene's (cx, cy) for all three
   shapes.

Scoring follows docs/SHAPES_WORLD.md: binding is correct when the found objects are exactly the
requested (colour, shape) pairs; spatial is correct when binding is and A's centre lies on
the requested side of B's by more than ``MIN_OFFSET`` of the canvas along the relation's axis,
and further along that axis than across it (a spatial hit therefore implies a binding hit).
Colour (shape) accuracy asks only that the found colours (shapes) are exactly the requested
ones, as a multiset, whatever shape (colour) they come with.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from mars_data.shapes.captions import parse_caption
from mars_data.shapes.world import BACKGROUND, COLORS, RELATION_OFFSETS, SHAPES, object_masks, shape_mask

COLOR_TOLERANCE = 60.0
MIN_AREA_FRACTION = 0.01  # the smallest object of the world covers about 0.03 of the canvas
MIN_SHAPE_IOU = 0.7
MIN_OFFSET = 0.1

METRICS = ("single_binding", "pair_binding", "spatial", "color", "shape")

_COLOR_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[c] for c in _COLOR_NAMES] + [BACKGROUND], dtype=np.int32)


def _as_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 array of shape (H, W, 3), got {array.dtype} {array.shape}")
    return array


def classify_pixels(array: np.ndarray) -> np.ndarray:
    """Palette index of every pixel (H, W), or -1 for background and unclassified pixels."""
    squared = ((array[:, :, None, :].astype(np.int32) - _PALETTE) ** 2).sum(axis=-1)
    nearest = squared.argmin(axis=-1)
    is_color = (nearest < len(_COLOR_NAMES)) & (squared.min(axis=-1) <= COLOR_TOLERANCE**2)
    return np.where(is_color, nearest, -1)


def ideal_upscale(scene: dict, low: tuple[int, int], high: tuple[int, int], seed: int = 0, chains: int = 256, steps: int = 400) -> Image.Image:
    """The best any upscaler of the scene's ``low`` (width, height) render can do at ``high``,
    pixel by pixel: a reference for super-resolution. Each object's box (cx, cy, s) is only
    known to lie among those that draw the same low-res pixels; with the world's flat prior the
    posterior is uniform there. Metropolis chains started from the scene's own box (which is
    in that set) sample it: a proposal is kept iff it draws the same low-res pixels, a walk
    whose stationary law is that uniform one. A high-res pixel takes the object's colour when
    more than half the samples cover it: the per-pixel choice that maximises the expected
    palette match. Objects do not touch, so each is sampled alone."""
    (w, h), (W, H) = low, high
    rng = np.random.default_rng(seed)
    canvas = np.empty((H, W, 3), dtype=np.uint8)
    canvas[:] = BACKGROUND
    for obj in scene["objects"]:
        box = np.array([obj["cx"], obj["cy"], obj["s"]])
        # the low-res pixels around the object (3 beyond its box) decide the posterior
        x0, x1 = max(0, int((box[0] - box[2] / 2) * w) - 3), min(w, int((box[0] + box[2] / 2) * w) + 4)
        y0, y1 = max(0, int((box[1] - box[2] / 2) * h) - 3), min(h, int((box[1] + box[2] / 2) * h) + 4)
        rows, columns = np.arange(y0, y1), np.arange(x0, x1)
        seen = object_masks(obj["shape"], *box[:, None], w, h, rows, columns)
        current, step, kept, samples = np.tile(box, (chains, 1)), np.full(3, 0.3 / max(w, h)), [], []
        for t in range(steps):
            proposal = current + rng.normal(size=(chains, 3)) * step
            same = (object_masks(obj["shape"], *proposal.T, w, h, rows, columns) == seen).all(axis=(1, 2))
            current[same] = proposal[same]
            kept.append(same.mean())
            if t < steps // 2 and t % 25 == 24:  # burn-in: steps sized for a 20-50% acceptance
                rate = np.mean(kept[-25:])
                step *= 0.5 if rate < 0.2 else 1.5 if rate > 0.5 else 1.0
            elif t >= steps // 2 and t % 4 == 0:
                samples.append(current.copy())
        boxes = np.concatenate(samples)
        hy, hx = np.arange(y0 * H // h, min(H, -(-y1 * H // h))), np.arange(x0 * W // w, min(W, -(-x1 * W // w)))
        covered = object_masks(obj["shape"], *boxes.T, W, H, hy, hx).mean(axis=0) > 0.5
        canvas[hy[:, None], hx[None, :]] = np.where(covered[..., None], COLORS[obj["color"]], canvas[hy[:, None], hx[None, :]])
    return Image.fromarray(canvas)


def label_regions(classes: np.ndarray) -> np.ndarray:
    """Label the 4-connected regions of equal palette index: every pixel of a region gets the
    smallest flat index in it (-1 off regions). Vectorised: labels flow to smaller neighbours
    of the same colour, and pointer jumping (a label's own label) carries them far quickly."""
    height, width = classes.shape
    on = classes >= 0
    labels = np.where(on, np.arange(height * width).reshape(height, width), -1)
    joins = [  # (one side, other side, same colour) of horizontal and vertical neighbour pairs
        (np.s_[:, :-1], np.s_[:, 1:], on[:, :-1] & (classes[:, :-1] == classes[:, 1:])),
        (np.s_[:-1, :], np.s_[1:, :], on[:-1, :] & (classes[:-1, :] == classes[1:, :])),
    ]
    flat = labels.reshape(-1)
    members = np.flatnonzero(on)
    while True:
        before = labels.copy()
        for first, second, same in joins:
            smaller = np.minimum(labels[first], labels[second])
            for side in (first, second):  # labels only ever decrease
                labels[side] = np.where(same, np.minimum(labels[side], smaller), labels[side])
        while True:
            jumped = flat[flat[members]]
            if np.array_equal(jumped, flat[members]):
                break
            flat[members] = jumped
        if np.array_equal(labels, before):
            return labels


def _classify_shape(ys: np.ndarray, xs: np.ndarray) -> tuple[str | None, float]:
    y0, x0 = ys.min(), xs.min()
    box_h, box_w = ys.max() - y0 + 1, xs.max() - x0 + 1
    region = np.zeros((box_h, box_w), dtype=bool)
    region[ys - y0, xs - x0] = True
    u = ((np.arange(box_w) + 0.5) / box_w)[None, :]
    v = ((np.arange(box_h) + 0.5) / box_h)[:, None]
    best, best_iou = None, 0.0
    for shape in SHAPES:
        ideal = shape_mask(shape, u, v)
        iou = float((ideal & region).sum() / (ideal | region).sum())
        if iou > best_iou:
            best, best_iou = shape, iou
    return (best if best_iou >= MIN_SHAPE_IOU else None), best_iou


def detect(image: Image.Image | np.ndarray) -> list[dict]:
    """Objects in an image: ``[{"color", "shape" (None if unrecognised), "cx", "cy", "area",
    "iou"}]`` with centre and area as fractions of the canvas, largest first."""
    array = _as_rgb_array(image)
    height, width = array.shape[:2]
    classes = classify_pixels(array)
    labels = label_regions(classes)
    ids, areas = np.unique(labels[labels >= 0], return_counts=True)
    found = []
    for region, area in zip(ids, areas / (height * width)):
        if area < MIN_AREA_FRACTION:
            continue
        ys, xs = np.nonzero(labels == region)
        color = classes[ys[0], xs[0]]
        shape, iou = _classify_shape(ys, xs)
        found.append(
            {
                "color": _COLOR_NAMES[color],
                "shape": shape,
                "cx": float((xs.min() + xs.max() + 1) / 2 / width),
                "cy": float((ys.min() + ys.max() + 1) / 2 / height),
                "area": round(float(area), 4),
                "iou": round(iou, 3),
            }
        )
    return sorted(found, key=lambda obj: -obj["area"])


def relation_holds(a: dict, b: dict, relation: str) -> bool:
    """Whether object ``a`` is ``relation`` object ``b`` by the world's rule (centres, y down)."""
    dx, dy = RELATION_OFFSETS[relation]
    along, across = (a["cx"] - b["cx"], a["cy"] - b["cy"]) if dx else (a["cy"] - b["cy"], a["cx"] - b["cx"])
    along *= dx or dy  # positive when a lies on the requested side
    return along > MIN_OFFSET and along > abs(across)


def requested_scene(record: dict) -> tuple[str, dict]:
    """(language, scene) a record asks for: its ``scene`` if given, else its parsed ``prompt``."""
    if "scene" in record and "lang" in record:
        return record["lang"], record["scene"]
    parsed = parse_caption(record["prompt"])
    return record.get("lang", parsed["lang"]), record.get("scene", parsed["scene"])


def score_image(image: Image.Image | np.ndarray | None, record: dict) -> dict:
    """Score one image against its scene record; ``image=None`` (missing) is wrong on all counts.

    Returns ``{"lang", "num_objects", "binding", "spatial" (None for one object), "color",
    "shape", "missing", "found"}``.
    """
    lang, scene = requested_scene(record)
    wanted = scene["objects"]
    relation = scene.get("relation")
    found = detect(image) if image is not None else []

    def kinds(objects, key):
        return sorted(str(obj[key]) for obj in objects)

    binding = bool(found) and sorted((o["color"], str(o["shape"])) for o in found) == sorted(
        (o["color"], o["shape"]) for o in wanted
    )
    spatial = None
    if len(wanted) == 2:
        spatial = False
        if binding:
            a, b = (next(f for f in found if (f["color"], f["shape"]) == (w["color"], w["shape"])) for w in wanted)
            spatial = relation_holds(a, b, relation)
    return {
        "lang": lang,
        "num_objects": len(wanted),
        "binding": binding,
        "spatial": spatial,
        "color": bool(found) and kinds(found, "color") == kinds(wanted, "color"),
        "shape": bool(found) and kinds(found, "shape") == kinds(wanted, "shape"),
        "missing": image is None,
        "found": found,
    }


def _mean(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def summarize(results: list[dict]) -> dict:
    """Accuracies per language: ``{"en": {...}, "zh": {...}, "all": {...}}``, each with
    single_binding, pair_binding, spatial, color, shape (None where no prompt applies), the
    number of prompts scored (``count``) and of images missing among them (``missing``)."""
    summary = {}
    for group in ("en", "zh", "all"):
        rows = [r for r in results if group == "all" or r["lang"] == group]
        singles = [r for r in rows if r["num_objects"] == 1]
        pairs = [r for r in rows if r["num_objects"] == 2]
        summary[group] = {
            "single_binding": _mean([r["binding"] for r in singles]),
            "pair_binding": _mean([r["binding"] for r in pairs]),
            "spatial": _mean([r["spatial"] for r in pairs]),
            "color": _mean([r["color"] for r in rows]),
            "shape": _mean([r["shape"] for r in rows]),
            "count": len(rows),
            "missing": sum(bool(r.get("missing")) for r in rows),
        }
    return summary
