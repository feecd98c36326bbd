"""The verifier: each IR invariant, broken on purpose, is caught with a message naming the node."""

import pytest
import torch
from models import ALL_SMALL, mlp

import fxpress
from fxpress.ir import VerificationError, compare_outputs, refresh_meta, verify_graph
from fxpress.ir.graph import set_attr_value
from fxpress.ir.verify import max_abs_diff

aten = torch.ops.aten


@pytest.mark.parametrize("name", sorted(ALL_SMALL))
def test_freshly_captured_graphs_verify(name):
    model, args = ALL_SMALL[name]()
    verify_graph(fxpress.capture(model, args))


def test_missing_meta_val_is_named():
    model, args = mlp()
    gm = fxpress.capture(model, args)
    relu = next(n for n in gm.graph.nodes if n.target == aten.relu.default)
    del relu.meta["val"]
    with pytest.raises(VerificationError, match=f"without meta\\['val'\\]: {relu.name}"):
        verify_graph(gm)
    verify_graph(gm, check_meta=False)  # lint alone still passes


def test_stale_meta_val_is_caught_and_refresh_fixes_it():
    model, args = mlp()
    gm = fxpress.capture(model, args)
    relu = next(n for n in gm.graph.nodes if n.target == aten.relu.default)
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    relu.meta["val"] = x.meta["val"]  # [s, 16] where the relu really gives [s, 32]
    with pytest.raises(VerificationError, match=f"meta\\['val'\\] of {relu.name} .* is stale"):
        verify_graph(gm)
    refresh_meta(gm)
    verify_graph(gm)
    assert relu.meta["val"].shape[1] == 32


def test_refresh_meta_after_a_shape_change():
    model, args = mlp()
    gm = fxpress.capture(model, args)
    # widen fc3 from 10 to 12 outputs: a shape-changing edit
    set_attr_value(gm, "fc3.weight", torch.randn(12, 32))
    set_attr_value(gm, "fc3.bias", torch.randn(12))
    with pytest.raises(VerificationError, match="stale"):
        verify_graph(gm)
    refresh_meta(gm)
    verify_graph(gm)
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert out[0].meta["val"].shape[-1] == 12
    assert isinstance(out[0].meta["val"].shape[0], torch.SymInt)  # the batch stays symbolic


def test_lint_failure_is_reported():
    model, args = mlp()
    gm = fxpress.capture(model, args)
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    calls[0].args = (calls[-1], *calls[0].args[1:])  # reads a node defined after it
    with pytest.raises(VerificationError, match="does not lint"):
        verify_graph(gm)


def test_missing_attribute_is_a_lint_error():
    model, args = mlp()
    gm = fxpress.capture(model, args)
    delattr(gm.fc1, "weight")
    with pytest.raises(VerificationError):
        verify_graph(gm)


def test_compare_outputs_names_output_and_bound():
    ref = (torch.zeros(3), torch.ones(2))
    compare_outputs(ref, (torch.zeros(3), torch.ones(2) + 1e-6), atol=1e-5, rtol=0, what="p")
    with pytest.raises(VerificationError, match=r"p: output 1 differs by up to 0\.1 \(allowed 1e-05"):
        compare_outputs(ref, (torch.zeros(3), torch.ones(2) + 0.1), atol=1e-5, rtol=0, what="p")
    # the relative part of the bound scales with the reference's magnitude
    compare_outputs((torch.full((2,), 1000.0),), (torch.full((2,), 1000.05),), atol=0, rtol=1e-4, what="p")


def test_max_abs_diff_catches_structural_changes():
    assert max_abs_diff((torch.zeros(2),), (torch.full((2,), 0.5),)) == [0.5]
    with pytest.raises(VerificationError, match="output count changed: 1"):
        max_abs_diff((torch.zeros(2),), (torch.zeros(2), torch.zeros(2)))
    with pytest.raises(VerificationError, match=r"output 0 changed shape: \(2,\)"):
        max_abs_diff((torch.zeros(2),), (torch.zeros(3),))


def test_nan_outputs_never_pass_a_tolerance_check():
    from fxpress.ir.verify import VerificationError, compare_outputs, max_abs_diff

    ref = torch.tensor([1.0, float("nan"), 3.0])
    assert max_abs_diff(ref, ref.clone()) == [0.0]  # NaN where the reference has NaN is equal
    broken = torch.tensor([1.0, float("nan"), float("nan")])
    assert max_abs_diff(ref, broken) == [float("inf")]
    with pytest.raises(VerificationError, match="differs by up to inf"):
        compare_outputs(ref, broken, atol=1e-4, rtol=1e-4, what="nan check")
