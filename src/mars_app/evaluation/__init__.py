"""The paper's evaluations with local weights: FID and CLIPScore on MS-COCO captions,
T2I-CompBench, GenEval (docs/EVALUATION.md).

- ``benchmarks``: prompt files in, images out in each benchmark's own layout (apps/generate.py
  ``benchmark=coco|compbench|geneval``).
- ``fid`` (with ``inception``, the FID Inception-v3), ``clipscore``, ``compbench``, ``geneval``:
  the scorers; ``tasks``: apps/evaluate.py ``task=fid|clipscore|compbench|geneval``.
- ``protocol``: weights checks and hashes, image reading, the summary every task writes.
"""
