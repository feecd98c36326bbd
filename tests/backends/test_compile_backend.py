"""torch.compile(backend="fxpress"): structure (passes ran), numerics (matches eager), targets."""

import logging
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import fxpress
from fxpress.backends import compile_backend
from fxpress.backends.compile_backend import BackendOptions, lower_dynamo_graph

TARGETS = ["inductor", "onnxruntime", "eager"]


class ConvBNWithBreak(nn.Module):
    """Two Dynamo subgraphs (a print forces a graph break), BN with non-trivial statistics."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)
        with torch.no_grad():
            self.bn.running_mean.normal_()
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.uniform_(0.5, 1.5)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        torch._dynamo.graph_break()
        return self.fc(y.mean((2, 3)))


def _fresh(model, **options):
    torch._dynamo.reset()
    return torch.compile(model, backend="fxpress", options=options)


@pytest.mark.parametrize("target", TARGETS)
def test_graph_break_and_new_shapes_match_eager(target):
    model = ConvBNWithBreak().eval()
    compiled = _fresh(model, target=target, verify=True)
    before = len(fxpress.compile_reports())
    with torch.no_grad():
        for batch in (2, 3, 5, 1):
            x = torch.randn(batch, 3, 8, 8)
            torch.testing.assert_close(compiled(x), model(x), atol=1e-4, rtol=1e-4)
    reports = fxpress.compile_reports()[before:]
    assert len(reports) >= 2, "a graph break gives at least two compiled subgraphs"
    assert any(r["fold-batch-norm"].counts["folded"] == 1 for r in reports)


def test_options_select_passes_and_reject_unknown_keys():
    model = ConvBNWithBreak().eval()
    compiled = _fresh(model, passes=["eliminate-dead-code"], target="eager")
    before = len(fxpress.compile_reports())
    with torch.no_grad():
        compiled(torch.randn(2, 3, 8, 8))
    names = {p.name for r in fxpress.compile_reports()[before:] for p in r}
    assert names == {"eliminate-dead-code"}

    with pytest.raises(ValueError, match="unknown fxpress backend option 'taget'.*'target'"):
        BackendOptions.parse({"taget": "eager"})
    with pytest.raises(ValueError, match="unknown fxpress target 'tensorrt'"):
        BackendOptions.parse({"target": "tensorrt"})
    with pytest.raises(Exception, match="unknown pass 'fold-bn'"):
        with torch.no_grad():
            _fresh(nn.Linear(2, 2).eval(), passes=["fold-bn"])(torch.randn(1, 2))


def test_grad_mode_skips_passes_with_one_warning():
    model = ConvBNWithBreak().eval()
    compiled = _fresh(model, target="eager")
    compile_backend._warned.discard("grad")
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = compiled(x)
    messages = [str(w.message) for w in caught if "fxpress" in str(w.message)]
    assert len(messages) == 1 and "torch.no_grad()" in messages[0]
    # compile_reports() records the fallback too (the README's compile_reports()[-1] must not raise)
    report = fxpress.compile_reports()[-1]
    assert isinstance(report, compile_backend.FallbackReport) and report.fell_back
    assert report.reason == "grad" and report.target == "eager" and list(report) == []
    assert "fell back" in str(report) and "torch.no_grad()" in str(report)
    out.sum().backward()  # gradients still flow to the real parameters
    assert model.conv.weight.grad is not None
    torch.testing.assert_close(out, model(x), atol=1e-5, rtol=1e-5)


def test_unlowerable_subgraph_falls_back_with_one_warning(monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("cannot lower this on purpose")

    monkeypatch.setattr(compile_backend, "lower_dynamo_graph", refuse)
    compile_backend._warned.clear()
    model = ConvBNWithBreak().eval()
    compiled = _fresh(model, target="eager")
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        out = compiled(x)
    messages = [str(w.message) for w in caught if "could not be lowered" in str(w.message)]
    assert len(messages) == 1 and "cannot lower this on purpose" in messages[0]
    torch.testing.assert_close(out, model(x))
    report = fxpress.compile_reports()[-1]
    assert isinstance(report, compile_backend.FallbackReport) and report.reason == "lowering"
    assert "RuntimeError: cannot lower this on purpose" in report.error and "could not be lowered" in str(report)

    strict = _fresh(model, target="eager", fallback="raise")
    with pytest.raises(Exception, match="cannot lower this on purpose"), torch.no_grad():
        strict(x)


def test_compiled_subgraph_reports_say_they_did_not_fall_back():
    compiled = _fresh(ConvBNWithBreak().eval(), target="eager")
    before = len(fxpress.compile_reports())
    with torch.no_grad():
        compiled(torch.randn(2, 3, 8, 8))
    reports = fxpress.compile_reports()[before:]
    assert reports and all(r.fell_back is False and not isinstance(r, compile_backend.FallbackReport) for r in reports)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage() + "\n" + (logging.Formatter().formatException(record.exc_info) if record.exc_info else ""))


@pytest.fixture
def inductor_log():
    """What torch._inductor logs (its loggers do not propagate to caplog's root handler)."""
    handler = _Records()
    logger = logging.getLogger("torch._inductor")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def test_inductor_target_graph_pickles_for_the_cache_key(inductor_log):
    from torch._dynamo.utils import counters

    # a graph straight from ExportedProgram.module() carries _create_stateful_graph_module's lambda hooks,
    # which AOTAutograd's cache key cannot pickle; the backend hands inductor a plain GraphModule instead
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    x = torch.randn(2, 3, 8, 8)
    stateful = torch.export.export(model, (x,)).module(check_guards=False)
    assert any("<lambda>" in getattr(h, "__qualname__", "") for h in stateful._forward_pre_hooks.values())
    counters.clear()
    runner = compile_backend._build_target(stateful, (x,), BackendOptions.parse({}))
    with torch.no_grad():
        out = runner(x)
    torch.testing.assert_close(out[0] if isinstance(out, (tuple, list)) else out, model(x), atol=1e-4, rtol=1e-4)
    assert "autograd_cache_bypass" not in counters["aot_autograd"], dict(counters["aot_autograd"])

    # and through torch.compile(backend="fxpress"), the default inductor target
    compiled = _fresh(ConvBNWithBreak().eval())
    with torch.no_grad():
        compiled(torch.randn(2, 3, 8, 8))
    assert "autograd_cache_bypass" not in counters["aot_autograd"], dict(counters["aot_autograd"])
    bad = [m for m in inductor_log.messages if "Failed to pickle" in m or "Can't pickle" in m]
    assert not bad, bad[0]


def test_lowering_freezes_weights_and_keeps_dynamic_dims():
    model = ConvBNWithBreak().eval()
    captured = {}

    def spy(gm, example_inputs, **kwargs):
        captured["lowered"] = lower_dynamo_graph(gm, example_inputs)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=spy, dynamic=True)
    with torch.no_grad():
        compiled(torch.randn(3, 3, 8, 8))
    lowered = captured["lowered"]
    # each subgraph takes one activation tensor: the weights Dynamo lifted to inputs became constants
    assert len(lowered.inputs) == 1
    gm = lowered.gm
    assert any(n.op == "get_attr" for n in gm.graph.nodes)
    placeholder = gm.graph.find_nodes(op="placeholder")[0]
    assert isinstance(placeholder.meta["val"].shape[0], torch.SymInt)


def test_backend_resolves_in_a_fresh_process_without_importing_fxpress():
    code = (
        "import sys, torch\n"
        "m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()).eval()\n"
        "c = torch.compile(m, backend='fxpress', options={'target': 'eager'})\n"
        "x = torch.randn(2, 4)\n"
        "with torch.no_grad(): y = c(x)\n"
        "assert torch.allclose(y, m(x))\n"
        "print('fxpress' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("True")  # loaded through the torch_dynamo_backends entry point


def _torchvision(name):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    return model, torch.randn(1, 3, 224, 224)


def _tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, max_position_embeddings=64
    )
    bert = transformers.BertModel(config).eval()

    class LastHidden(nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids):
            return self.bert(input_ids=input_ids).last_hidden_state

    return LastHidden().eval(), torch.randint(0, 100, (1, 16))


@pytest.mark.slow
@pytest.mark.parametrize("target", ["inductor", "onnxruntime"])
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "tiny_bert"])
def test_real_models_match_eager(name, target):
    model, x = _tiny_bert() if name == "tiny_bert" else _torchvision(name)
    compiled = _fresh(model, target=target)
    before = len(fxpress.compile_reports())
    with torch.no_grad():
        ref = model(x)
        out = compiled(x)
    assert (out - ref).abs().max().item() <= 1e-4
    reports = fxpress.compile_reports()[before:]
    assert reports, "the fxpress backend compiled nothing (fell back?)"
    if name != "tiny_bert":
        assert sum(r["fold-batch-norm"].counts["folded"] for r in reports) > 0
