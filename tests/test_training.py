"""core.training: the distillation loss, and the training loop's hooks and checkpoint policy."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from netshrink import CheckpointPolicy, DataSplits, FinetuneConfig, TrainState, train
from netshrink.training import distillation_loss


def test_distillation_loss_mixes_hard_and_soft_terms():
    torch.manual_seed(0)
    logits, teacher = torch.randn(8, 10), torch.randn(8, 10)
    y = torch.randint(0, 10, (8,))
    ce = F.cross_entropy(logits, y)
    assert torch.allclose(distillation_loss(logits, y, teacher, temperature=4.0, alpha=0.0), ce)
    # The student equal to the teacher: the soft term is zero, only the hard term is left.
    same = distillation_loss(logits, y, logits, temperature=4.0, alpha=0.5)
    assert torch.allclose(same, 0.5 * ce, atol=1e-6)
    t = 2.0
    kl = F.kl_div(F.log_softmax(logits / t, 1), F.softmax(teacher / t, 1), reduction="batchmean")
    full = distillation_loss(logits, y, teacher, temperature=t, alpha=1.0)
    assert full.item() == pytest.approx((kl * t * t).item(), rel=1e-6)
    assert full.item() > 0


# -- the loop and its hooks -------------------------------------------------------------------


@pytest.fixture
def tiny():
    """Four classes of 8-d points, 40 training examples (5 batches of 8); a linear model."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 8, generator=g) * 3

    def split(n: int) -> TensorDataset:
        return TensorDataset(centres[torch.arange(n) % 4] + torch.randn(n, 8, generator=g),
                             torch.arange(n) % 4)

    return DataSplits("tiny", split(40), split(20), split(20), num_classes=4), nn.Linear(8, 4)


def test_hooks_see_where_training_is(tiny):
    data, model = tiny
    calls, bias = [], model.bias.detach().clone()
    history = train(
        model, data, FinetuneConfig(epochs=2, batch_size=8),
        # Parameter groups: the bias gets lr 0 and must not move.
        optimizer=lambda m: torch.optim.SGD([{"params": [m.weight]},
                                             {"params": [m.bias], "lr": 0.0}], lr=0.1),
        extra_loss=lambda s: calls.append(("loss", s.epoch, s.batch, s.step, s.progress)) or 0.0,
        before_epoch=lambda s: calls.append(("epoch", s.epoch, s.step)),
        after_step=lambda s: calls.append(("step", s.epoch, s.batch, s.step)),
        validate=lambda s: calls.append(("val", s.epoch, s.step)) or float(s.epoch),
    )
    assert calls[:4] == [("val", 0, 0), ("epoch", 0, 0), ("loss", 0, 0, 0, 0.0), ("step", 0, 0, 1)]
    assert ("loss", 1, 2, 7, 1.4) in calls and calls[-2] == ("step", 1, 4, 10)
    assert [c for c in calls if c[0] in ("val", "epoch")][2:] == [
        ("val", 1, 5), ("epoch", 1, 5), ("val", 2, 10)]
    assert history["val_acc"] == [1.0, 2.0] and history["start_val_acc"] == 0.0
    assert history["best_epoch"] == 2 and len(history["loss"]) == 2
    assert torch.equal(model.bias, bias)


@pytest.mark.parametrize(("policy", "epochs_run", "kept"), [
    (CheckpointPolicy(), 5, 1),  # the best, the incoming weights included
    (CheckpointPolicy(keep="last"), 5, 5),
    (CheckpointPolicy(patience=2), 3, 1),  # epochs 2 and 3 do not improve on epoch 1
    (CheckpointPolicy(patience=2, warmup_epochs=4), 5, 1),  # stale counts only after epoch 4
    (CheckpointPolicy(key=lambda s, _state: -s), 5, 2),  # the lowest score wins
    (CheckpointPolicy(key=lambda s, st: s if st.epoch >= 4 else None), 5, 4),  # from epoch 4
])
def test_checkpoint_policy(tiny, policy, epochs_run, kept):
    data, model = tiny
    scores, seen = [0.5, 0.9, 0.0, 0.2, 0.6, 0.4], {}

    def validate(state: TrainState) -> float:
        seen[state.epoch] = state.model.weight.detach().clone()
        return scores[state.epoch]

    history = train(model, data, FinetuneConfig(epochs=5, batch_size=8, lr=0.1),
                    validate=validate, checkpoint=policy)
    assert len(history["val_acc"]) == epochs_run
    assert history["best_epoch"] == kept and history["best_val_acc"] == scores[kept]
    assert torch.equal(model.weight, seen[kept])


def test_custom_loss_replaces_the_default(tiny):
    data, model = tiny
    before, sizes = copy.deepcopy(model.state_dict()), []

    def no_gradient(state: TrainState, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        sizes.append(len(y))
        return state.model(x).sum() * 0.0  # Adam does not move weights without a gradient

    train(model, data, FinetuneConfig(epochs=1, batch_size=8), loss=no_gradient,
          checkpoint=CheckpointPolicy(keep="last"))
    assert sizes == [8] * 5
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
