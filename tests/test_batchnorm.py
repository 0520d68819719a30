"""surgery.recalibrate_bn: the cumulative average of batch statistics, mode and momentum restored."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import surgery
from surgery.core.errors import SurgeryError


def test_statistics_are_the_cumulative_average_of_the_batches() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4, momentum=0.3), nn.Dropout(0.5))
    net.eval()
    batches = [torch.randn(5, 3, 6, 6) * (i + 1) + i for i in range(4)]
    surgery.recalibrate_bn(net, [(b, torch.zeros(5)) for b in batches])
    features = [net[0](b).detach() for b in batches]
    means = torch.stack([f.mean((0, 2, 3)) for f in features])
    variances = torch.stack([f.var((0, 2, 3), unbiased=True) for f in features])
    bn = net[1]
    torch.testing.assert_close(bn.running_mean, means.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, variances.mean(0), rtol=1e-5, atol=1e-6)
    assert int(bn.num_batches_tracked) == 4
    assert bn.momentum == 0.3 and not net.training and not bn.training


def test_num_batches_limits_and_no_batch_is_refused() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    surgery.recalibrate_bn(net, (torch.randn(2, 3, 4, 4) for _ in range(10)), num_batches=3)
    assert int(net[1].num_batches_tracked) == 3 and net.training
    with pytest.raises(SurgeryError, match="no batches"):
        surgery.recalibrate_bn(net, [])
    with pytest.raises(SurgeryError, match="no BatchNorm"):
        surgery.recalibrate_bn(nn.Linear(2, 2), [torch.randn(1, 2)])
