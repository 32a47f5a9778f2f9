"""The moving average of the weights (``train.ema_decay``): its arithmetic, and a run that uses it."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from dualhead.core.ema import WeightAverage
from dualhead.core.trainer import Trainer
from tests.conftest import tiny_run_config


def test_the_average_follows_trainable_weights_and_swaps_in_and_out():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    model[0].bias.requires_grad_(False)  # a frozen parameter is never averaged
    start = {k: v.clone() for k, v in model.state_dict().items()}
    average = WeightAverage(model, decay=0.5)
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.fill_(3.0)
    average.update(step=100)  # warm-up min(0.5, 101/110) = 0.5
    torch.testing.assert_close(average.average["0.weight"], start["0.weight"] + 0.5)
    torch.testing.assert_close(average.average["0.bias"], start["0.bias"])
    torch.testing.assert_close(average.average["1.running_mean"], torch.full((2,), 3.0))  # buffers copied
    own = model[0].weight.detach().clone()
    with average.swapped_in():
        torch.testing.assert_close(model[0].weight, start["0.weight"] + 0.5)
    torch.testing.assert_close(model[0].weight, own)
    average.update(step=0)  # warm-up: decay 1/10, mostly the current weights
    torch.testing.assert_close(average.average["0.weight"], 0.1 * (start["0.weight"] + 0.5) + 0.9 * own)
    with pytest.raises(ValueError, match="train.ema_decay must be in"):
        WeightAverage(model, decay=1.0)


def test_best_checkpoint_holds_the_average_and_a_killed_run_resumes_it(shapes_root, tmp_path, monkeypatch):
    """One epoch with a checkpoint after every step: best/ (the only validation) is the average at the
    end, not the weights; a run that dies mid-epoch resumes to the uninterrupted run's average."""
    config = tiny_run_config(shapes_root, tmp_path, epochs=1, checkpoint_every_steps=1, ema_decay=0.9)
    config.data.batch_size = 8
    straight = Trainer(config, tmp_path / "straight")
    straight.fit()
    last = torch.load(tmp_path / "straight" / "last" / "trainer_state.pt", weights_only=True)
    best, raw = load_file(str(tmp_path / "straight" / "best" / "model.safetensors")), load_file(
        str(tmp_path / "straight" / "last" / "model.safetensors")
    )
    assert last["progress"]["step"] >= 5
    key = "binary_head.0.weight" if "binary_head.0.weight" in best else next(k for k in best if "head" in k)
    torch.testing.assert_close(best[key], last["ema"][key])
    assert not torch.equal(best[key], raw[key])

    original = Trainer.train_step

    def dies_at_step_3(self, batch, **kwargs):
        if self.state["step"] == 3:
            raise RuntimeError("killed")
        return original(self, batch, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", dies_at_step_3)
    with pytest.raises(RuntimeError, match="killed"):
        Trainer(config, tmp_path / "killed").fit()
    monkeypatch.setattr(Trainer, "train_step", original)
    Trainer.resume(tmp_path / "killed").fit()
    resumed = torch.load(tmp_path / "killed" / "last" / "trainer_state.pt", weights_only=True)
    assert resumed["progress"]["step"] == last["progress"]["step"]
    for name, value in last["ema"].items():
        torch.testing.assert_close(resumed["ema"][name], value, rtol=1e-5, atol=1e-6, msg=name)
