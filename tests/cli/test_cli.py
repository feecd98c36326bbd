"""The fxpress command: demo (the main job), inspect, passes, and clear errors on bad input."""

import re

import pytest

from fxpress.cli import main


def test_demo_trains_compresses_exports_and_reports(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "out"), "--epochs", "4", "--quiet"]) == 0
    text = capsys.readouterr().out
    cells = [re.split(r"\s{2,}", line) for line in text.splitlines() if re.match(r"^(eager|fxpress|onnxruntime)\b", line)]
    assert [c[0] for c in cells] == ["eager fp32", "fxpress graph", "onnxruntime fp32", "fxpress int8 graph", "onnxruntime int8"]
    accuracies = [float(c[1]) for c in cells]
    assert min(accuracies) > 90, accuracies  # a real model, trained on real digits
    assert max(accuracies[:3]) - min(accuracies[:3]) <= 1e-9  # exact passes and fp32 ONNX keep every prediction
    assert accuracies[0] - min(accuracies[3:]) <= 0.3  # int8 static: the accuracy budget
    assert "4 folded" in text
    assert re.search(r"4 QLinearConv", cells[4][-1]), cells[4]  # onnxruntime runs the convs in int8
    sizes = [float(c[2]) for c in cells]
    assert sizes[4] < sizes[2] / 1.8  # int8 weights (the file also holds names and metadata)
    assert (tmp_path / "out" / "model.onnx").stat().st_size > 0
    assert "fold-batch-norm" in (tmp_path / "out" / "report.txt").read_text()


def test_demo_refuses_a_file_as_output_directory(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert main(["demo", "--out", str(target), "--quiet"]) == 2
    assert "is a file" in capsys.readouterr().err


def test_inspect_custom_factory(tmp_path, capsys, monkeypatch):
    (tmp_path / "mymodels.py").write_text(
        "import torch\n"
        "def small():\n"
        "    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 10))\n"
        "    return m, (torch.randn(1, 3, 8, 8),)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["inspect", "mymodels:small"]) == 0
    text = capsys.readouterr().out
    params = 3 * 8 * 9 + 8 + 8 + 8 + 288 * 10 + 10
    assert f"params     {params:,}" in text
    macs = 36 * 8 * 27 + 288 * 10
    assert f"MACs       {macs:,}" in text
    assert re.search(r"aten\.conv2d\s+1\s+" + f"{36 * 8 * 27:,}", text)


def _macs(text):
    return int(re.search(r"MACs\s+([\d,]+) per sample", text).group(1).replace(",", ""))


def test_inspect_reports_macs_per_sample_at_any_batch_and_for_a_saved_model(tmp_path, capsys, monkeypatch):
    import torch

    import fxpress

    (tmp_path / "inspect_macs_models.py").write_text(
        "import torch\n"
        "def small():\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 10))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    macs = 36 * 8 * 27 + 288 * 10
    assert main(["inspect", "inspect_macs_models:small", "--input-shape", "1,3,8,8"]) == 0
    text = capsys.readouterr().out
    assert _macs(text) == macs and "at batch 1 (dynamic)" in text
    assert main(["inspect", "inspect_macs_models:small", "--input-shape", "4,3,8,8"]) == 0
    text = capsys.readouterr().out
    assert _macs(text) == macs and f"at batch 4 (dynamic): {4 * macs:,} MACs" in text
    assert re.search(r"aten\.linear\s+1\s+" + f"{288 * 10:,}", text)  # the op table is per sample too

    # a saved model's example input has batch 2 (torch.export specializes a dynamic dim sampled at 1):
    # inspect still reports per sample, the same as for the model it was saved from
    import inspect_macs_models

    path = tmp_path / "model.pt2"
    fxpress.save(fxpress.capture(inspect_macs_models.small().eval(), (torch.randn(1, 3, 8, 8),)), path)
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "inputs (2, 3, 8, 8)" in text
    assert _macs(text) == macs and f"at batch 2 (dynamic): {2 * macs:,} MACs" in text


@pytest.mark.slow
def test_inspect_torchvision_resnet18(capsys):
    assert main(["inspect", "resnet18"]) == 0
    text = capsys.readouterr().out
    assert "params     11,689,512" in text
    macs = int(re.search(r"MACs\s+([\d,]+)", text).group(1).replace(",", ""))
    assert abs(macs - 1_814_073_344) / 1_814_073_344 < 0.01  # torchvision's documented 1.81 GFLOPs (MACs)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["inspect", "resnet19"], "unknown model 'resnet19'. Did you mean resnet18"),
        (["inspect", "no_such_module_xyz:factory"], "cannot import 'no_such_module_xyz'"),
        (["inspect", "resnet18", "--input-shape", "1,three"], "not a list of integers"),
    ],
)
def test_bad_model_specs_are_clear_errors(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_passes_lists_registered_passes(capsys):
    assert main(["passes"]) == 0
    text = capsys.readouterr().out
    for name in ("fold-batch-norm", "fold-constants", "eliminate-dead-code"):
        assert name in text
