"""Summary table of a Hydra multirun sweep.

Every job of ``python apps/train.py -m ...`` writes ``metrics.json`` in its own run directory
(``<sweep dir>/<job number>/``). At the end of the sweep this callback gathers them, with
the overrides that made each job, into ``summary.csv`` and ``summary.md`` in the sweep dir.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf


def collect_sweep(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One row per job directory: its number, the overrides that vary across jobs, its metrics."""
    jobs = sorted((p for p in Path(sweep_dir).iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    overrides = []
    for job_dir in jobs:
        overrides_file = job_dir / ".hydra" / "overrides.yaml"
        overrides.append(list(OmegaConf.load(overrides_file)) if overrides_file.exists() else [])
    shared = set.intersection(*(set(o) for o in overrides)) if len(overrides) > 1 else set()
    rows = []
    for job_dir, job_overrides in zip(jobs, overrides):
        metrics_file = job_dir / "metrics.json"
        row: dict[str, Any] = {"job": int(job_dir.name), "overrides": " ".join(o for o in job_overrides if o not in shared)}
        row["status"] = "ok" if metrics_file.exists() else "no metrics (failed or unfinished)"
        row.update(json.loads(metrics_file.read_text()) if metrics_file.exists() else {})
        rows.append(row)
    return rows


def write_summary(rows: list[dict[str, Any]], sweep_dir: str | Path) -> tuple[Path, Path]:
    """Write the rows as ``summary.csv`` and ``summary.md``; returns both paths."""
    sweep_dir = Path(sweep_dir)
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    csv_path, md_path = sweep_dir / "summary.csv", sweep_dir / "summary.md"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)

    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value if value is not None else "")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


class SweepSummary(Callback):
    """Hydra callback: writes the sweep's summary table when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        rows = collect_sweep(sweep_dir)
        _, md_path = write_summary(rows, sweep_dir)
        print(f"Sweep summary ({len(rows)} jobs): {md_path}\n{md_path.read_text()}")
