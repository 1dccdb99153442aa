"""core.training helpers: the distillation loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

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
