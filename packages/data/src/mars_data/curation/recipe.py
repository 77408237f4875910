"""What a curation run does: the steps, their thresholds and their resources (plain dataclasses).

``Recipe.from_dict`` reads the ``curate`` config group (``conf/curate/paper.yaml``,
``tiny.yaml``); unknown keys are errors. Selection per score is a threshold (``min_score``,
applied as soon as the score exists, so later steps skip what it drops) and/or a top fraction
(``top_fraction``: the best ``ceil(f * n)`` of a shard's ``n`` samples that passed every other
filter, applied when the shard is complete). Per-shard selection keeps the run streaming and
resumable; img2dataset shards are random draws of the source, so it approximates a global
top fraction. A VLM captions every sample that passes the thresholds, including those a top
fraction drops later: use thresholds to save VLM time.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from mars_core import require_path


@dataclass
class SizeStep:
    """Decode every image (corrupt ones are dropped), then the paper's size filter."""

    min_short_side: int = 256  # drop images whose short side is smaller (the paper: 256)
    max_aspect_ratio: float = 2.0  # drop images whose long / short side is larger (the paper: 2)
    concurrency: int | None = None  # Ray tasks reading shards at once (None: as many as CPUs allow)


@dataclass
class ClipStep:
    enabled: bool = True
    model: str | None = None  # a local CLIP directory (CLIPModel + CLIPProcessor); ViT-L/14 for the aesthetic head
    min_score: float | None = None  # cosine similarity threshold
    top_fraction: float | None = None
    batch_size: int = 64
    concurrency: int = 1  # actors, each holding one model
    num_gpus: float | None = None  # per actor; None: 1 when the Ray cluster has GPUs, else 0
    num_cpus: float = 1


@dataclass
class AestheticStep:
    """Runs in the CLIP step's actors, on its image embeddings."""

    enabled: bool = True
    head: str | None = None  # the predictor's state dict (.pth / .pt / .safetensors)
    min_score: float | None = None
    top_fraction: float | None = None


@dataclass
class RecaptionStep:
    enabled: bool = True
    model: str | None = None  # a local image-text-to-text model directory
    prompt: str = "Describe the image and its style in a very detailed manner."
    max_new_tokens: int = 256
    batch_size: int = 8
    concurrency: int = 1
    num_gpus: float | None = None
    num_cpus: float = 1


@dataclass
class Recipe:
    size: SizeStep = field(default_factory=SizeStep)
    clip: ClipStep = field(default_factory=ClipStep)
    aesthetic: AestheticStep = field(default_factory=AestheticStep)
    recaption: RecaptionStep = field(default_factory=RecaptionStep)
    dedup: bool = True  # drop a sample whose image bytes equal those of a sample kept earlier in input order
    name: str = "custom"

    @classmethod
    def from_dict(cls, values: dict, option: str = "curate") -> Recipe:
        parts = {"size": SizeStep, "clip": ClipStep, "aesthetic": AestheticStep, "recaption": RecaptionStep}
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"{option}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        kwargs = {}
        for key, value in values.items():
            if key in parts:
                allowed = {f.name for f in fields(parts[key])}
                bad = set(value or {}) - allowed
                if bad:
                    raise ValueError(f"{option}.{key}: unknown keys {sorted(bad)}; known: {sorted(allowed)}")
                kwargs[key] = parts[key](**(value or {}))
            else:
                kwargs[key] = value
        recipe = cls(**kwargs)
        recipe.validate(option)
        return recipe

    def validate(self, option: str = "curate") -> None:
        """Every enabled step's path exists and every selection is well formed; errors name the option."""
        if self.size.min_short_side < 1 or self.size.max_aspect_ratio < 1:
            raise ValueError(f"{option}.size: min_short_side must be >= 1 and max_aspect_ratio >= 1")

        def off(step: str) -> str:
            return f", or turn the step off ({option}.{step}.enabled=false)"

        if self.clip.enabled:
            require_path(f"{option}.clip.model", self.clip.model, "a local CLIP model directory", hint=off("clip"))
        if self.aesthetic.enabled:
            if not self.clip.enabled:
                raise ValueError(f"{option}.aesthetic reads the CLIP step's image embeddings: set {option}.clip.enabled=true "
                                 f"with a CLIP ViT-L/14 as {option}.clip.model, or {option}.aesthetic.enabled=false")
            require_path(f"{option}.aesthetic.head", self.aesthetic.head, "the aesthetic predictor's weights file", directory=False,
                         hint=off("aesthetic"))
        if self.recaption.enabled:
            require_path(f"{option}.recaption.model", self.recaption.model, "a local image-text-to-text model directory",
                         hint=off("recaption"))
        for name in ("clip", "aesthetic"):
            fraction = getattr(self, name).top_fraction
            if fraction is not None and not 0 < fraction <= 1:
                raise ValueError(f"{option}.{name}.top_fraction={fraction}: must be in (0, 1]")
        for name in ("clip", "recaption"):
            step = getattr(self, name)
            if step.batch_size < 1 or step.concurrency < 1:
                raise ValueError(f"{option}.{name}: batch_size and concurrency must be >= 1")
