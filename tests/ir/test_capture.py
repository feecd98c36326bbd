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


# ---------------------------------------------------------------------------------------------
# the input check a captured graph runs on every call (fxpress/ir/input_check.py)

import copy  # noqa: E402

from torch.export import Dim  # noqa: E402
from torch.export._unlift import _check_input_constraints_pre_hook  # noqa: E402

from fxpress.ir.capture import InputMismatchError  # noqa: E402
from fxpress.ir.input_check import InputCheck, input_check_of, remove_input_check  # noqa: E402


@pytest.fixture(scope="module")
def cnn_graph():
    model, (x,) = conv_bn_relu_cnn(batch=1)  # input (1, 3, 16, 16), dim 0 dynamic
    return model, fxpress.capture(model, (x,))


def _message(gm, *args, **kwargs) -> str:
    with pytest.raises(InputMismatchError) as info:
        gm(*args, **kwargs)
    return str(info.value)


def test_capture_replaces_torch_input_hooks_by_fxpress_check(cnn_graph):
    _, gm = cnn_graph
    pre = list(gm._forward_pre_hooks.values())
    assert _check_input_constraints_pre_hook not in pre
    assert [type(h) for h in pre] == [InputCheck]
    assert not gm._forward_hooks  # torch's no-op exit hook is gone too
    assert not input_check_of(gm).uses_torch_check


@pytest.mark.parametrize("batch", [1, 2, 7, 33])
def test_dynamic_batch_accepts_any_size(cnn_graph, batch):
    model, gm = cnn_graph
    x = torch.randn(batch, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))
    assert gm(x=x).shape[0] == batch  # by keyword too


def test_wrong_number_of_inputs_names_the_inputs(cnn_graph):
    _, gm = cnn_graph
    message = _message(gm)
    assert "takes 1 input (x)" in message and "missing 'x'" in message
    message = _message(gm, torch.randn(1, 3, 16, 16), torch.randn(1, 3, 16, 16))
    assert "takes 1 input (x), got 2 positional" in message
    message = _message(gm, torch.randn(1, 3, 16, 16), y=torch.randn(1))
    assert "unexpected keyword input 'y'" in message
    message = _message(gm, torch.randn(1, 3, 16, 16), x=torch.randn(1, 3, 16, 16))
    assert "two values for input 'x'" in message


def test_non_tensor_input_says_what_was_expected(cnn_graph):
    _, gm = cnn_graph
    message = _message(gm, [[1.0, 2.0]])
    assert "input 'x' must be a tensor" in message and "got list" in message
    assert "float32 (*, 3, 16, 16)" in message and "torch.as_tensor" in message


def test_wrong_dtype_names_both_dtypes(cnn_graph):
    _, gm = cnn_graph
    message = _message(gm, torch.randn(2, 3, 16, 16, dtype=torch.float64))
    assert "input 'x' has dtype float64, expected float32" in message
    assert "x.to(torch.float32)" in message


def test_wrong_rank_suggests_the_batch_dim(cnn_graph):
    _, gm = cnn_graph
    message = _message(gm, torch.randn(3, 16, 16))
    assert "input 'x' has 3 dims" in message and "expected 4" in message
    assert "x.unsqueeze(0)" in message
    message = _message(gm, torch.randn(1, 1, 3, 16, 16))
    assert "input 'x' has 5 dims" in message and "pass a 4-d tensor" in message


@pytest.mark.parametrize("shape, dim, size, want", [((2, 4, 16, 16), 1, 4, 3), ((1, 3, 16, 20), 3, 20, 16)])
def test_static_dim_of_another_size_names_input_dim_and_sizes(cnn_graph, shape, dim, size, want):
    _, gm = cnn_graph
    message = _message(gm, torch.randn(*shape))
    assert f"input 'x' dim {dim} has size {size}, expected {want}" in message
    assert f"got {shape}" in message
    # the fix: inputs of the captured shape, or a capture with this dim dynamic (the batch stays dynamic)
    assert "(*, 3, 16, 16)" in message
    assert f"dynamic_shapes={{'x': {{0: Dim.DYNAMIC, {dim}: Dim.DYNAMIC}}}}" in message


def test_the_errors_are_value_and_runtime_errors(cnn_graph):
    _, gm = cnn_graph
    for kind in (ValueError, RuntimeError):
        with pytest.raises(kind):
            gm(torch.randn(2, 4, 16, 16))


def test_static_capture_checks_the_batch_too():
    model, (x,) = mlp()
    gm = fxpress.capture(model, (x,), dynamic_batch=False)
    message = _message(gm, torch.randn(x.shape[0] + 3, *x.shape[1:]))
    assert f"input 'x' dim 0 has size {x.shape[0] + 3}, expected {x.shape[0]}" in message
    assert "dynamic_shapes={'x': {0: Dim.DYNAMIC}}" in message


class _TwoInputs(nn.Module):
    def forward(self, x, scale):
        return x * scale


def test_dims_captured_equal_must_agree_and_keyword_or_positional_both_work():
    gm = fxpress.capture(_TwoInputs(), (torch.randn(2, 4),), {"scale": torch.randn(2, 1)})
    torch.testing.assert_close(gm(torch.ones(5, 4), torch.full((5, 1), 2.0)), torch.full((5, 4), 2.0))
    torch.testing.assert_close(gm(torch.ones(5, 4), scale=torch.full((5, 1), 2.0)), torch.full((5, 4), 2.0))
    message = _message(gm, torch.ones(5, 4), scale=torch.ones(3, 1))
    assert "input 'scale' dim 0 has size 3, but input 'x' dim 0 has size 5" in message
    assert "missing 'scale'" in _message(gm, torch.ones(5, 4))


def test_dynamic_dim_range_is_enforced():
    model = nn.Linear(3, 2).eval()
    gm = fxpress.capture(model, (torch.randn(4, 3),), dynamic_shapes=({0: Dim("b", min=3, max=10)},))
    for n in (3, 10):
        assert gm(torch.randn(n, 3)).shape == (n, 2)
    for n in (2, 11):
        message = _message(gm, torch.randn(n, 3))
        assert f"input 'input' dim 0 has size {n}, expected a size in [3, 10]" in message


class _Scaled(nn.Module):
    def forward(self, x, n: int):
        return x * n


def test_a_captured_constant_must_keep_its_value():
    gm = fxpress.capture(_Scaled(), (torch.randn(2, 3), 3))
    torch.testing.assert_close(gm(torch.ones(4, 3), 3), torch.full((4, 3), 3.0))
    message = _message(gm, torch.ones(4, 3), 4)
    assert "input 'n' was captured as the constant 3" in message and "got 4" in message


class _DictInput(nn.Module):
    def forward(self, d):
        return d["a"] + d["b"]


def test_nested_inputs_fall_back_to_torch_check():
    gm = fxpress.capture(_DictInput(), ({"a": torch.randn(2, 3), "b": torch.randn(2, 3)},))
    assert input_check_of(gm).uses_torch_check
    assert gm({"a": torch.ones(4, 3), "b": torch.ones(4, 3)}).shape == (4, 3)
    with pytest.raises(RuntimeError, match=r"\['a'\]\.shape\[1\]"):
        gm({"a": torch.ones(4, 5), "b": torch.ones(4, 5)})


def test_check_survives_deepcopy_and_follows_a_recompile(cnn_graph):
    _, gm = cnn_graph
    copied = copy.deepcopy(gm)
    check = input_check_of(copied)
    assert check is not None and check is not input_check_of(gm)
    assert "dim 1 has size 4" in _message(copied, torch.randn(2, 4, 16, 16))
    assert copy.deepcopy(copied)(torch.randn(3, 3, 16, 16)).shape[0] == 3  # a copy of a copy
    # a pass that edits the graph recompiles it: the next call re-reads the placeholders
    x = copied.graph.find_nodes(op="placeholder")[0]
    x.meta["val"] = x.meta["val"].to(torch.float64)
    copied.recompile()
    assert "has dtype float32, expected float64" in _message(copied, torch.randn(2, 3, 16, 16))


def test_validate_inputs_false_or_removing_the_check_turns_it_off(cnn_graph):
    _, gm = cnn_graph
    copied = copy.deepcopy(gm)
    copied.validate_inputs = False
    with pytest.raises(RuntimeError) as info:
        copied(torch.randn(2, 4, 16, 16))
    assert not isinstance(info.value, InputMismatchError)  # the error from deep inside the graph
    remove_input_check(copied)
    assert not copied._forward_pre_hooks and input_check_of(copy.deepcopy(copied)) is None


def test_fake_inputs_are_checked_without_adding_guards(cnn_graph):
    _, gm = cnn_graph
    check = input_check_of(gm)
    x = copy.deepcopy(gm).graph.find_nodes(op="placeholder")[0].meta["val"]  # a FakeTensor, batch symbolic
    env = x.fake_mode.shape_env
    assert isinstance(x.shape[0], torch.SymInt)
    with x.fake_mode:
        bad = x.new_empty((x.shape[0], 4, 16, 16))
    guards, replacements = len(env.guards), dict(env.replacements)
    check(gm, (x,), {})
    with pytest.raises(InputMismatchError, match="dim 1 has size 4"):
        check(gm, (bad,), {})
    assert len(env.guards) == guards and env.replacements == replacements  # the batch was not guarded on


def test_torch_compile_of_a_captured_graph(cnn_graph):
    model, gm = cnn_graph
    compiled = torch.compile(gm, backend="eager")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


def test_saved_and_loaded_graph_checks_its_inputs(cnn_graph, tmp_path):
    _, gm = cnn_graph
    fxpress.save(gm, tmp_path / "m.pt2")
    loaded = fxpress.load(tmp_path / "m.pt2")
    assert _check_input_constraints_pre_hook not in loaded._forward_pre_hooks.values()
    assert input_check_of(loaded) is not None
    assert loaded(torch.randn(6, 3, 16, 16)).shape[0] == 6
    assert "input 'x' dim 1 has size 4, expected 3" in _message(loaded, torch.randn(2, 4, 16, 16))
