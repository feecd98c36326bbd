"""channel-prune and fxpress.prune: the two correctness oracles on every small model, importance
criteria, selection options, bad input, the report, and the backends (dynamic batch, ONNX).

Oracles (numerics):
(a) pruning zero channels leaves the outputs bit-identical;
(b) the physically pruned graph equals the original with the removed channels' parameters zeroed
    (``mask_plan``), to float rounding (atol 1e-5, rtol 1e-4). Groups through layer/rms norm are
    approximate by nature (statistics change) and marked so in the report; none of the small models
    prunes through one (their residual streams are frozen by the model input/output).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from fxpress.ir.capture import capture
from fxpress.ir.channels import analyze_channels
from fxpress.passes import PassManager
from fxpress.passes.prune import ChannelPrune  # noqa: F401  (registers channel-prune)
from fxpress.passes.prune.channel_prune import mask_plan
from fxpress.passes.prune.importance import group_scores, select_channels
from fxpress.prune_api import channel_groups, prune, prune_report
from tests.models import ALL_SMALL, conv_bn_relu_cnn, transformer_block

SMALL = sorted(ALL_SMALL)


def _run(gm, args):
    with torch.no_grad():
        return gm(*args)


@pytest.mark.parametrize("name", SMALL)
def test_pruning_nothing_is_identity(name):
    model, args = ALL_SMALL[name]()
    gm = capture(model, args)
    pruned = prune(gm, args, ratio=0.0)
    assert torch.equal(_run(pruned, args), _run(gm, args))
    assert all(a.shape == b.shape for a, b in zip(pruned.state_dict().values(), gm.state_dict().values()))


@pytest.mark.parametrize("importance", ["random", "l2"])
@pytest.mark.parametrize("name", SMALL)
def test_pruned_equals_zeroed_original(name, importance):
    model, args = ALL_SMALL[name]()
    gm = capture(model, args)
    pruned = prune(gm, args, ratio=0.5, importance=importance)
    rep = prune_report(pruned)
    assert rep.plan is not None and rep.layers, f"{name}: nothing pruned"
    assert not rep.approximate
    torch.testing.assert_close(_run(pruned, args), _run(mask_plan(gm, rep.plan), args), atol=1e-5, rtol=1e-4)
    assert rep.params_after < rep.params_before and rep.macs_after < rep.macs_before


def test_pass_by_name_in_a_pipeline_and_report():
    model, args = conv_bn_relu_cnn()
    gm = capture(model, args)
    gm, report = PassManager([("channel-prune", {"ratio": 0.5})]).run(gm, args)
    rep = report["channel-prune"]
    assert rep.counts["groups pruned"] == 3 and rep.counts["channels removed"] == 20
    assert any("model output" in why for _, why in rep.skipped)
    assert gm.conv2.weight.shape == (8, 4, 3, 3)
    text = str(prune_report(prune(model, args)))
    assert "params" in text and "MACs" in text and "conv2.weight: [16, 8, 3, 3] -> [8, 4, 3, 3]" in text


def test_parameters_stay_trainable_parameters():
    model, args = conv_bn_relu_cnn()
    pruned = prune(model, args, ratio=0.5)
    assert isinstance(pruned.conv1.weight, nn.Parameter) and pruned.conv1.weight.requires_grad
    assert not isinstance(pruned.bn1.running_mean, nn.Parameter)


@pytest.mark.parametrize("importance", ["l1", "l2", "bn_scale", "random", "taylor", "lamp"])
def test_every_importance_runs_and_keeps_the_oracle(importance):
    model, args = conv_bn_relu_cnn()
    gm = capture(model, args)
    pruned = prune(gm, args, ratio=0.5, importance=importance)
    rep = prune_report(pruned)
    torch.testing.assert_close(_run(pruned, args), _run(mask_plan(gm, rep.plan), args), atol=1e-5, rtol=1e-4)


def test_l2_keeps_the_largest_channels():
    model, args = conv_bn_relu_cnn()
    with torch.no_grad():
        model.conv1.weight[:4].mul_(100)  # channels 0-3 of the conv1/bn1/conv2-input group dominate
    pruned = prune(model, args, ratio=0.5, importance="l2")
    torch.testing.assert_close(pruned.conv1.weight, model.conv1.weight[:4])
    torch.testing.assert_close(pruned.conv2.weight, model.conv2.weight[pruned_rows(model, pruned)][:, :4])


def pruned_rows(model, pruned):
    """Indices of conv2's output rows that survived (matched by value)."""
    rows = []
    for r in pruned.conv2.weight[:, :, 0, 0]:
        matches = (model.conv2.weight[:, :4, 0, 0] - r).abs().sum(1).argmin()
        rows.append(int(matches))
    return rows


def test_global_round_to_min_channels():
    model, args = conv_bn_relu_cnn()
    an = analyze_channels(capture(model, args))
    scores = {g: group_scores(an, g, "l2")[0] for g in an.prunable}
    local = select_channels(scores, 0.5, round_to=8)
    assert sorted(k.numel() for k in local.values()) == [8, 8]  # the 8-channel group cannot go below 8
    glob = select_channels(scores, 0.5, global_pruning=True)
    assert sum(g.size - k.numel() for g, k in glob.items()) == 20
    floor = select_channels(scores, 0.9, min_channels=6)
    assert min(k.numel() for k in floor.values()) == 6
    pruned = prune(model, args, ratio=0.5, global_pruning=True, round_to=2)
    assert all(p.shape[0] % 2 == 0 for n, p in pruned.named_parameters() if n.startswith("conv"))


def test_iterative_steps_reach_the_ratio():
    model, args = conv_bn_relu_cnn()
    one = prune(model, args, ratio=0.5)
    seen: list[int] = []
    three = prune(model, args, ratio=0.5, iterative_steps=2, importance="l1", step_callback=lambda gm, i: seen.append(i))
    assert seen == [1, 2]
    assert {k: v.shape for k, v in one.state_dict().items()} == {k: v.shape for k, v in three.state_dict().items()}
    assert prune_report(three).steps == 2


def test_pruned_graph_runs_on_other_batch_sizes():
    model, args = transformer_block()
    pruned = prune(model, args, ratio=0.5)
    for b in (1, 5):
        x = torch.randn(b, *args[0].shape[1:])
        assert pruned(x).shape == model(x).shape


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, "half", True])
def test_bad_ratio(ratio):
    model, args = conv_bn_relu_cnn()
    with pytest.raises(ValueError, match="ratio"):
        prune(model, args, ratio=ratio)


def test_bad_options():
    model, args = conv_bn_relu_cnn()
    with pytest.raises(ValueError, match="importance"):
        prune(model, args, importance="magic")
    with pytest.raises(ValueError, match="round_to"):
        prune(model, args, round_to=0)
    with pytest.raises(ValueError, match="iterative_steps"):
        prune(model, args, iterative_steps=0)


def test_ignored_layer_that_does_not_exist_is_named():
    model, args = conv_bn_relu_cnn()
    with pytest.raises(ValueError, match="'conv9'"):
        prune(model, args, ignore=["conv9"])
    with pytest.raises(ValueError, match="not a submodule"):
        prune(model, args, ignore=[nn.Conv2d(1, 1, 1)])


def test_ignore_keeps_output_channels_of_that_layer():
    model, args = conv_bn_relu_cnn()
    pruned = prune(model, args, ratio=0.5, ignore=[model.conv2])
    assert pruned.conv2.weight.shape[0] == 16
    assert pruned.conv2.weight.shape[1] == 4  # its inputs come from conv1's group, which is pruned
    assert pruned.conv3.weight.shape[0] == 8


def test_no_prunable_group_is_reported_not_raised():
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    args = (torch.randn(2, 4),)
    with pytest.warns(UserWarning, match="nothing was pruned: no prunable channel group.*model input"):
        pruned = prune(model, args, ratio=0.5)
    rep = prune_report(pruned)
    assert rep.params_after == rep.params_before
    assert any("nothing was pruned" in n for n in rep.notes)
    assert torch.equal(_run(pruned, args), model(*args).detach())
    text = channel_groups(model, args).summary()
    assert "0 prunable" in text and "model input" in text


def test_bad_model_and_inputs_are_clear_errors():
    model, args = conv_bn_relu_cnn()
    with pytest.raises(TypeError, match="torch.nn.Module"):
        prune("resnet18", args)
    with pytest.raises(Exception, match="example inputs with the shapes"):
        prune(model, (torch.randn(2, 5),))


def test_pruned_model_fine_tunes_without_touching_the_original():
    model, args = conv_bn_relu_cnn()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = prune(model, args, ratio=0.5)
    teacher_copy = copy.deepcopy(pruned)  # the report's plan (fake tensors of the old graph) is shared, not copied
    assert prune_report(teacher_copy).macs_ratio == prune_report(pruned).macs_ratio
    pruned.train()
    loss = pruned(*args).square().mean()
    loss.backward()
    torch.optim.SGD(pruned.parameters(), lr=0.1).step()
    pruned.eval()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_exports_to_onnx_with_parity(tmp_path):
    import fxpress

    for factory in (conv_bn_relu_cnn, transformer_block):
        model, args = factory()
        pruned = prune(model, args, ratio=0.5)
        res = fxpress.export_onnx(pruned, args, tmp_path / f"{factory.__name__}.onnx", atol=1e-4, rtol=1e-4)
        assert res.max_abs_diff is not None and max(res.max_abs_diff) < 1e-3
