"""Parameters of a SemVIE model per part, built without weights:

    python apps/inspect_model.py model=semvie_qwen7b

The model config is instantiated on the meta device (nothing allocated, nothing downloaded);
the table lists every part's parameters, how many are trainable, and the vocabulary size.
"""

from __future__ import annotations

import hydra
import lightning as L
import torch
from omegaconf import DictConfig

from mars_app.cli import run_app
from mars_semvie import SemVIEForCausalLM


def inspect_model(cfg: DictConfig) -> dict:
    """Print the parameter table of ``cfg.model``; returns its figures."""
    with torch.device(cfg.device):
        model = hydra.utils.instantiate(cfg.model)
        if isinstance(model, L.LightningModule):  # TextToImageModule builds its model in this hook
            model.configure_model()
    semvie = next((m for m in model.modules() if isinstance(m, SemVIEForCausalLM)), None)
    if semvie is None:
        raise TypeError(f"{type(model).__name__} contains no SemVIEForCausalLM")
    groups = semvie.parameter_groups()
    total = sum(count for count, _ in groups.values())
    trainable = sum(count for _, count in groups.values())
    width = max(map(len, groups)) + 2
    lines = [f"{'part':<{width}}{'parameters':>16}{'trainable':>16}"]
    lines += [f"{name:<{width}}{count:>16,}{train:>16,}" for name, (count, train) in groups.items()]
    lines += [f"{'total':<{width}}{total:>16,}{trainable:>16,}", ""]
    lines.append(f"total {total / 1e9:.2f}B, trainable {trainable / 1e9:.2f}B, frozen {(total - trainable) / 1e9:.2f}B")
    vocab = semvie.vocab
    lines.append(
        f"vocabulary {vocab.size:,} = text {vocab.text_size:,} + visual codes {vocab.num_codes:,} + specials 6 "
        f"+ padding {vocab.size - vocab.used_ids.stop:,}"
    )
    print("\n".join(lines))
    return {"parts": groups, "total": total, "trainable": trainable, "vocab_size": vocab.size}


@hydra.main(version_base="1.3", config_path="../conf", config_name="inspect_model")
def main(cfg: DictConfig) -> None:
    run_app(inspect_model, cfg)


if __name__ == "__main__":
    main()
