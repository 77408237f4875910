"""mars_data.curation: the paper's data curation over webdataset shards, on Ray Data.

Steps (``Recipe``): decode + size / aspect-ratio filter, CLIP score and the LAION aesthetic
score (one CLIP forward), recaptioning with a vision-language model, deduplication of
identical images, thresholds or per-shard top fractions per score. ``curate(input, output,
recipe)`` runs them (``pipeline``); ``apps/curate.py`` is the Hydra entry point.

Importing this package needs neither Ray nor transformers (the ``curation`` extra of
mars-data installs them); they load when a run starts or a model is built.
"""

from mars_data.curation.models import AestheticHead
from mars_data.curation.pipeline import REPORT_NAME, curate
from mars_data.curation.recipe import AestheticStep, ClipStep, RecaptionStep, Recipe, SizeStep

__all__ = ["REPORT_NAME", "AestheticHead", "AestheticStep", "ClipStep", "RecaptionStep", "Recipe", "SizeStep", "curate"]
