"""The gradient that reaches Adam equals the update rule, computed here from the equations."""

import copy

import pytest
import torch
from harness import (
    StepRecorder,
    batches,
    build_trainer,
    reference_update_gradient,
    relative_error,
)

from fairseq_asam import perturbation

# The gradient Adam receives and the reference are fp32 sums in different orders (pass 2 on top
# of accumulated gradients, DDP buckets): ~1e-7 relative measured, 1e-6 is fp32's bound.
RTOL = 1e-6


@pytest.mark.parametrize("optimizer,rho,eta", [("asam", 0.5, 0.01), ("sam", 0.05, 0.0)])
@pytest.mark.parametrize("update_freq", [1, 3])
def test_gradient_handed_to_adam_matches_reference(data_bin, optimizer, rho, eta, update_freq):
    extra = ["--optimizer", optimizer, "--rho", str(rho), "--update-freq", str(update_freq)]
    if optimizer == "asam":
        extra += ["--eta", str(eta)]
    trainer = build_trainer(data_bin, extra)
    samples = batches(trainer, update_freq)
    model0 = copy.deepcopy(trainer.get_model())
    w0 = [p.detach().clone() for p in model0.parameters()]
    recorder = StepRecorder(trainer)

    trainer.train_step(samples)

    adaptive = optimizer == "asam"
    expected = reference_update_gradient(model0, trainer.criterion, samples, rho, eta, adaptive)
    assert relative_error(recorder.grads, expected) < RTOL
    # Adam saw the weights w exactly: pass 2's perturbation was undone bit for bit.
    assert all(torch.equal(a, b) for a, b in zip(recorder.weights, w0))
    # Negative controls: the comparison is sharp enough to see a wrong rule.
    plain = reference_update_gradient(model0, trainer.criterion, samples, 1e-30, eta, adaptive)
    assert relative_error(recorder.grads, plain) > 1e3 * RTOL
    if adaptive:
        biased = reference_update_gradient(
            model0, trainer.criterion, samples, rho, eta, adaptive, normalize_biases=True
        )
        assert relative_error(recorder.grads, biased) > 1e2 * RTOL
    else:
        as_asam = reference_update_gradient(model0, trainer.criterion, samples, rho, 0.01, True)
        assert relative_error(recorder.grads, as_asam) > 1e2 * RTOL


def test_sharpness_logged_and_loss_is_pass_one(data_bin):
    from fairseq import metrics

    trainer = build_trainer(data_bin, ["--optimizer", "asam", "--rho", "0.5"])
    samples = batches(trainer, 1)
    model0 = copy.deepcopy(trainer.get_model())
    loss1, size, _ = trainer.criterion(model0, samples[0])
    with metrics.aggregate(new_root=True) as agg:
        trainer.train_step(samples)
    logged = agg.get_smoothed_values()
    # fairseq logs the loss rounded to 3 decimals (5e-4); fp32 adds ~1e-6 relative.
    assert logged["loss"] == pytest.approx(
        float(loss1.detach()) / float(size) / torch.log(torch.tensor(2.0)).item(), abs=1e-3
    )
    assert "sharpness" in logged and logged["sharpness"] > 0  # the ascent step raises the loss


def test_plain_adam_untouched(data_bin):
    """With --optimizer adam the wrapped train step is fairseq's own: one pass, plain gradient."""
    trainer = build_trainer(data_bin, ["--optimizer", "adam"])
    samples = batches(trainer, 2)
    model0 = copy.deepcopy(trainer.get_model())
    recorder = StepRecorder(trainer)
    trainer.cfg.optimization.update_freq = [2]
    trainer.train_step(samples)
    expected = reference_update_gradient(model0, trainer.criterion, samples, 1e-30, 0.0, False)
    assert relative_error(recorder.grads, expected) < RTOL


def test_perturbation_module_against_equations():
    torch.manual_seed(0)
    params = [torch.randn(5, 3), torch.randn(3), torch.randn(4, 4)]
    grads = [torch.randn_like(p) for p in params]
    flags = [True, False, True]
    w0 = [p.clone() for p in params]
    g0 = [g.clone() for g in grads]
    saved = perturbation.perturb(params, grads, flags, 0.3, 0.02)
    scale = [w.abs() + 0.02 if f else torch.ones_like(w) for w, f in zip(w0, flags)]
    norm = torch.sqrt(sum(((t * g) ** 2).sum() for t, g in zip(scale, g0)))
    for p, w, t, g in zip(params, w0, scale, g0):
        # fp32 both: ‖T g‖ summed in another order, then w + ε rounded: a few ulps (1.2e-7).
        torch.testing.assert_close(p, w + 0.3 * t * t * g / norm, rtol=1e-6, atol=1e-7)
    perturbation.restore(params, saved)
    assert all(torch.equal(p, w) for p, w in zip(params, w0))


def test_non_finite_gradient_perturbs_nothing():
    params = [torch.randn(3, 3), torch.randn(3)]
    w0 = [p.clone() for p in params]
    grads = [torch.full((3, 3), float("inf")), torch.randn(3)]
    assert perturbation.perturb(params, grads, [True, False], 0.2, 0.01) is None
    assert all(torch.equal(p, w) for p, w in zip(params, w0))


def test_zero_gradient_gives_zero_perturbation():
    params = [torch.randn(3, 3)]
    w0 = params[0].clone()
    saved = perturbation.perturb(params, [torch.zeros(3, 3)], [True], 0.2, 0.01)
    assert saved is not None and torch.equal(params[0], w0)


def test_sam_interval_and_start_update_schedule(data_bin):
    """--sam-start-update 1 --sam-interval 3: updates 1 and 4 sharpness-aware, 0, 2, 3 plain."""
    rho, eta = 0.5, 0.01
    trainer = build_trainer(
        data_bin,
        [
            "--optimizer",
            "asam",
            "--rho",
            str(rho),
            "--eta",
            str(eta),
            "--sam-interval",
            "3",
            "--sam-start-update",
            "1",
        ],
    )
    samples = batches(trainer, 5)
    recorder = StepRecorder(trainer)
    kinds = []
    for sample in samples:
        model0 = copy.deepcopy(trainer.get_model())
        trainer.train_step([sample])
        sam = reference_update_gradient(model0, trainer.criterion, [sample], rho, eta, True)
        plain = reference_update_gradient(model0, trainer.criterion, [sample], 1e-30, eta, True)
        sam_error, plain_error = (
            relative_error(recorder.grads, sam),
            relative_error(recorder.grads, plain),
        )
        assert min(sam_error, plain_error) < RTOL and max(sam_error, plain_error) > 1e3 * RTOL
        kinds.append("sam" if sam_error < plain_error else "plain")
    assert kinds == ["plain", "sam", "plain", "plain", "sam"]


def _flat(tensors):
    return torch.cat([t.reshape(-1).double() for t in tensors])


@pytest.mark.parametrize("update_freq", [1, 2])
def test_looksam_reuses_orthogonal_component(data_bin, update_freq):
    """--sam-interval 2 --looksam-alpha α: update 0 is ASAM; update 1 is G + α‖G‖/‖g_v‖ g_v."""
    rho, eta, alpha = 0.5, 0.01, 0.7
    trainer = build_trainer(
        data_bin,
        [
            "--optimizer",
            "asam",
            "--rho",
            str(rho),
            "--eta",
            str(eta),
            "--sam-interval",
            "2",
            "--looksam-alpha",
            str(alpha),
            "--update-freq",
            str(update_freq),
        ],
    )
    samples = batches(trainer, 2 * update_freq)
    first, second = samples[:update_freq], samples[update_freq:]
    recorder = StepRecorder(trainer)

    model0 = copy.deepcopy(trainer.get_model())
    trainer.train_step(first)
    sharp0 = reference_update_gradient(model0, trainer.criterion, first, rho, eta, True)
    plain0 = reference_update_gradient(model0, trainer.criterion, first, 1e-30, eta, True)
    assert relative_error(recorder.grads, sharp0) < RTOL
    g_s, g = _flat(sharp0), _flat(plain0)
    g_v = g_s - (g_s @ g) / (g @ g) * g

    model1 = copy.deepcopy(trainer.get_model())
    trainer.train_step(second)
    plain1 = _flat(reference_update_gradient(model1, trainer.criterion, second, 1e-30, eta, True))
    expected = plain1 + alpha * plain1.norm() / g_v.norm() * g_v
    actual = _flat(recorder.grads)
    # fp32 gradients (RTOL), and g_v is a difference of two nearly parallel gradients, which
    # magnifies their rounding by ‖G_s‖/‖g_v‖: 1e-5.
    assert float((actual - expected).norm() / expected.norm()) < 1e-5
    assert float((actual - plain1).norm() / plain1.norm()) > 1e-2  # control: reuse is visible


def test_looksam_plain_gradient_restarts_with_each_update(data_bin):
    """An update skipped before its step (an fp16 overflow) leaves its pass-1 gradient behind;
    the next update — here starting with a dummy batch — must not add onto it."""
    from fairseq_asam.optim import find_sharpness_aware

    trainer = build_trainer(
        data_bin,
        ["--optimizer", "asam", "--rho", "0.5", "--sam-interval", "2", "--looksam-alpha", "0.7"],
    )
    samples = batches(trainer, 2)
    task, model, criterion, optimizer = (
        trainer.task,
        trainer.model,
        trainer.criterion,
        trainer.optimizer,
    )
    sam = find_sharpness_aware(optimizer)
    model0 = copy.deepcopy(trainer.get_model())

    def plain_gradient(sample):
        params = [p for p in model0.parameters() if p.requires_grad]
        return _flat(torch.autograd.grad(criterion(model0, sample)[0], params))

    trainer.zero_grad()
    task.train_step(samples[0], model, criterion, optimizer, 0)  # recorded, never stepped
    trainer.zero_grad()
    task.train_step(samples[1], model, criterion, optimizer, 0, ignore_grad=True)  # a dummy
    task.train_step(samples[1], model, criterion, optimizer, 0)
    recorded = sam._plain_sum.double()
    expected = plain_gradient(samples[1])
    assert float((recorded - expected).norm() / expected.norm()) < RTOL
    stale = expected + plain_gradient(samples[0])
    assert float((recorded - stale).norm() / stale.norm()) > 1e-2  # control
