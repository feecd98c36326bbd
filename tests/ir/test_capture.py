"""capture(): every small model, dynamic batch, and the errors a user meets (with their fixes)."""

import warnings

import pytest
import torch
import torch.nn as nn
from models import ALL_SMALL, conv_bn_relu_cnn, mlp, resnet18, tiny_bert

import fxpress
from fxpress.ir import dynamic_shapes_of
from fxpress.ir.capture import dynamic_dims


def _like(x: torch.Tensor, batch: int) -> torch.Tensor:
    if x.dtype == torch.long:
        return torch.randint(0, 100, (batch, *x.shape[1:]))
    return torch.randn(batch, *x.shape[1:])


@pytest.mark.parametrize("name", sorted(ALL_SMALL))
def test_capture_small_model_matches_eager_and_keeps_meta(name):
    model, args = ALL_SMALL[name]()
    gm = fxpress.capture(model, args)
    assert isinstance(gm, torch.fx.GraphModule)
    with torch.no_grad():
        torch.testing.assert_close(gm(*args), model(*args))
    # every placeholder / get_attr / call carries a fake value, the IR's shape contract
    missing = [n.name for n in gm.graph.nodes if n.op != "output" and "val" not in n.meta]
    assert not missing
    # ATen vocabulary: no call_module / call_method nodes survive capture
    assert {n.op for n in gm.graph.nodes} <= {"placeholder", "get_attr", "call_function", "output"}
    assert dynamic_dims(gm) == [(0,)] * len(args)
    assert gm.training is False


@pytest.mark.parametrize("name", ["mlp", "conv_bn_relu_cnn", "residual_block", "transformer_block", "concat_block"])
def test_captured_at_batch_1_runs_at_batch_8(name):
    model, args = ALL_SMALL[name](batch=1)
    gm = fxpress.capture(model, args)
    big = tuple(_like(a, 8) for a in args)
    with torch.no_grad():
        out = gm(*big)
        torch.testing.assert_close(out, model(*big))
    assert out.shape[0] == 8
    assert dynamic_shapes_of(gm) is not None


def test_static_capture_when_asked():
    model, args = mlp()
    gm = fxpress.capture(model, args, dynamic_batch=False)
    assert dynamic_dims(gm) == [()]
    assert dynamic_shapes_of(gm) is None


class _DataDependentBranch(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x - 1


def test_data_dependent_branch_raises_capture_error_pointing_to_torch_cond():
    with pytest.raises(fxpress.CaptureError) as info:
        fxpress.capture(_DataDependentBranch(), (torch.randn(2, 3),))
    message = str(info.value)
    assert "torch.cond" in message
    assert "_DataDependentBranch" in message
    assert "non-strict" in message and "strict export" in message  # both attempts are reported


@pytest.mark.parametrize(
    "bad, words",
    [
        ("not a tensor", ["tensor or a tuple", "str"]),
        ([1, 2, 3], ["no tensor", "int"]),
        (None, ["tensor or a tuple", "NoneType"]),
    ],
)
def test_bad_example_inputs_raise_type_error_with_help(bad, words):
    model, _ = mlp()
    with pytest.raises(TypeError) as info:
        fxpress.capture(model, bad)
    for w in words:
        assert w in str(info.value)


def test_capture_rejects_a_non_module():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fxpress.capture(lambda x: x, (torch.randn(2),))


def test_lone_tensor_and_list_inputs_are_normalized():
    model, (x,) = mlp()
    for args in (x, [x]):
        gm = fxpress.capture(model, args)
        torch.testing.assert_close(gm(x), model(x))


class _BatchSpecialized(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 4)

    def forward(self, x):
        return self.fc(x.reshape(2, -1))  # the batch size 2 is baked in


def test_batch_specialization_captures_static_with_one_warning():
    model = _BatchSpecialized().eval()
    x = torch.randn(2, 3, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = fxpress.capture(model, (x,))
    ours = [w for w in caught if "fxpress.capture" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert "fixes its batch size" in str(ours[0].message)
    assert dynamic_dims(gm) == [()]
    torch.testing.assert_close(gm(x), model(x))
    # the user's sample tensor is left as it was: no dynamic-dim marks from the failed attempt
    assert not getattr(x, "_dynamo_dynamic_indices", None)


def test_capture_leaves_the_example_tensor_unmarked_and_reusable():
    model, (x,) = mlp()
    fxpress.capture(model, (x,))
    assert not getattr(x, "_dynamo_dynamic_indices", None)
    gm = fxpress.capture(model, (x,), dynamic_batch=False)  # a second capture of the same sample
    assert dynamic_dims(gm) == [()]


def test_capture_records_train_mode():
    model, args = conv_bn_relu_cnn()
    model.train()
    gm = fxpress.capture(model, args)
    assert gm.training is True
    bn = [n for n in gm.graph.nodes if n.target == torch.ops.aten.batch_norm.default]
    assert bn and all(n.args[5] is True for n in bn)  # the `training` flag is frozen into the graph


def test_keyword_inputs_are_dynamic_too():
    class TwoInputs(nn.Module):
        def forward(self, x, scale):
            return x * scale

    x, s = torch.randn(2, 4), torch.randn(2, 1)
    gm = fxpress.capture(TwoInputs(), (x,), {"scale": s})
    assert dynamic_dims(gm) == [(0,), (0,)]
    torch.testing.assert_close(gm(torch.ones(5, 4), scale=torch.full((5, 1), 3.0)), torch.full((5, 4), 3.0))


def test_varargs_forward_is_dynamic_too():
    class VarArgs(nn.Module):
        def forward(self, *xs, **kw):
            return xs[0] + xs[1] * kw["s"]

    args, kwargs = (torch.randn(2, 3), torch.randn(2, 3)), {"s": torch.randn(2, 1)}
    gm = fxpress.capture(VarArgs(), args, kwargs)
    assert dynamic_dims(gm) == [(0,), (0,), (0,)]
    a, b, s = torch.randn(5, 3), torch.randn(5, 3), torch.randn(5, 1)
    torch.testing.assert_close(gm(a, b, s=s), a + b * s)


@pytest.mark.slow
def test_resnet18_captured_at_batch_1_runs_at_batch_8():
    model, args = resnet18(batch=1)
    gm = fxpress.capture(model, args)
    x = torch.randn(8, *args[0].shape[1:])
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_tiny_bert_captures_with_dynamic_batch():
    model, args = tiny_bert()
    gm = fxpress.capture(model, args)
    ids = torch.randint(0, 100, (5, args[0].shape[1]))
    with torch.no_grad():
        out = gm(ids)
        torch.testing.assert_close(out, model(ids), atol=1e-5, rtol=1e-5)
    assert out.shape == (5, args[0].shape[1], 64)


@pytest.mark.parametrize(
    "x, words",
    [
        (torch.randn(1, 4, 8, 8), "expected input"),
        (torch.randn(1, 3, 9, 9), "cannot be multiplied"),
        (torch.randn(1, 3, 8, 8, dtype=torch.float64), "double"),
    ],
)
def test_inputs_of_the_wrong_shape_or_dtype_say_so(x, words):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 4)).eval()
    with pytest.raises(fxpress.CaptureError) as info:
        fxpress.capture(model, (x,))
    message = str(info.value)
    assert "fails on the example inputs even without tracing" in message
    assert words in message
    assert f"{tuple(x.shape)}" in message and "shapes and dtypes forward() expects" in message
