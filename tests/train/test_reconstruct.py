"""reconstruct: least-squares re-fit of a compressed student's layers to the teacher's outputs."""

import pytest
import torch
from torch import nn

import fxpress
from fxpress.demo import accuracy
from fxpress.ir.graph import get_attr_value


def _batches(x, n=8, size=64):
    return [x[i * size : (i + 1) * size] for i in range(n)]


def test_pruned_digits_recovers_without_training(digits):
    model, (x_train, _, x_test, y_test) = digits
    student = fxpress.prune(model, (x_train[:8],), ratio=0.7)
    before = accuracy(student, x_test, y_test)
    rep = fxpress.reconstruct(student, model, _batches(x_train), progress=False)
    after = accuracy(student, x_test, y_test)
    assert before < 30 and after > 85, (before, after)  # measured 8.6 -> 91.6 (teacher 99.4)
    fitted = {f.name: f for f in rep.layers if f.changed}
    assert len(fitted) == 4 and all(f.error_after < f.error_before for f in fitted.values())
    assert "re-fitted" in str(rep) and "linear" in str(rep)
    assert student.meta["fxpress"]["reconstruct_report"] is rep


def test_solution_is_the_least_squares_fit():
    """One pruned hidden layer: the re-fitted output layer equals lstsq on the student's hidden
    activations against the teacher's outputs (ridge 0)."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 5)).eval()
    x = torch.randn(256, 6)
    student = fxpress.prune(teacher, (x[:4],), ratio=0.5)
    fxpress.reconstruct(student, teacher, [x[:128], x[128:]], ridge=0.0, progress=False)
    with torch.no_grad():
        hidden = torch.relu(x @ get_attr_value(student, "0.weight").T + get_attr_value(student, "0.bias"))
        a = torch.cat([hidden, torch.ones(256, 1)], 1).double()
        sol = torch.linalg.lstsq(a, teacher(x).double()).solution
    torch.testing.assert_close(get_attr_value(student, "2.weight"), sol[:-1].T.float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(get_attr_value(student, "2.bias"), sol[-1].float(), atol=1e-4, rtol=1e-4)


def test_iterative_pruning_maps_channels_through_every_step(digits):
    model, (x_train, _, x_test, y_test) = digits
    student = fxpress.prune(model, (x_train[:8],), ratio=0.7, iterative_steps=3)
    rep = fxpress.reconstruct(student, model, _batches(x_train, 4), progress=False)
    assert not rep.skipped, rep.skipped
    assert accuracy(student, x_test, y_test) > 85


def test_rewritten_layers_are_left_alone_with_the_reason(digits):
    """Decomposition folds batch norms into convs and emits new factor nodes: neither is the teacher's
    layer, so only the untouched head is re-fitted (re-fitting a folded conv to the unfolded teacher
    conv's output would silently break it)."""
    model, (x_train, _, x_test, y_test) = digits
    student = fxpress.decompose(model, (x_train[:8],), budget={"params": 0.3}, progress=False)
    before = accuracy(student, x_test, y_test)
    rep = fxpress.reconstruct(student, model, _batches(x_train), progress=False)
    reasons = dict(rep.skipped)
    assert any("emitted" in why for why in reasons.values())
    assert any("not the teacher's" in why for why in reasons.values())
    assert [f.name for f in rep.layers] == ["linear"]
    assert accuracy(student, x_test, y_test) > before  # measured 60.7 -> 97.5


def test_distill_reconstructs_first_unless_told_not_to(digits):
    model, (x_train, y_train, _, _) = digits
    data = [(x_train[i : i + 64], y_train[i : i + 64]) for i in range(0, 256, 64)]
    student = fxpress.prune(model, (x_train[:8],), ratio=0.5)
    fxpress.distill(student, model, data, epochs=1, max_steps=1, progress=False)
    rep = fxpress.distill_report(student)
    assert rep.reconstruction is not None and rep.reconstruction.batches == 4 and "reconstruction" in str(rep)
    plain = fxpress.prune(model, (x_train[:8],), ratio=0.5)
    fxpress.distill(plain, model, data, epochs=1, max_steps=1, progress=False, reconstruct=False)
    assert fxpress.distill_report(plain).reconstruction is None


def test_bad_input(digits):
    model, (x_train, _, _, _) = digits
    student = fxpress.prune(model, (x_train[:8],), ratio=0.5)
    with pytest.raises(ValueError, match="graph from fxpress"):
        fxpress.reconstruct(nn.Linear(2, 2), model, [torch.randn(2, 2)])
    with pytest.raises(ValueError, match="no batches"):
        fxpress.reconstruct(student, model, [])
    with pytest.raises(ValueError, match="max_batches"):
        fxpress.reconstruct(student, model, [x_train[:8]], max_batches=0)
    qat = fxpress.prepare_qat(model, (x_train[:8],), calibration=[x_train[:32]], progress=False)
    with pytest.raises(ValueError, match="float students"):
        fxpress.reconstruct(qat, model, [x_train[:8]])
