"""The curation run on Ray Data: shards in, shards out, a report.

One code path, local or on a cluster: ``ray.init()`` starts a local instance (``num_cpus``
CPUs) unless ``address`` names a cluster, or Ray is already initialised (tests share one).

The dataset is one row per pending input shard; ``flat_map(read_shard)`` turns each into its
sample rows (decode, size filter); the model steps follow as actor pools (``map_batches`` with
a callable class: ``concurrency`` actors, ``batch_size`` rows per call, ``num_gpus`` each when
the cluster has GPUs). The image bytes are dropped before rows reach the driver, which only
sees metadata. The driver counts each shard's rows; when a shard is complete (``shard_size``
rows) and every earlier pending shard is finalised, it selects (duplicates, top fractions) and
hands the kept samples' records to a Ray task that writes the output shard atomically.
Finalising in input order makes deduplication deterministic: a sample is a duplicate when a
sample kept in an earlier shard (or earlier in its own shard) has the same image bytes
(sha256). A rerun skips output shards that exist, seeds the seen hashes from finished shards
as it passes them in input order, and so writes what an uninterrupted run writes.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from mars_core.io import remove_stale_temporaries, write_json_atomic
from mars_data.curation.models import AestheticHead, fingerprint
from mars_data.curation.recipe import Recipe
from mars_data.curation.shards import kept_hashes, read_shard, write_shard
from mars_data.curation.steps import ClipAesthetic, Recaption
from mars_data.webdata import expand_urls

log = logging.getLogger(__name__)

REPORT_NAME = "curation_report.json"
FILTERS = {  # filter -> its rule, for the report
    "decode": "image missing, unreadable, truncated or a decompression bomb; json unreadable",
    "size": "short side < {size.min_short_side}",
    "aspect_ratio": "long / short side > {size.max_aspect_ratio}",
    "clip": "CLIP score < {clip.min_score}",
    "aesthetic": "aesthetic score < {aesthetic.min_score}",
    "duplicate": "same image bytes (sha256) as a sample kept earlier in input order",
    "clip_top_fraction": "not in the shard's best {clip.top_fraction} by CLIP score",
    "aesthetic_top_fraction": "not in the shard's best {aesthetic.top_fraction} by aesthetic score",
}
EXAMPLES = 5  # reasons kept per filter in the report


def versions(recipe: Recipe) -> dict[str, str]:
    """What made each field of a sample's ``curation`` record (code, models, prompt)."""
    from mars_data import __version__

    out = {"size": f"mars-data {__version__} min_short_side={recipe.size.min_short_side} "
                   f"max_aspect_ratio={recipe.size.max_aspect_ratio}"}
    if recipe.clip.enabled:
        out["clip"] = fingerprint(recipe.clip.model)
    if recipe.aesthetic.enabled:
        out["aesthetic"] = fingerprint(recipe.aesthetic.head)
    if recipe.recaption.enabled:
        prompt = hashlib.sha256(recipe.recaption.prompt.encode()).hexdigest()[:8]
        out["recaption"] = f"{fingerprint(recipe.recaption.model)} prompt@{prompt} max_new_tokens={recipe.recaption.max_new_tokens}"
    return out


def check_models(recipe: Recipe) -> None:
    """Errors the actors would raise, raised on the driver before any Ray work starts."""
    if recipe.aesthetic.enabled:
        from transformers import CLIPConfig

        expected = AestheticHead.from_file(recipe.aesthetic.head).layers[0].in_features
        got = CLIPConfig.from_pretrained(recipe.clip.model).projection_dim
        if expected != got:
            raise ValueError(f"curate.aesthetic.head={recipe.aesthetic.head} reads {expected}-d CLIP embeddings but "
                             f"curate.clip.model={recipe.clip.model} gives {got}-d ones (the reference head needs CLIP ViT-L/14)")


def local_shards(spec, output: Path) -> list[Path]:
    """The input shards as local paths, with unique names, none inside ``output``."""
    sources = []
    for url in expand_urls(spec):
        if urlparse(url).scheme:
            raise ValueError(f"input shard {url}: curation reads and writes shards on a filesystem every Ray node sees; "
                             "copy or mount it first")
        sources.append(Path(url).resolve())
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"input shards share file names; their outputs would collide in {output}")
    if any(s.parent == output.resolve() for s in sources):
        raise ValueError(f"output={output} holds input shards: give another directory (nothing is overwritten)")
    return sources


def num_gpus_for(step, ray) -> float:
    if step.num_gpus is not None:
        return step.num_gpus
    return 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0


def build_dataset(ray, shards: list[tuple[int, Path]], recipe: Recipe):
    """The lazy Ray Dataset of metadata rows (no image bytes) for ``shards``."""
    ds = ray.data.from_items([{"shard": str(path), "shard_index": index} for index, path in shards],
                             override_num_blocks=len(shards))
    ds = ds.flat_map(read_shard, fn_kwargs={"size": recipe.size}, compute=ray.data.TaskPoolStrategy(size=recipe.size.concurrency))
    if recipe.clip.enabled:
        gpus = num_gpus_for(recipe.clip, ray)
        ds = ds.map_batches(ClipAesthetic, fn_constructor_kwargs={"clip": recipe.clip, "aesthetic": recipe.aesthetic, "num_gpus": gpus},
                            batch_size=recipe.clip.batch_size, compute=ray.data.ActorPoolStrategy(size=recipe.clip.concurrency), num_gpus=gpus,
                            num_cpus=recipe.clip.num_cpus, batch_format="numpy")
    if recipe.recaption.enabled:
        gpus = num_gpus_for(recipe.recaption, ray)
        ds = ds.map_batches(Recaption, fn_constructor_kwargs={"recaption": recipe.recaption, "num_gpus": gpus},
                            batch_size=recipe.recaption.batch_size, compute=ray.data.ActorPoolStrategy(size=recipe.recaption.concurrency), num_gpus=gpus,
                            num_cpus=recipe.recaption.num_cpus, batch_format="numpy")
    return ds.drop_columns(["image"])


class Selector:
    """Finalises complete shards in input order: dedup, top fractions, the kept records."""

    def __init__(self, recipe: Recipe, sources: list[Path], finished: set[int], output: Path):
        self.recipe, self.sources, self.finished, self.output = recipe, sources, finished, output
        self.versions = versions(recipe)
        self.seen: set[str] = set()
        self.merged_upto = 0  # sources before this index are in ``seen`` (finished ones) or were finalised
        self.dropped: dict[str, int] = defaultdict(int)
        self.examples: dict[str, list[str]] = defaultdict(list)
        self.samples_in = self.kept = 0

    def _drop(self, step: str, reason: str) -> None:
        self.dropped[step] += 1
        if len(self.examples[step]) < EXAMPLES:
            self.examples[step].append(reason)

    def finalise(self, index: int, rows: list[dict]) -> dict[str, dict]:
        """Kept records of shard ``index`` (all its rows, any order): key -> curation record."""
        if self.recipe.dedup:
            for j in range(self.merged_upto, index):  # finished shards before this one, in input order
                if j in self.finished:
                    self.seen |= kept_hashes(self.output / self.sources[j].name)
        self.merged_upto = index + 1
        rows = sorted((r for r in rows if r["key"]), key=lambda r: r["position"])
        self.samples_in += len(rows)
        candidates = []
        for row in rows:
            if row["drop"]:
                self._drop(row["drop"], row["reason"])
            elif self.recipe.dedup and row["sha256"] in self.seen:
                self._drop("duplicate", f"{self.sources[index].name}:{row['key']}: duplicate image {row['sha256'][:12]}")
            else:
                candidates.append(row)
                if self.recipe.dedup:
                    self.seen.add(row["sha256"])
        for step in ("clip", "aesthetic"):
            fraction = getattr(self.recipe, step).top_fraction
            if fraction is None or not getattr(self.recipe, step).enabled or not candidates:
                continue
            keep = math.ceil(fraction * len(candidates))
            ranked = sorted(candidates, key=lambda r: (-r[f"{step}_score"], r["position"]))
            chosen = {id(r) for r in ranked[:keep]}
            for row in candidates:
                if id(row) not in chosen:
                    self._drop(f"{step}_top_fraction", f"{self.sources[index].name}:{row['key']}: {step} score "
                                                            f"{row[f'{step}_score']:.4f} below the shard's best {fraction}")
            candidates = [r for r in candidates if id(r) in chosen]
        self.kept += len(candidates)
        return {row["key"]: self.record(row) for row in candidates}

    def record(self, row: dict) -> dict:
        out = {"width": int(row["width"]), "height": int(row["height"]), "aspect_ratio": round(float(row["aspect_ratio"]), 6),
               "sha256": row["sha256"], "versions": self.versions}
        if self.recipe.clip.enabled:
            out["clip_score"] = float(row["clip_score"])
        if self.recipe.aesthetic.enabled:
            out["aesthetic_score"] = float(row["aesthetic_score"])
        if self.recipe.recaption.enabled:
            out["caption"], out["original_caption"] = str(row["new_caption"]), str(row["caption"])
        return out


def curate(input, output: str | Path, recipe: Recipe, *, address: str | None = None, num_cpus: int | None = None,
           max_shards: int | None = None, report: str | Path | None = None, progress: bool = True) -> dict:
    """Curate the shards of ``input`` into ``output`` (same file names); returns the report,
    also written to ``report`` (default ``output/curation_report.json``). ``max_shards`` stops
    after that many pending shards (a rerun continues)."""
    import ray
    from tqdm import tqdm

    output = Path(output)
    sources = local_shards(input, output)
    output.mkdir(parents=True, exist_ok=True)
    stale = remove_stale_temporaries(output)
    if stale:
        log.info("removed %d partial files of an interrupted run", len(stale))
    check_models(recipe)
    finished = {i for i, s in enumerate(sources) if (output / s.name).exists()}
    pending = [(i, s) for i, s in enumerate(sources) if i not in finished]
    if max_shards is not None:
        pending = pending[:max_shards]
    if not ray.is_initialized():
        ray.init(address=address, num_cpus=None if address else num_cpus, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    log.info("%d shards: %d finished before, %d to curate now", len(sources), len(finished), len(pending))

    selector = Selector(recipe, sources, finished, output)
    writer = ray.remote(write_shard)
    step_names = ["read"] + (["clip"] if recipe.clip.enabled else []) + (["recaption"] if recipe.recaption.enabled else [])
    busy = dict.fromkeys(step_names, 0.0)
    rows_by_shard: dict[int, list[dict]] = defaultdict(list)
    complete: dict[int, list[dict]] = {}
    order = [i for i, _ in pending]
    next_up = 0
    writes, unreadable, written = [], [], 0
    start = time.perf_counter()
    bar = tqdm(total=len(pending), unit="shard", desc="curating", disable=not progress)

    def finalise_ready() -> None:
        nonlocal next_up
        while next_up < len(order) and order[next_up] in complete:
            index = order[next_up]
            rows = complete.pop(index)
            unreadable.extend(r["reason"] for r in rows if r["drop"] == "shard")
            kept = selector.finalise(index, rows)
            writes.append(writer.remote(str(sources[index]), str(output / sources[index].name), kept))
            next_up += 1
            bar.update(1)
            bar.set_postfix(samples=selector.samples_in, kept=selector.kept)

    if pending:
        for batch in build_dataset(ray, pending, recipe).iter_batches(batch_size=None, batch_format="numpy"):
            columns = list(batch)
            for values in zip(*(batch[c] for c in columns)):
                row = {c: (v.item() if isinstance(v, np.generic) else v) for c, v in zip(columns, values)}
                for step in step_names:
                    busy[step] += row[f"time_{step}"]
                index = row["shard_index"]
                rows_by_shard[index].append(row)
                if len(rows_by_shard[index]) == row["shard_size"]:
                    complete[index] = rows_by_shard.pop(index)
            finalise_ready()
            if writes:  # collect finished writes as we go (their errors surface early)
                done, writes = ray.wait(writes, num_returns=len(writes), timeout=0)
                written += sum(ray.get(done))
        written += sum(ray.get(writes))
    bar.close()
    if next_up != len(order):
        raise RuntimeError(f"{len(order) - next_up} shards never completed (rows lost in the pipeline)")
    wall = time.perf_counter() - start

    rules = {step: rule.format(size=recipe.size, clip=recipe.clip, aesthetic=recipe.aesthetic) for step, rule in FILTERS.items()}
    result = {
        "input": [str(s) for s in sources] if len(sources) <= 20 else f"{len(sources)} shards from {sources[0].parent}",
        "output": str(output),
        "recipe": asdict(recipe),
        "shards": {"total": len(sources), "finished_before": len(finished), "curated": len(order),
                   "remaining": len(sources) - len(finished) - len(order), "unreadable": unreadable},
        "samples": {"in": selector.samples_in, "kept": selector.kept, "written": written,
                    "dropped": {step: {"count": count, "rule": rules[step], "examples": selector.examples[step]}
                                for step, count in sorted(selector.dropped.items())}},
        "throughput": {"wall_s": round(wall, 3), "samples_per_s": round(selector.samples_in / wall, 2) if wall else None,
                       "steps": {step: {"busy_s": round(busy[step], 3),
                                        "samples_per_busy_s": round(selector.samples_in / busy[step], 2) if busy[step] else None}
                                 for step in step_names}},
    }
    write_json_atomic(Path(report) if report else output / REPORT_NAME, result)
    return result
