"""Recipe.apply end to end on the digits CNN: the shipped recipes run, every stage is measured,
the outputs are written and reload, runs are reproducible from their seed."""

import json

import pytest
import torch

import fxpress
from fxpress.demo import accuracy
from fxpress.recipe import FineTune, Prune, Quantize, Recipe, StageError


@pytest.fixture(scope="module")
def prune_int8(digits, tmp_path_factory):
    model, inputs, calibration, train, x_test, y_test = digits
    recipe = Recipe.load("cnn-prune-int8")
    result = recipe.apply(model, inputs, calibration=calibration, train_data=train,
                          evaluate=lambda m: accuracy(m, x_test, y_test), metric_name="accuracy %")
    out = tmp_path_factory.mktemp("out")
    paths = result.write(out)
    return result, paths


def test_every_stage_is_measured(prune_int8, digits):
    result, _ = prune_int8
    rep = result.report
    assert [s.name for s in rep.stages] == ["original", "prune 0.5", "finetune 3 ep", "quantize int8_static"]
    original, pruned, tuned, quantized = rep.stages
    assert original.params == 38122 and original.macs == 1493632
    assert pruned.params / original.params < 0.35 and pruned.macs / original.macs < 0.3
    assert quantized.size_bytes < tuned.size_bytes / 3  # int8 weights
    assert all(s.latency_ms > 0 for s in rep.stages)
    assert rep.metric_name == "accuracy %"
    assert original.metric > 95
    assert quantized.metric >= original.metric - 4, [s.metric for s in rep.stages]  # fine-tuning recovers the pruned model
    assert "conv 4/4" in quantized.summary and "channel groups pruned" in pruned.summary
    assert [c[0] for c in rep.channels] == ["stem.0", "block.0", "block.3", "down.0"]
    assert all(after * 2 == before for _, before, after in rep.channels)
    assert len(rep.sensitivity) == 5 and rep.sensitivity == sorted(rep.sensitivity, key=lambda r: r[1])
    assert rep.environment["seed"] == 0 and rep.environment["torch"] == torch.__version__
    assert fxpress.quant_report(result.model).quantized("conv") == 4
    assert fxpress.prune_report(result.model).params_ratio < 0.35  # the pruning report travels with the graph


def test_outputs_are_written_and_reload(prune_int8, digits):
    result, paths = prune_int8
    for kind in ("model", "onnx", "report_json", "report_md", "report_html", "recipe", "run"):
        assert paths[kind].stat().st_size > 0, kind
    loaded = fxpress.load(paths["model"])
    x = digits[4][:9]
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model(x))
    assert Recipe.from_file(paths["recipe"]) == result.recipe
    run = json.loads(paths["run"].read_text())
    assert run["seed"] == 0 and run["versions"]["torch"] == torch.__version__ and "onnxruntime" in run["versions"]
    assert [s["kind"] for s in run["stages"]] == ["prune", "finetune", "quantize"]
    report = fxpress.CompressionReport.load(paths["report_json"])
    assert report.outputs["model.pt2"] == paths["model"].stat().st_size
    assert report.final.ort_latency_ms > 0 and report.original.ort_latency_ms > 0
    assert loaded.meta["fxpress"]["recipe"] == result.recipe.to_dict()
    assert fxpress.read_metadata(paths["model"])["report"]["stages"][-1]["name"] == "quantize int8_static"


def test_decompose_then_distill(digits):
    model, inputs, calibration, train, x_test, y_test = digits
    result = Recipe.load("decompose-distill").apply(model, inputs, calibration=calibration, train_data=train[:8],
                                                    evaluate=lambda m: accuracy(m, x_test, y_test), latency=False)
    original, decomposed, distilled = result.report.stages
    assert decomposed.params <= 0.5 * original.params + 1
    assert result.report.ranks and all(r["params_after"] < r["params_before"] for r in result.report.ranks)
    assert "layers decomposed" in decomposed.summary and "epochs" in distilled.summary
    assert distilled.metric >= decomposed.metric - 1  # distillation does not make it worse
    assert distilled.metric > 80


def test_qat_stage_trains_and_converts(digits):
    model, inputs, calibration, train, x_test, y_test = digits
    recipe = Recipe.load("cnn-qat-int8")
    recipe.stages[0].options["max_steps"] = 4  # a short run: what is tested is the stage, not QAT's accuracy
    result = recipe.apply(model, inputs, train_data=train[:8], evaluate=lambda m: accuracy(m, x_test, y_test), latency=False)
    original, qat = result.report.stages
    assert "conv 4/4" in qat.summary and "trained 2 epoch(s)" in qat.summary
    assert fxpress.quant_report(result.model).quantized("conv") == 4
    assert fxpress.distill_report(result.model).epochs[-1]["steps"] == 4
    assert qat.metric >= original.metric - 2


def test_the_seed_makes_runs_reproducible(digits):
    model, inputs, *_ = digits

    def run(seed):
        result = Recipe([Prune(0.5, importance="random")], seed=seed).apply(model, inputs, latency=False)
        return {k: v.clone() for k, v in result.model.state_dict().items()}

    first, again, other = run(5), run(5), run(6)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_without_evaluate_the_metric_is_sqnr(digits):
    model, inputs, calibration, *_ = digits
    result = Recipe([Quantize("int8_dynamic")]).apply(model, inputs, calibration=calibration, latency=False)
    rep = result.report
    assert rep.metric_name == "SQNR dB"
    assert rep.stages[0].metric == float("inf") and 15 < rep.stages[1].metric < 80


def test_a_failing_stage_names_itself_and_the_stages_before(digits):
    model, inputs, calibration, *_ = digits
    unlabelled = [x for x in calibration]
    with pytest.raises(StageError, match=r"stage 2 \(finetune\) \(finetune 1 ep\) failed: finetune needs labelled batches.*stages before it: prune 0.5"):
        Recipe([Prune(0.5), FineTune(1)]).apply(model, inputs, train_data=unlabelled, latency=False)
