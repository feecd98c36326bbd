"""FakeQuantize: the straight-through estimator, LSQ, weights following the optimizer, frozen observers."""

import pytest
import torch

from fxpress.passes.quant.fake_quant import FakeQuantize, QATBatchNorm
from fxpress.passes.quant.observers import make_observer


def _act(**kw) -> FakeQuantize:
    return FakeQuantize(make_observer("minmax"), "activation", **kw)


def test_ste_passes_gradient_inside_the_range_and_blocks_it_outside():
    fq = _act()
    fq(torch.tensor([0.0, 1.0]))  # range [0, 1]: scale 1/255
    fq.observer_enabled = False
    x = torch.tensor([-0.5, 0.25, 0.5, 2.0], requires_grad=True)
    y = fq(x)
    y.sum().backward()
    y = y.detach()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 0.0]))
    scale = float(fq.qparams().scale)
    assert torch.allclose(y[1:3], torch.round(x[1:3].detach() / scale) * scale)
    assert float(y[0]) == 0 and abs(float(y[3]) - 1.0) < 1e-6  # clipped to the range


def test_lsq_scale_is_learned_and_qparams_stay_convertible():
    fq = _act(learnable=True)
    fq(torch.linspace(-1, 1, 100))  # starts from the observer
    start = fq.qparams()
    assert start.scale.dim() == 0 and start.zero_point.dtype == torch.int64
    opt = torch.optim.SGD([fq.scale, fq.zero_point], lr=1e-3)
    for _ in range(3):
        x = torch.randn(256) * 3  # wider than the start range: the scale must grow
        loss = (fq(x) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        assert fq.scale.grad is not None and fq.scale.grad.abs().sum() > 0
        opt.step()
    assert float(fq.qparams().scale) > float(start.scale)


def test_weight_fake_quant_follows_the_weight_also_in_eval():
    w = torch.nn.Parameter(torch.randn(4, 3))
    fq = FakeQuantize(make_observer("minmax", dtype=torch.int8, symmetric=True, axis=0), "weight").eval()
    fq(w)
    with torch.no_grad():
        w.mul_(10)  # an optimizer step in place
    y = fq(w)
    assert torch.allclose(fq.qparams().scale, w.detach().abs().amax(1) / 127.5)
    assert (y - w).abs().max() <= fq.qparams().scale.max() / 2 + 1e-6


def test_observers_stop_after_observe_steps():
    fq = _act(observe_steps=2)
    for i in range(4):
        fq(torch.full((8,), float(i + 1)))
    assert int(fq.observer.num_batches) == 2 and int(fq.steps) == 4
    assert abs(float(fq.observer.max_val) - 2.0) < 1e-6


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="role"):
        FakeQuantize(make_observer("minmax"), "bias")
    with pytest.raises(ValueError, match="observe_steps"):
        _act(observe_steps=-1)
    with pytest.raises(ValueError, match="refresh_every"):
        _act(refresh_every=0)


def test_qat_batch_norm_freezes_after_n_steps():
    bn = QATBatchNorm(0.1, 1e-5, freeze_after=2)
    w, b = torch.ones(3), torch.zeros(3)
    mean, var = torch.zeros(3), torch.ones(3)
    for _ in range(2):
        bn(torch.randn(8, 3, 4, 4) + 5, w, b, mean, var)
    assert not bool(bn.frozen) and float(mean.mean()) > 0.5  # batch statistics were folded in
    kept = mean.clone()
    y = bn(torch.randn(8, 3, 4, 4) + 5, w, b, mean, var)
    assert bool(bn.frozen) and torch.equal(mean, kept)  # frozen: running statistics used, not updated
    assert float(y.mean()) > 1.0  # normalized with the running mean, not the batch's
