"""InputMoments: sum x x^T over valid tokens, shared exactly when layers see the same input tensor."""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lplr_convert.calibration.moments import InputMoments


class Net(nn.Module):
    """a and b see the same tensor; c sees an equal copy of it; d (Conv1D) sees a's output."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = nn.Linear(6, 5), nn.Linear(6, 3), nn.Linear(6, 2), Conv1D(4, 5)

    def forward(self, x):
        return self.d(self.a(x)).sum() + self.b(x).sum() + self.c(x.clone()).sum()


def test_moments_match_brute_force_and_share_by_tensor():
    g = torch.Generator().manual_seed(0)
    net = Net().double()
    xs = [torch.randn(3, 7, 6, generator=g, dtype=torch.float64) for _ in range(2)]
    masks = [torch.rand(3, 7, generator=g) > 0.3 for _ in range(2)]
    with torch.no_grad(), InputMoments(net, "net", torch.float64) as mom:
        for x, mask in zip(xs, masks):
            mom.start_batch(mask.long())
            net(x)
    assert mom.leader == {"net.a": "net.a", "net.b": "net.a", "net.c": "net.c", "net.d": "net.d"}
    assert mom.moments["net.a"].members == ["net.a", "net.b"]
    rows = torch.cat([x[m] for x, m in zip(xs, masks)])
    outs = torch.cat([net.a(x)[m] for x, m in zip(xs, masks)]).detach()
    n = int(sum(m.sum() for m in masks))
    for key, X in (("net.a", rows), ("net.c", rows), ("net.d", outs)):
        assert mom.moments[key].tokens == n
        # same products summed in another order: a few ulps of the largest entry
        torch.testing.assert_close(mom.moments[key].sum, X.T @ X, rtol=0, atol=64 * n * 2.3e-16 * X.abs().max() ** 2)
