"""fxpress compress / report / inspect / recipes: the command-line product surface."""

import json
import re

import pytest

from fxpress.cli import main


@pytest.fixture(scope="module")
def compressed_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "out"
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(["compress", "digits", "--recipe", "cnn-int8", "--out", str(out), "--quiet", "--calib-batches", "4"])
    assert rc == 0
    return out, buf.getvalue()


def test_compress_writes_model_onnx_report_and_run_record(compressed_dir):
    out, text = compressed_dir
    for name in ("model.pt2", "model.onnx", "report.html", "report.md", "report.json", "recipe.toml", "run.json"):
        assert (out / name).stat().st_size > 0, name
    rows = {re.split(r"\s{2,}", line)[0]: re.split(r"\s{2,}", line) for line in text.splitlines() if line.startswith(("original", "quantize"))}
    assert set(rows) == {"original", "quantize int8_static"}
    accuracy_before, accuracy_after = float(rows["original"][-2]), float(rows["quantize int8_static"][-2])
    assert accuracy_before > 95 and accuracy_after >= accuracy_before - 1  # digits accuracy, int8 static with bias correction
    assert "quantized: conv 4/4, linear 1/1, add 1/1" in text
    run = json.loads((out / "run.json").read_text())
    assert run["command"].startswith("fxpress compress digits --recipe cnn-int8") and run["calibration"] == "digits"
    assert run["recipe"]["stage"][0]["bias_correction"] is True


def test_report_command_prints_and_renders(compressed_dir, capsys, tmp_path):
    out, _ = compressed_dir
    assert main(["report", str(out)]) == 0
    text = capsys.readouterr().out
    assert "fxpress compression report: digits" in text and "onnxruntime ms" in text and "accuracy %" in text
    assert main(["report", str(out / "model.pt2"), "--details"]) == 0  # the report travels inside the model file
    assert "quantize int8_static" in capsys.readouterr().out
    assert main(["report", str(out), "--format", "markdown"]) == 0
    assert capsys.readouterr().out.startswith("# fxpress compression report")
    assert main(["report", str(out), "--format", "html", "--output", str(tmp_path / "r.html")]) == 0
    assert "data:image/png;base64," in (tmp_path / "r.html").read_text()
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "no report at" in capsys.readouterr().err


def test_inspect_a_saved_model(compressed_dir, capsys):
    out, _ = compressed_dir
    assert main(["inspect", str(out / "model.pt2")]) == 0
    text = capsys.readouterr().out
    assert "saved by fxpress" in text
    assert re.search(r"quantized\s+conv 4 of 4, linear 1 of 1, add 1 of 1, avg_pool 1 of 1 \(7 int8 static\); \d+ Q/DQ ops", text)
    assert re.search(r"quantized_decomposed\.dequantize_per_channel\s+5", text)  # op histogram
    assert "recipe      cnn-int8: quantize" in text


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["compress", "digits", "--recipe", "cnn-prune-int8", "--dry-run", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "1. prune (prune 0.5): ratio=0.5" in text and "3 prunable (128 channels)" in text
    assert "quantizable ops (static): conv 4 of 4" in text and "dry run: nothing was changed" in text
    assert not out.exists()


def test_recipes_lists_the_shipped_ones(capsys):
    assert main(["recipes"]) == 0
    text = capsys.readouterr().out
    for name in ("cnn-int8", "cnn-prune-int8", "transformer-dynamic-int8", "llm-int4-weight-only", "decompose-distill"):
        assert name in text


def test_errors_are_clear(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[stage]]\nkind = "quantize"\nmax_batch = 4\n')
    assert main(["compress", "digits", "--recipe", str(bad), "--dry-run"]) == 2
    assert "stage 1 (quantize): unknown option 'max_batch'. Did you mean 'max_batches'?" in capsys.readouterr().err
    assert main(["compress", "digits", "--recipe", "cnn-int8", "--calib", "nope", "--dry-run"]) == 2
    assert "unknown data 'nope'" in capsys.readouterr().err
    assert main(["compress", "resnet19", "--recipe", "cnn-int8", "--dry-run"]) == 2
    assert "Did you mean resnet18" in capsys.readouterr().err
    tiny_bert = "transformers:bert:hidden_size=32,num_hidden_layers=1,num_attention_heads=2,intermediate_size=64,vocab_size=50"
    assert main(["compress", tiny_bert, "--recipe", "cnn-int8", "--calib", "digits", "--dry-run"]) == 2
    assert "the digits data are images" in capsys.readouterr().err


def test_custom_model_and_data_factories(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_product_models.py").write_text(
        "import torch\n"
        "def model():\n"
        "    m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))\n"
        "    return m, (torch.randn(1, 16),)\n"
        "def batches():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    return [(torch.randn(8, 16, generator=g),) for _ in range(4)]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    argv = ["compress", "my_product_models:model", "--recipe", "transformer-dynamic-int8", "--eval", "my_product_models:batches",
            "--out", str(out), "--quiet", "--no-html"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "SQNR dB" in text and "random weights" in text
    assert (out / "model.pt2").exists() and not (out / "report.html").exists()


@pytest.mark.slow
def test_compress_torchvision_resnet18(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["compress", "torchvision:resnet18", "--recipe", "cnn-int8", "--calib", "digits", "--input-shape", "1,3,64,64",
            "--calib-batches", "2", "--batch-size", "8", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "quantized: conv 20/20" in text
    sqnr = float(re.split(r"\s{2,}", next(line for line in text.splitlines() if line.startswith("quantize")))[-2])
    assert sqnr > 20
    assert (out / "model.onnx").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "spec, recipe, expect",
    [
        ("transformers:bert:hidden_size=64,num_hidden_layers=2,num_attention_heads=2,intermediate_size=128,vocab_size=100",
         "transformer-dynamic-int8", "linear"),
        ("transformers:llama:hidden_size=64,intermediate_size=128,num_hidden_layers=2,num_attention_heads=4,num_key_value_heads=2,"
         "vocab_size=128,max_position_embeddings=64", "llm-int4-weight-only", "linear"),
    ],
)
def test_compress_transformers_from_config(spec, recipe, expect, tmp_path, capsys):
    import torch

    import fxpress
    from fxpress.zoo import load_model

    out = tmp_path / "out"
    assert main(["compress", spec, "--recipe", recipe, "--calib", "random", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert re.search(rf"quantized: {expect} ([1-9]\d*)/\1", text), text  # every linear
    loaded = fxpress.load(out / "model.pt2")
    ids = load_model(spec)[1][0]
    with torch.no_grad():
        assert torch.isfinite(loaded(ids)).all()
