"""Every example script runs as a user would run it, so none can rot."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _run(script: str, *args: str, cwd: Path) -> str:
    out = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, timeout=600, cwd=cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_compile_backend_example(tmp_path):
    out = _run("compile_backend.py", cwd=tmp_path)
    diffs = [float(line.split()[-1]) for line in out.splitlines() if "max |diff| vs eager" in line]
    assert len(diffs) == 2 and max(diffs) <= 1e-4
    assert "fold-batch-norm" in out and "20 folded" in out


@pytest.mark.slow
def test_pass_pipeline_example(tmp_path):
    out = _run("pass_pipeline.py", cwd=tmp_path)
    assert "batch-norm nodes left: 0" in out
    diff = float(next(line for line in out.splitlines() if "batch of 8" in line).split()[-1])
    assert diff <= 1e-4


@pytest.mark.slow
def test_onnx_export_example(tmp_path):
    out = _run("onnx_export.py", str(tmp_path / "r18.onnx"), cwd=tmp_path)
    assert (tmp_path / "r18.onnx").stat().st_size > 40_000_000  # resnet18's 11.7M float weights
    diff = float(next(line for line in out.splitlines() if "batch of 4" in line).split()[-1])
    assert diff <= 1e-4


@pytest.mark.slow
def test_qat_example(tmp_path):
    out = _run("qat.py", cwd=tmp_path)
    rows = {line[:34].strip(): line[34:].split() for line in out.splitlines() if line.startswith(("float", "PTQ int8", "QAT int8"))}
    ptq, qat = float(rows["PTQ int8 (onnxruntime)"][0]), float(rows["QAT int8 (onnxruntime)"][0])
    assert qat >= ptq - 0.3 and "QLinearConv" in " ".join(rows["QAT int8 (onnxruntime)"])


@pytest.mark.slow
def test_decompose_example(tmp_path):
    out = _run("decompose.py", cwd=tmp_path)
    assert "budget params <= 0.5: met" in out
    acc = {line.split(":")[0]: float(line.split(":")[1].split("%")[0]) for line in out.splitlines()
           if line.startswith(("trained:", "fine-tuned:", "int8 onnxruntime:"))}
    assert acc["fine-tuned"] >= acc["trained"] - 1.0 and acc["int8 onnxruntime"] >= acc["fine-tuned"] - 1.0
