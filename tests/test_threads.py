"""AdaptiveThreads (mars_app.threads): it measures each thread count during real Lightning
training and keeps one; the run trains as a run at a fixed count does (up to the last bits)."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from mars_app.threads import AdaptiveThreads, candidate_counts


class Encoder(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.TransformerEncoderLayer(64, 4, 256, dropout=0.0, batch_first=True)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.layer(x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def fit(callbacks: list, steps: int = 24) -> Encoder:
    data = DataLoader(TensorDataset(torch.randn(steps * 4, 48, 64, generator=torch.Generator().manual_seed(1))), batch_size=4)
    model = Encoder()
    Trainer(accelerator="cpu", max_steps=steps, callbacks=callbacks, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False).fit(model, data)
    return model


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_candidates_halve_down_to_one():
    assert candidate_counts(8) == [8, 4, 2, 1] and candidate_counts(6) == [6, 3, 1] and candidate_counts(1) == [1]


def test_probes_every_count_keeps_one_and_trains_as_a_fixed_count_does(two_threads):
    chooser = AdaptiveThreads(every_n_steps=12, probe_steps=2, first_step=2)
    adaptive = fit([chooser])
    # two probes (steps 2 and 14), each 3 steps at 2 threads then 3 at 1
    assert sorted(chooser.times) == [1, 2] and all(len(times) == 2 for times in chooser.times.values())
    assert chooser.next_probe == 26 and torch.get_num_threads() in (1, 2)
    torch.set_num_threads(2)
    fixed = fit([])
    for (name, a), (_, b) in zip(adaptive.named_parameters(), fixed.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4, msg=name)


def test_one_thread_leaves_it_alone():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        chooser = AdaptiveThreads(every_n_steps=4, probe_steps=1, first_step=0)
        fit([chooser], steps=6)
        assert chooser.counts == [] and chooser.times == {} and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_job_started_on_fewer_threads_can_grow_to_its_maximum():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as apps/demo.py starts a job beside another
    try:
        chooser = AdaptiveThreads(every_n_steps=12, probe_steps=1, first_step=0, max_threads=2)
        fit([chooser], steps=6)
        assert chooser.counts == [2, 1] and sorted(chooser.times) == [1, 2]
    finally:
        torch.set_num_threads(before)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_threads >= 1"):
        AdaptiveThreads(max_threads=0)
    with pytest.raises(ValueError, match="every_n_steps > 0"):
        AdaptiveThreads(every_n_steps=0)
