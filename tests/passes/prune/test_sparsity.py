"""sparsify and sparsity_report: achieved sparsity, N:M masks, skips with reasons, numerics against a
hand-applied mask, no mutation of the input, dynamic batch, ONNX parity, bad input, and an accuracy
sanity check on the digits CNN.

Oracles (numerics): the sparse graph equals the original model with the same weights zeroed by hand
(a mask computed in this file, independently of the pass), to float rounding (atol 1e-5, rtol 1e-4);
sparsity 0 leaves the outputs bit-identical.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxpress
from fxpress.ir.capture import capture
from fxpress.passes import PassManager
from fxpress.passes.prune.sparsity import Sparsify, input_channel_norms
from tests.models import conv_bn_relu_cnn, conv_transpose_bn, inverted_residual, mlp, transformer_block

FACTORIES = [mlp, inverted_residual, transformer_block, conv_transpose_bn]  # conv_bn_relu_cnn: the tests below


def _run(m, args):
    with torch.no_grad():
        return m(*args)


def _hand_masked(model: nn.Module, sparsity: float) -> nn.Module:
    """A copy of the eager model with the round(s * n) smallest |w| of every conv/linear weight zeroed."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for mod in out.modules():
            w = None
            if isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)):
                w = mod.weight
            elif isinstance(mod, nn.MultiheadAttention):
                for p in (mod.in_proj_weight, mod.out_proj.weight):
                    _zero_smallest(p, sparsity)
            if w is not None:
                _zero_smallest(w, sparsity)
    return out


def _zero_smallest(w: torch.Tensor, sparsity: float) -> None:
    k = math.floor(sparsity * w.numel() + 0.5)
    order = torch.argsort(w.abs().reshape(-1), stable=True)
    w.view(-1)[order[:k]] = 0


# ---------------------------------------------------------------------------------------------
# structure and numerics


@pytest.mark.parametrize("factory", FACTORIES, ids=lambda f: f.__name__)
def test_layer_sparsity_hits_target_and_equals_hand_mask(factory):
    model, args = factory()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sparse = fxpress.sparsify(model, args, 0.5)
    rep = fxpress.sparsity_report(sparse)
    assert rep.sparsified and not rep.skipped
    for layer in rep.layers:
        assert layer.zeros == math.floor(0.5 * layer.total + 0.5), layer
    torch.testing.assert_close(_run(sparse, args), _run(_hand_masked(model, 0.5), args), atol=1e-5, rtol=1e-4)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "the input model was changed"


def test_global_scope_reaches_target_overall_not_per_layer():
    model, args = conv_bn_relu_cnn()
    sparse = fxpress.sparsify(model, args, 0.6, scope="global")
    rep = fxpress.sparsity_report(sparse)
    total = sum(x.total for x in rep.sparsified)
    assert sum(x.zeros for x in rep.sparsified) == math.floor(0.6 * total + 0.5)
    assert len({round(x.sparsity, 2) for x in rep.sparsified}) > 1
    # one threshold: every zeroed |w| is <= every kept |w| across all layers
    orig = {x.target: model.state_dict()[x.target].abs() for x in rep.sparsified}
    now = {x.target: sparse.state_dict()[x.target] for x in rep.sparsified}
    dropped = torch.cat([orig[t][now[t] == 0] for t in orig])
    kept = torch.cat([orig[t][now[t] != 0] for t in orig])
    assert dropped.max() <= kept.min()


def test_output_scope_zeroes_the_same_fraction_of_every_row():
    model, args = mlp()
    sparse = fxpress.sparsify(model, args, 0.25, scope="output")
    for name in ("fc1", "fc2", "fc3"):
        w = getattr(sparse, name).weight
        assert ((w == 0).sum(1) == math.floor(0.25 * w.shape[1] + 0.5)).all()


def _check_nm(w_sparse: torch.Tensor, w_orig: torch.Tensor, dim: int, n: int, m: int) -> None:
    s = w_sparse.movedim(dim, -1).reshape(-1, m)
    o = w_orig.abs().movedim(dim, -1).reshape(-1, m)
    assert ((s != 0).sum(1) <= n).all()
    for row_s, row_o in zip(s, o):
        kept, dropped = row_o[row_s != 0], row_o[row_s == 0]
        if len(kept) and len(dropped):
            assert kept.min() >= dropped.max()


@pytest.mark.parametrize("pattern,n,m", [("2:4", 2, 4), ("1:4", 1, 4), ("4:8", 4, 8)])
def test_nm_masks_keep_the_largest_along_the_input_channels(pattern, n, m):
    model, args = conv_bn_relu_cnn()
    sparse = fxpress.sparsify(model, args, pattern=pattern)
    rep = fxpress.sparsity_report(sparse)
    assert rep.pattern == pattern and math.isclose(rep.target, 1 - n / m)
    for x in rep.sparsified:
        assert x.conforms is True and x.zeros == x.total * (m - n) // m
    # conv: groups run along dim 1 (input channels) at each kernel position; linear: along dim 1
    for name in ("conv2", "conv3", "fc"):
        if name in {x.layer for x in rep.sparsified}:
            _check_nm(getattr(sparse, name).weight, getattr(model, name).weight.detach(), 1, n, m)
    skipped = dict(rep.skipped)
    assert "not a multiple of" in skipped["conv1 [conv1.weight]"]  # 3 input channels
    assert rep.layer("conv1").zeros == 0 and rep.layer("conv1").pattern is None


def test_2_4_on_transposed_and_grouped_convs():
    model, args = conv_transpose_bn()  # up1: [8, 6, 3, 3] groups 2 (in channels on dim 0); up2: [12, 4, 2, 2]
    sparse = fxpress.sparsify(model, args, pattern="2:4")
    rep = fxpress.sparsity_report(sparse)
    assert {x.layer for x in rep.sparsified} == {"up1", "up2"}
    for name in ("up1", "up2"):
        _check_nm(getattr(sparse, name).weight, getattr(model, name).weight.detach(), 0, 2, 4)


def test_matmul_constants_shared_and_computed_weights():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.W = nn.Parameter(torch.randn(16, 8))  # x @ W: reduces over dim 0
            self.V = nn.Parameter(torch.randn(12, 8))  # z @ V.t(): reduces over dim 1 of V
            self.emb = nn.Embedding(10, 12)  # tied: read by embedding and by a linear
            self.fc = nn.Linear(12, 4)
            self.tiny = nn.Linear(4, 4)

        def forward(self, x, ids):
            z = x @ self.W
            h = z @ self.V.t() + self.emb(ids).mean(1)
            logits = F.linear(h, self.emb.weight)
            return self.tiny(self.fc(h)) + F.linear(self.fc(h), self.tiny.weight * 2).sum() + logits.sum()

    model = M().eval()
    args = (torch.randn(3, 16), torch.randint(0, 10, (3, 5)))
    sparse = fxpress.sparsify(model, args, pattern="2:4", min_params=20)
    rep = fxpress.sparsity_report(sparse)
    assert {x.target for x in rep.sparsified} == {"W", "V", "fc.weight"}
    _check_nm(sparse.W, model.W.detach(), 0, 2, 4)
    _check_nm(sparse.V, model.V.detach(), 1, 2, 4)
    reasons = " | ".join(f"{w}: {r}" for w, r in rep.skipped)
    assert "emb.weight]: also read by aten.embedding" in reasons
    assert "tiny.weight]: also read by aten.mul" in reasons  # the weight also feeds a computation
    assert "its weight is computed in the graph (aten.mul)" in reasons
    # a shared weight is never zeroed, so the embedding lookup is unchanged
    assert torch.equal(sparse.emb.weight, model.emb.weight)


def test_ignore_and_min_params_are_reported():
    model, args = conv_bn_relu_cnn()
    sparse = fxpress.sparsify(model, args, 0.5, ignore=["fc", model.conv2], min_params=250)
    rep = fxpress.sparsity_report(sparse)
    skipped = dict(rep.skipped)
    assert skipped["fc [fc.weight]"] == "ignored ('fc')"
    assert skipped["conv2 [conv2.weight]"] == "ignored ('conv2')"
    assert skipped["conv1 [conv1.weight]"] == "216 weights < min_params=250"
    assert [x.layer for x in rep.sparsified] == ["conv3"]
    text = str(rep)
    assert "ignored ('fc')" in text and "conv3" in text and "achieved 50.00%" in text


def test_pass_by_name_report_and_sparsity_zero_is_identity():
    model, args = mlp()
    gm = capture(model, args)
    ref = _run(gm, args)
    out, report = PassManager([("sparsify", {"sparsity": 0.0})]).run(copy.deepcopy(gm), args)
    assert torch.equal(_run(out, args), ref) and not report["sparsify"].modified
    out, report = PassManager([("sparsify", {"pattern": "2:4"})]).run(copy.deepcopy(gm), args)
    rep = report["sparsify"]
    assert rep.counts["layers sparsified"] == 3 and rep.counts["weights zeroed"] == (512 + 1024 + 320) // 2
    assert any("no speed-up" in n for n in rep.notes)
    # running it again changes nothing: the fixpoint loop can rely on `modified`
    assert not Sparsify(pattern="2:4")(out).modified


def test_graph_input_is_copied_and_batch_stays_dynamic(tmp_path):
    model, args = conv_bn_relu_cnn()
    gm = capture(model, args)
    weights = {k: v.clone() for k, v in gm.state_dict().items()}
    sparse = fxpress.sparsify(gm, args, pattern="2:4")
    assert all(torch.equal(v, weights[k]) for k, v in gm.state_dict().items())
    assert isinstance(sparse.conv2.weight, nn.Parameter)
    x5 = torch.randn(5, 3, 16, 16)
    ref = _hand_2_4(model)
    torch.testing.assert_close(_run(sparse, (x5,)), _run(ref, (x5,)), atol=1e-5, rtol=1e-4)
    res = fxpress.export_onnx(sparse, args, tmp_path / "sparse.onnx")
    torch.testing.assert_close(torch.as_tensor(res.session()(x5)), _run(sparse, (x5,)), atol=1e-4, rtol=1e-4)


def _hand_2_4(model: nn.Module) -> nn.Module:
    out = copy.deepcopy(model)
    with torch.no_grad():
        for mod in out.modules():
            if isinstance(mod, (nn.Linear, nn.Conv2d)) and mod.weight.shape[1] % 4 == 0:
                w = mod.weight.movedim(1, -1)
                g = w.reshape(-1, 4)
                for row in g:
                    drop = row.abs().argsort()[:2]
                    row[drop] = 0
                mod.weight.copy_(g.reshape(w.shape).movedim(-1, 1))
    return out


def test_wanda_scales_magnitude_by_input_channel_rms():
    model, args = mlp()
    x = torch.randn(64, 16)
    x[:, :4] *= 20  # four loud input channels: their weights must survive
    sparse = fxpress.sparsify(model, args, 0.5, calibration=[x[:32], (x[32:],)], scope="output")
    rep = fxpress.sparsity_report(sparse)
    assert rep.importance == "wanda"
    w = sparse.fc1.weight
    assert (w[:, :4] == 0).float().mean() < 0.1 < (w[:, 4:] == 0).float().mean()
    rms = x.pow(2).mean(0).sqrt()
    score = model.fc1.weight.detach().abs() * rms
    keep = score.argsort(dim=1, descending=True)[:, :8]
    assert torch.equal((w != 0), torch.zeros_like(w, dtype=torch.bool).scatter(1, keep, True))
    norms = input_channel_norms(capture(model, args), [(x,)])
    torch.testing.assert_close(norms["linear"], rms)


def test_sparsity_report_measures_tensors_not_the_record():
    model, args = mlp()
    sparse = fxpress.sparsify(model, args, pattern="2:4")
    with torch.no_grad():
        sparse.fc2.weight.fill_(1.0)  # e.g. fine-tuning regrew the zeros
    rep = fxpress.sparsity_report(sparse)
    assert rep.layer("fc2").zeros == 0 and rep.layer("fc2").conforms is False
    assert any("fc2.weight: 0 zeros now" in n for n in rep.notes)
    eager = fxpress.sparsity_report(_hand_2_4(model), pattern="2:4")
    assert all(x.conforms for x in eager.layers) and math.isclose(eager.weight_sparsity, 0.5)
    assert fxpress.sparsity_report(model, pattern="2:4").layer("fc1").conforms is False


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(sparsity=1.0), r"sparsity must be a number in \[0, 1\)"),
        (dict(sparsity=-0.1), r"sparsity must be a number in \[0, 1\)"),
        (dict(pattern="block"), r"unknown sparsity pattern 'block'.*'2:4'"),
        (dict(pattern="4:4"), r"1 <= N < M"),
        (dict(pattern="2:4", sparsity=0.7), r"sparsity 0.5 exactly.*Leave sparsity unset"),
        (dict(pattern="2:4", scope="global"), r"scope='global' applies to unstructured sparsity only"),
        (dict(scope="model"), r"scope must be one of"),
        (dict(importance="l7"), r"unknown importance 'l7'"),
        (dict(importance="wanda"), r"needs calibration data"),
        (dict(importance="magnitude", calibration=[torch.randn(2, 16)]), r"only used by importance='wanda'"),
        (dict(min_params=-1), r"min_params must be an integer >= 0"),
        (dict(ignore=["fc9"]), r"ignored layers not found in the model: 'fc9' \(did you mean .*'fc1'"),
        (dict(semi_structured=True), r"semi_structured=True needs pattern='2:4'"),
    ],
)
def test_bad_options_fail_clearly(kwargs, match):
    model, args = mlp()
    with pytest.raises(ValueError, match=match):
        fxpress.sparsify(model, args, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_semi_structured_without_a_gpu_says_what_it_needs():
    model, args = mlp()
    with pytest.raises(RuntimeError, match=r"compute capability 8.0 or newer.*no CUDA device"):
        fxpress.sparsify(model, args, pattern="2:4", semi_structured=True)


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0), reason="needs an NVIDIA GPU with sm80+"
)
def test_semi_structured_on_gpu_matches_dense_zeros():
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 64)).eval().half().cuda()
    x = torch.randn(32, 128, dtype=torch.half, device="cuda")
    dense = fxpress.sparsify(model, (x,), pattern="2:4")
    fast = fxpress.sparsify(model, (x,), pattern="2:4", semi_structured=True)
    rep = fxpress.sparsity_report(fast)
    assert all(layer.semi_structured for layer in rep.sparsified), rep.skipped
    torch.testing.assert_close(_run(fast, (x,)), _run(dense, (x,)), atol=2e-2, rtol=2e-2)


# ---------------------------------------------------------------------------------------------
# real data


def test_digits_cnn_keeps_accuracy_at_50_percent_global():
    from fxpress.demo import accuracy, train_digits_cnn

    model, (x_train, _, x_test, y_test) = train_digits_cnn(epochs=3, progress=False)
    base = accuracy(model, x_test, y_test)
    sparse = fxpress.sparsify(model, (x_test[:2],), 0.5, scope="global")
    assert math.isclose(fxpress.sparsity_report(sparse).sparsity, 0.5, abs_tol=1e-3)
    assert accuracy(sparse, x_test, y_test) >= base - 3.0
    # the 1-channel stem has no 2:4 groups (skipped with the reason); the rest loses little
    two_four = fxpress.sparsify(model, (x_test[:2],), pattern="2:4", calibration=[x_train[:128]])
    rep = fxpress.sparsity_report(two_four)
    assert "stem.0 [stem.0.weight]" in dict(rep.skipped)
    assert accuracy(two_four, x_test, y_test) >= base - 15.0
