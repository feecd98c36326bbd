"""distill: the losses, hint pairing by node name, checkpoints that resume, bad input, and the digits target."""

import pytest
import torch
import torch.nn.functional as F
from models import randomize_bn
from torch import nn

import fxpress
from fxpress.demo import DigitsCNN, accuracy
from fxpress.train.distill import kd_loss, select_hints


def _mlp(out=4):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, out))


def _batches(n=4, labels=True):
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(8, 6, generator=g) for _ in range(n)]
    return [(x, torch.randint(0, 4, (8,), generator=g)) for x in xs] if labels else xs


def test_kd_loss_is_hintons_with_t_squared():
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    T = 3.0
    p = F.softmax(t / T, -1)
    manual = (p * (p.log() - F.log_softmax(s / T, -1))).sum(-1).mean() * T * T
    torch.testing.assert_close(kd_loss(s, t, T), manual)
    assert float(kd_loss(t, t, T)) < 1e-6


def test_eager_student_and_teacher_labels_optional():
    teacher, student = _mlp().eval(), _mlp()
    with torch.no_grad():
        student[0].weight.add_(0.3 * torch.randn_like(student[0].weight))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    x = torch.randn(32, 6)
    with torch.no_grad():
        gap0 = kd_loss(student(x), teacher(x), 1.0)
    teacher.train()  # the teacher's mode is put back afterwards
    fxpress.distill(student, teacher, _batches(labels=False), epochs=3, lr=1e-2, temperature=1.0, progress=False)
    assert teacher.training and all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    with torch.no_grad():
        assert kd_loss(student(x), teacher.eval()(x), 1.0) < gap0
    rep = fxpress.distill_report(student)
    assert set(rep.final) >= {"loss", "kd"} and "hard" not in rep.final  # no labels: KD alone
    fxpress.distill(student, teacher, _batches(), epochs=1, alpha=0.5, progress=False)
    assert "hard" in fxpress.distill_report(student).final


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(loss="kl"), "unknown loss 'kl'"),
        (dict(temperature=0), "temperature must be a positive"),
        (dict(alpha=1.5), r"alpha .* must be in \[0, 1\]"),
        (dict(hint_loss="l1"), "unknown hint_loss"),
        (dict(epochs=0), "epochs must be"),
        (dict(hints="auto"), "feature hints pair graph nodes"),
        (dict(warmup=1.0), r"warmup is the fraction .* in \[0, 1\)"),
        (dict(warmup=-0.1), "warmup is the fraction"),
    ],
)
def test_bad_options_raise_value_errors_that_say_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fxpress.distill(_mlp(), _mlp().eval(), _batches(), progress=False, **kwargs)


def test_output_shape_mismatch_is_explained():
    with pytest.raises(ValueError, match="outputs differ in shape.*keep the teacher's output"):
        fxpress.distill(_mlp(out=3), _mlp(out=4).eval(), _batches(), progress=False)


def _digits_like():
    torch.manual_seed(0)
    model = randomize_bn(DigitsCNN(width=8)).eval()
    return model, torch.rand(4, 1, 8, 8)


def test_auto_hints_pair_the_pruned_blocks_by_name_on_the_kept_channels():
    model, x = _digits_like()
    pruned = fxpress.prune(model, (x,), ratio=0.5)
    teacher = fxpress.capture(model, (x,))
    pairs, skipped = select_hints(pruned, teacher, "auto")
    names = [p.student for p in pairs]
    assert names == ["relu", "relu_1", "relu_3", "mean"], (names, skipped)  # block ends; 4 evenly spaced of 5
    assert all(p.student == p.teacher for p in pairs)
    # the pruning plans say which teacher channels each student channel is: no adapter to learn
    assert pairs[0].adapter == "the 4 kept of 8 channels (dim 1)" and pairs[-1].adapter == "the 8 kept of 16 channels (dim 1)"
    assert all(p.kept is not None and len(p.kept) == p.student_shape[1] for p in pairs)
    # without the plans (a graph whose widths changed some other way) a learned adapter bridges them
    pruned.meta["fxpress"]["prune_reports"] = []
    pairs = select_hints(pruned, teacher, "auto")[0]
    assert pairs[0].adapter == "1x1 conv 4 -> 8 (dim 1)" and pairs[-1].adapter == "linear 8 -> 16 (dim 1)"
    assert any(n == "linear" for n, _ in skipped) or "linear" not in names  # the output is the output loss's
    # nothing rewritten: nothing to hint
    assert select_hints(fxpress.capture(model, (x,)), teacher, "auto")[0] == []
    with pytest.raises(ValueError, match="not a node of the student graph"):
        select_hints(pruned, teacher, ["nope"])


def test_auto_hints_on_a_qat_graph_need_no_adapter_and_training_runs():
    model, x = _digits_like()
    qat = fxpress.prepare_qat(model, (x,), calibration=[torch.rand(16, 1, 8, 8)], progress=False)
    pairs, _ = select_hints(qat, fxpress.capture(model, (x,)), "auto", max_hints=8)
    assert pairs and all(p.adapter is None for p in pairs)  # fake quantization keeps every shape
    data = [torch.rand(16, 1, 8, 8) for _ in range(3)]
    fxpress.distill(qat, model, data, epochs=1, hints="auto", hint_loss="cosine", lr=1e-3, progress=False)
    rep = fxpress.distill_report(qat)
    assert rep.hints and "hint" in rep.final and not qat.training


@pytest.mark.parametrize("schedule", ["cosine", None])
def test_learning_rate_warms_up_then_follows_the_schedule(schedule):
    from fxpress.train.distill import lr_schedule

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    sched = lr_schedule(opt, 40, schedule, warmup=0.25)
    lrs = []
    for _ in range(40):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    ramp, rest = lrs[:10], lrs[10:]
    assert ramp[0] == pytest.approx(0.005) and all(a < b for a, b in zip(ramp, ramp[1:]))  # 1 % of lr, rising
    assert rest[0] == pytest.approx(0.5)
    if schedule == "cosine":
        assert all(a > b for a, b in zip(rest, rest[1:])) and rest[-1] < 0.01  # decays towards 0
    else:
        assert rest == [pytest.approx(0.5)] * 30
    assert lr_schedule(opt, 40, None, warmup=0.0) is None  # nothing to schedule


def test_checkpoint_resumes_where_it_stopped(tmp_path):
    model, x = _digits_like()
    data = [(torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))) for _ in range(3)]
    ckpt = tmp_path / "run" / "distill.pt"
    options = dict(hints="auto", lr=3e-3, progress=False)

    torch.manual_seed(0)
    straight = fxpress.distill(fxpress.prune(model, (x,), ratio=0.5), model, data, epochs=3, **options)
    calls = []

    def crash_in_epoch_3(student):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the run dies before its third checkpoint

    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        fxpress.distill(fxpress.prune(model, (x,), ratio=0.5), model, data, epochs=3, checkpoint=ckpt, eval_fn=crash_in_epoch_3, **options)
    assert ckpt.exists() and torch.load(ckpt, weights_only=False)["epoch"] == 2
    resumed = fxpress.distill(fxpress.prune(model, (x,), ratio=0.5), model, data, epochs=3, checkpoint=ckpt, **options)
    rep = fxpress.distill_report(resumed)
    assert rep.resumed_from == 2 and [e["epoch"] for e in rep.epochs] == [1, 2, 3]
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)


def test_digits_pruned_half_distilled_vs_fine_tuned(digits):
    """Prune 0.5, then distill to within 1 point of the teacher (one test image is 0.28 points).

    Same loop, data, optimizer and epochs for both; fine-tuning is alpha=0 without reconstruction (the
    hard-label loss alone). lr 1e-2: pruned students recover best there (benchmarks/recovery_digits.py,
    which reports the averaged figures over 30 splits).
    """
    model, (x_train, y_train, x_test, y_test) = digits
    teacher_acc = accuracy(model, x_test, y_test)
    got = {}
    for name, options in (("fine-tuned", dict(alpha=0.0, reconstruct=False)), ("distilled", dict(alpha=0.7))):
        torch.manual_seed(1)
        student = fxpress.prune(model, (x_train[:8],), ratio=0.5)
        perm = torch.randperm(len(x_train))
        data = [(x_train[perm[i : i + 64]], y_train[perm[i : i + 64]]) for i in range(0, len(perm), 64)]
        fxpress.distill(student, model, data, epochs=5, lr=1e-2, progress=False, **options)
        got[name] = accuracy(student, x_test, y_test)
    print(f"digits: teacher {teacher_acc:.2f}, fine-tuned {got['fine-tuned']:.2f}, distilled {got['distilled']:.2f}")
    assert got["distilled"] >= teacher_acc - 1.0


def test_an_empty_loader_is_a_clear_error():
    with pytest.raises(ValueError, match="the data yielded no batches"):
        fxpress.distill(_mlp(), _mlp().eval(), [], progress=False)
