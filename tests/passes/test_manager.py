"""PassManager: ordering, option and name errors, verification of broken passes, dumps, reports,
the fixpoint loop."""

import pytest
import torch
import torch.nn as nn
from models import conv_bn_relu_cnn, mlp

import fxpress
from fxpress.ir.graph import get_attr_value, set_attr_value
from fxpress.passes import Pass, PassError, PassManager, available_passes, get_pass, register_pass
from fxpress.passes.base import UnknownPassError

aten = torch.ops.aten


# ---------------------------------------------------------------------------------------------
# test passes, registered under names no real pass uses


@register_pass
class _CorruptMeta(Pass):
    """Claims a change and leaves a wrong meta["val"] behind (a shape-changing pass that forgot refresh)."""

    name = "test-corrupt-meta"

    def run(self, gm, report):
        relu = next(n for n in gm.graph.nodes if n.target == aten.relu.default)
        x = next(n for n in gm.graph.nodes if n.op == "placeholder")
        relu.meta["val"] = x.meta["val"]
        report.change("broke relu's meta")


@register_pass
class _LyingExact(Pass):
    """Claims exactness but doubles a weight."""

    name = "test-lying-exact"
    exact = True

    def run(self, gm, report):
        w = next(n for n in gm.graph.find_nodes(op="get_attr") if n.target.endswith("weight"))
        set_attr_value(gm, w.target, get_attr_value(gm, w.target) * 2)
        report.change(f"doubled {w.target}")


@register_pass
class _Crashes(Pass):
    name = "test-crashes"

    def run(self, gm, report):
        raise RuntimeError("boom")


@register_pass
class _RemoveOneMulByOne(Pass):
    """Removes one `x * 1` per call: needs as many iterations as there are multiplies."""

    name = "test-remove-one-mul"
    exact = True

    def run(self, gm, report):
        for n in gm.graph.nodes:
            if n.target == aten.mul.Tensor and n.args[1] == 1:
                n.replace_all_uses_with(n.args[0])
                gm.graph.erase_node(n)
                gm.recompile()
                report.change(f"removed {n.name}", kind="removed")
                return


@register_pass
class _CycleA(Pass):
    name = "test-cycle-a"
    run_after = ("test-cycle-b",)

    def run(self, gm, report):
        pass


@register_pass
class _CycleB(Pass):
    name = "test-cycle-b"
    run_after = ("test-cycle-a",)

    def run(self, gm, report):
        pass


@register_pass
class _WantsFirst(Pass):
    name = "test-wants-first"
    run_before = ("fold-constants",)

    def run(self, gm, report):
        pass


def _cnn():
    model, args = conv_bn_relu_cnn()
    return model, args, fxpress.capture(model, args)


# ---------------------------------------------------------------------------------------------
# ordering


def test_run_after_is_respected():
    pm = PassManager(["fold-batch-norm", "eliminate-dead-code", "fold-constants"])
    names = [p.name for p in pm.passes]
    assert names.index("fold-constants") < names.index("fold-batch-norm")
    assert names == ["fold-constants", "fold-batch-norm", "eliminate-dead-code"]  # otherwise as given


def test_run_before_and_explicit_constraints():
    pm = PassManager(["fold-constants", "test-wants-first"])
    assert [p.name for p in pm.passes] == ["test-wants-first", "fold-constants"]
    pm = PassManager(["fold-constants", "eliminate-dead-code"], constraints=[("eliminate-dead-code", "fold-constants")])
    assert [p.name for p in pm.passes] == ["eliminate-dead-code", "fold-constants"]


def test_unconstrained_order_is_kept():
    pm = PassManager(["eliminate-dead-code", "fold-constants"])
    assert [p.name for p in pm.passes] == ["eliminate-dead-code", "fold-constants"]


def test_cycle_raises_naming_the_cycle():
    with pytest.raises(ValueError, match="cycle") as info:
        PassManager(["test-cycle-a", "test-cycle-b"])
    message = str(info.value)
    assert "test-cycle-a -> test-cycle-b -> test-cycle-a" in message or "test-cycle-b -> test-cycle-a -> test-cycle-b" in message
    with pytest.raises(ValueError, match="fold-constants -> eliminate-dead-code -> fold-constants|eliminate-dead-code -> fold-constants -> eliminate-dead-code"):
        PassManager(
            ["fold-constants", "eliminate-dead-code"],
            constraints=[("fold-constants", "eliminate-dead-code"), ("eliminate-dead-code", "fold-constants")],
        )


def test_constraint_naming_a_pass_not_in_the_pipeline_raises():
    with pytest.raises(ValueError, match="'fold-batch-norm', which is not in the pipeline"):
        PassManager(["fold-constants"], constraints=[("fold-batch-norm", "fold-constants")])


# ---------------------------------------------------------------------------------------------
# names and options


def test_unknown_pass_name_suggests_the_closest():
    with pytest.raises(UnknownPassError) as info:
        PassManager(["fold-batchnorm"])
    assert "Did you mean 'fold-batch-norm'" in str(info.value)
    assert "eliminate-dead-code" in str(info.value)  # and lists what exists
    assert isinstance(info.value, KeyError)


def test_bad_options_raise_naming_the_pass():
    with pytest.raises(TypeError, match="bad options for pass 'fold-constants'.*max_grow"):
        PassManager([("fold-constants", {"max_grow": 2})])
    with pytest.raises(TypeError, match="already built"):
        get_pass(get_pass("fold-constants"), max_growth=2)
    with pytest.raises(TypeError, match="name, class or instance"):
        get_pass(42)
    pm = PassManager([("fold-constants", {"max_growth": 2.0})])
    assert pm.passes[0].max_growth == 2.0


def test_registry_rejects_bad_or_duplicate_names():
    class NoName(Pass):
        name = "Has Spaces"

    with pytest.raises(ValueError, match="kebab-case"):
        register_pass(NoName)

    class Clash(Pass):
        name = "fold-constants"

    with pytest.raises(ValueError, match="two passes are named 'fold-constants'"):
        register_pass(Clash)
    assert {"fold-batch-norm", "fold-constants", "eliminate-dead-code"} <= set(available_passes())


def test_bad_arguments_to_manager_and_run():
    with pytest.raises(ValueError, match="max_iterations"):
        PassManager(["fold-constants"], max_iterations=0)
    model, args = mlp()
    with pytest.raises(TypeError, match="capture the model first"):
        PassManager(["fold-constants"]).run(model, args)


# ---------------------------------------------------------------------------------------------
# verification


def test_verify_catches_corrupted_meta_naming_pass_and_predecessors():
    model, args, gm = _cnn()
    pm = PassManager(["fold-constants", "fold-batch-norm", "test-corrupt-meta"])
    with pytest.raises(PassError) as info:
        pm.run(gm, args)
    message = str(info.value)
    assert "pass 'test-corrupt-meta' broke the graph" in message
    assert "after fold-constants, fold-batch-norm" in message
    assert "stale" in message


def test_verify_catches_a_pass_that_lies_about_exactness():
    model, args, gm = _cnn()
    with pytest.raises(PassError) as info:
        PassManager(["fold-batch-norm", "test-lying-exact"]).run(gm, args)
    message = str(info.value)
    assert "'test-lying-exact'" in message and "after fold-batch-norm" in message
    assert "exact pass 'test-lying-exact': output 0 differs" in message


def test_exactness_needs_sample_inputs_and_verify_can_be_off():
    model, args, gm = _cnn()
    PassManager(["test-lying-exact"]).run(gm)  # no inputs: only structural checks, which pass
    model, args, gm = _cnn()
    gm, report = PassManager(["test-corrupt-meta"], verify=False).run(gm, args)
    assert report["test-corrupt-meta"].changed


def test_a_crashing_pass_is_named():
    model, args, gm = _cnn()
    with pytest.raises(PassError, match=r"pass 'test-crashes' failed \(first pass\): RuntimeError: boom"):
        PassManager(["test-crashes"]).run(gm, args)


def test_verification_runs_do_not_change_model_state():
    """Running a train-mode graph updates BN statistics; checking a pass must not."""
    model, args = conv_bn_relu_cnn()
    model.train()
    gm = fxpress.capture(model, args)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    PassManager(["test-remove-one-mul", "eliminate-dead-code"]).run(gm, args)
    after = gm.state_dict()
    for name, value in before.items():
        if name in after:
            assert torch.equal(after[name], value), name


# ---------------------------------------------------------------------------------------------
# dumps, reports, fixpoint


def test_dump_dir_writes_one_file_per_pass(tmp_path):
    model, args, gm = _cnn()
    passes = ["fold-constants", "fold-batch-norm", "eliminate-dead-code"]
    PassManager(passes, dump_dir=tmp_path / "dumps").run(gm, args)
    files = sorted(p.name for p in (tmp_path / "dumps").iterdir())
    assert files == ["00-captured.py", "01-fold-constants.py", "02-fold-batch-norm.py", "03-eliminate-dead-code.py"]
    captured = (tmp_path / "dumps" / "00-captured.py").read_text()
    folded = (tmp_path / "dumps" / "02-fold-batch-norm.py").read_text()
    assert "graph after fold-batch-norm" in folded
    assert "batch_norm" in captured and "aten.batch_norm" not in folded.split("'''")[0]


def test_report_table_names_passes_and_counts():
    model, args, gm = _cnn()
    gm, report = PassManager(["fold-constants", "fold-batch-norm", "eliminate-dead-code"]).run(gm, args)
    table = report.table()
    for name in ("fold-constants", "fold-batch-norm", "eliminate-dead-code", "total"):
        assert name in table
    assert "3 folded" in table
    assert report["fold-batch-norm"].counts["folded"] == 3
    assert [r.name for r in report] == ["fold-constants", "fold-batch-norm", "eliminate-dead-code"]
    assert all(r.time_s >= 0 for r in report) and report.total_time_s > 0
    with pytest.raises(KeyError, match="no pass named 'quantize'"):
        report["quantize"]
    torch.testing.assert_close(gm(*args), model(*args))


def test_report_details_list_skip_reasons():
    model, args = conv_bn_relu_cnn()
    model.train()
    gm = fxpress.capture(model, args)
    gm, report = PassManager(["fold-batch-norm"]).run(gm, args)
    text = str(report)
    assert "skipped 3x: batch norm is in training mode" in text


def _mul_chain():
    class MulChain(nn.Module):
        def forward(self, x):
            return ((x * 1) * 1 + 2) * 1

    model, x = MulChain(), torch.randn(2, 3)
    return model, (x,), fxpress.capture(model, (x,))


def test_max_iterations_reaches_a_fixpoint():
    model, args, gm = _mul_chain()
    gm, report = PassManager(["test-remove-one-mul"], max_iterations=10).run(gm, args)
    assert report.iterations == 4  # three removals, then one clean round
    assert [r.modified for r in report] == [True, True, True, False]
    assert not any(n.target == aten.mul.Tensor for n in gm.graph.nodes)
    torch.testing.assert_close(gm(*args), model(*args))


def test_max_iterations_caps_the_loop():
    model, args, gm = _mul_chain()
    gm, report = PassManager(["test-remove-one-mul"], max_iterations=2).run(gm, args)
    assert report.iterations == 2
    assert sum(1 for n in gm.graph.nodes if n.target == aten.mul.Tensor) == 1
    model, args, gm = _mul_chain()
    gm, report = PassManager(["test-remove-one-mul"]).run(gm, args)  # default: one round
    assert report.iterations == 1 and len(report.passes) == 1
