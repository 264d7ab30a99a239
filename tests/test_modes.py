"""Every training mode that runs on a CPU: mixed precision, clipping, dummy batches, overflow,
and an exception inside pass 2."""

import copy
import os
import re

import pytest
import torch
from harness import (
    FailingCriterion,
    StepRecorder,
    batches,
    build_trainer,
    emulate_flat_fp16_on_cpu,
    reference_update_gradient,
    relative_error,
    sharpness_aware_args,
)

RHO, ETA = 0.5, 0.01


def run_update(data_bin, extra, update_freq=2):
    trainer = build_trainer(
        data_bin,
        sharpness_aware_args("asam", RHO, ETA, update_freq) + list(extra),
    )
    samples = batches(trainer, update_freq)
    model0 = copy.deepcopy(trainer.get_model()).float()
    recorder = StepRecorder(trainer)
    trainer.train_step(samples)
    return trainer, samples, model0, recorder


# fp16 rounds every operation of both passes to 2^-11 ≈ 5e-4 relative (measured 2.2e-3 on the
# whole gradient), bf16 to 2^-8 ≈ 4e-3 (measured 1.2e-2); the control stays > 3 × the bound.
@pytest.mark.parametrize(
    "flags,rtol",
    [
        (["--fp16", "--fp16-init-scale", "128"], 1e-2),  # flat fp32 master copy, emulated on CPU
        (["--fp16", "--fp16-no-flatten-grads", "--fp16-init-scale", "128"], 1e-2),
        (["--memory-efficient-fp16", "--fp16-init-scale", "128"], 1e-2),
        (["--bf16-via-hydra"], 6e-2),
    ],
)
def test_mixed_precision_matches_reference(data_bin, flags, rtol):
    with emulate_flat_fp16_on_cpu():
        if flags == ["--bf16-via-hydra"]:
            # fairseq-train --bf16 means TPU; fairseq-hydra-train sets common.bf16 alone, as here.
            trainer = build_trainer(
                data_bin,
                ["--optimizer", "asam", "--rho", str(RHO), "--eta", str(ETA), "--update-freq", "2"],
                bf16=True,
            )
            samples = batches(trainer, 2)
            model0 = copy.deepcopy(trainer.get_model()).float()
            recorder = StepRecorder(trainer)
            trainer.train_step(samples)
        else:
            trainer, samples, model0, recorder = run_update(data_bin, flags)
    expected = reference_update_gradient(model0, trainer.criterion, samples, RHO, ETA, True)
    plain = reference_update_gradient(model0, trainer.criterion, samples, 1e-30, ETA, True)
    grads = [g.float() for g in recorder.grads]
    if len(grads) == 1:  # flat --fp16: one flat fp32 gradient in the model's parameter order
        expected, plain = [[torch.cat([g.reshape(-1) for g in x])] for x in (expected, plain)]
    error = relative_error(grads, expected)
    assert error < rtol
    assert relative_error(grads, plain) > 3 * rtol  # control


def test_amp_on_cpu_is_fp32(data_bin):
    """fairseq's --amp is CUDA AMP: on a CPU its GradScaler and autocast switch themselves off
    (and say so), so this run is fp32 — it checks the AMPOptimizer wrapper, not mixed
    precision.  Real autocast on the CPU: test_bf16_autocast_on_cpu; on CUDA: gpu_check."""
    with pytest.warns(UserWarning, match="CUDA is not available"):
        trainer, samples, model0, recorder = run_update(data_bin, ["--amp"])
    assert type(trainer.optimizer).__name__ == "AMPOptimizer"
    assert not trainer.optimizer._grad_scaler.is_enabled()
    expected = reference_update_gradient(model0, trainer.criterion, samples, RHO, ETA, True)
    assert relative_error(recorder.grads, expected) < 1e-6  # fp32 sums in another order


def test_bf16_autocast_on_cpu(data_bin):
    """Both passes under torch.autocast("cpu", bfloat16) with fairseq's AMPOptimizer: weights
    and ε stay fp32, matmuls run in bf16 — CUDA AMP's mechanism, in bf16 on the CPU.  The
    update equals the equations evaluated under the same autocast."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trainer, samples, model0, recorder = run_update(data_bin, ["--amp"])
        expected = reference_update_gradient(model0, trainer.criterion, samples, RHO, ETA, True)
        plain = reference_update_gradient(model0, trainer.criterion, samples, 1e-30, ETA, True)
    fp32 = reference_update_gradient(model0, trainer.criterion, samples, RHO, ETA, True)
    assert all(g.dtype == torch.float32 for g in recorder.grads)
    # The same bf16 matmuls on both sides; what differs is fp32 (ε, accumulation): 1e-6.
    assert relative_error(recorder.grads, expected) < 1e-6
    assert relative_error(recorder.grads, plain) > 1e-2  # control: the perturbation is visible
    assert relative_error(recorder.grads, fp32) > 1e-3  # and autocast really ran in bf16


@pytest.mark.parametrize("clip", [0.05])
def test_clip_norm_applies_to_perturbed_gradient(data_bin, clip):
    trainer, samples, model0, recorder = run_update(data_bin, ["--clip-norm", str(clip)])
    expected = reference_update_gradient(model0, trainer.criterion, samples, RHO, ETA, True)
    total = torch.sqrt(sum((g**2).sum() for g in expected))
    assert total > clip  # the clip is active
    clipped = [g * (clip / (total + 1e-6)) for g in expected]
    # fp32 gradients, scaled by a coefficient from their fp32 norm: ~1e-7 each (1.3e-7 measured).
    assert relative_error(recorder.grads, clipped) < 1e-6


class CountingForward:
    """Records the weights each forward pass of the model saw."""

    def __init__(self, model):
        self.seen = []
        model.register_forward_pre_hook(
            lambda module, args: self.seen.append([p.detach().clone() for p in module.parameters()])
        )


def test_dummy_batch_takes_one_unperturbed_pass(data_bin):
    trainer = build_trainer(data_bin, ["--optimizer", "asam", "--rho", str(RHO)])
    sample = batches(trainer, 1)[0]
    model = trainer.model
    w0 = [p.detach().clone() for p in model.parameters()]
    forwards = CountingForward(model)
    trainer.zero_grad()
    trainer.task.train_step(
        sample, model, trainer.criterion, trainer.optimizer, 0, ignore_grad=True
    )
    assert len(forwards.seen) == 1
    assert all(torch.equal(a, b) for a, b in zip(forwards.seen[0], w0))
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_exception_in_pass_two_restores_weights(data_bin):
    trainer = build_trainer(data_bin, ["--optimizer", "asam", "--rho", str(RHO)])
    sample = batches(trainer, 1)[0]
    model = trainer.model
    w0 = [p.detach().clone() for p in model.parameters()]
    forwards = CountingForward(model)
    failing = FailingCriterion(trainer.criterion, raise_call=2)
    with pytest.raises(RuntimeError, match="injected failure"):
        trainer.task.train_step(sample, model, failing, trainer.optimizer, 0)
    assert len(forwards.seen) == 1  # pass 2 raised before its forward
    assert all(torch.equal(p.detach(), w) for p, w in zip(model.parameters(), w0))


@pytest.mark.parametrize("fp16_flag", ["--fp16-no-flatten-grads", "--memory-efficient-fp16"])
def test_fp16_overflow_in_pass_one_reaches_loss_scaler(data_bin, fp16_flag):
    extra = ["--optimizer", "asam", "--rho", str(RHO), "--fp16-init-scale", "128", fp16_flag]
    if fp16_flag == "--fp16-no-flatten-grads":
        extra.append("--fp16")
    trainer = build_trainer(data_bin, extra)
    sample = batches(trainer, 1)[0]
    model = trainer.model
    w0 = [p.detach().clone() for p in model.parameters()]
    forwards = CountingForward(model)
    overflowing = FailingCriterion(trainer.criterion, scale_call=1, factor=1e6)  # pass 1 only
    optimizer = trainer.optimizer
    scale_before = optimizer.scaler.loss_scale
    trainer.zero_grad()
    trainer.task.train_step(sample, model, overflowing, optimizer, 0)
    assert len(forwards.seen) == 2
    assert all(
        torch.equal(a, b) for a, b in zip(forwards.seen[1], w0)
    )  # pass 2 at w: no perturbation
    assert all(torch.equal(p.detach(), w) for p, w in zip(model.parameters(), w0))
    optimizer.multiply_grads(1.0)
    with pytest.raises(OverflowError):
        optimizer.clip_grad_norm(0.0)
    assert optimizer.scaler.loss_scale < scale_before


@pytest.mark.parametrize(
    "optimizer,flags,warned",
    [
        ("asam", ["--fp16", "--fp16-no-flatten-grads"], "asam with fp16 weights"),
        ("sam", ["--memory-efficient-fp16"], "sam with fp16 weights"),
        ("asam", ["--amp"], None),  # fp32 weights: ε is kept
        ("asam", [], None),
        ("adam", ["--fp16", "--fp16-no-flatten-grads"], None),
    ],
)
def test_low_precision_weights_warn_at_start(data_bin, caplog, optimizer, flags, warned):
    trainer = build_trainer(
        data_bin, ["--optimizer", optimizer, "--fp16-init-scale", "128"] + flags
    )
    with caplog.at_level("WARNING", logger="fairseq_asam.optim"):
        trainer.optimizer  # built here, before the first update
    messages = [r.getMessage() for r in caplog.records if r.name == "fairseq_asam.optim"]
    if warned is None:
        assert messages == []
    else:
        assert len(messages) == 1 and warned in messages[0] and "--amp" in messages[0]


def test_bf16_weights_warn_at_start(data_bin, caplog):
    trainer = build_trainer(data_bin, ["--optimizer", "asam"], bf16=True)
    with caplog.at_level("WARNING", logger="fairseq_asam.optim"):
        trainer.optimizer
    messages = [r.getMessage() for r in caplog.records if r.name == "fairseq_asam.optim"]
    assert (
        len(messages) == 1 and "asam with bf16 weights" in messages[0] and "72–80%" in messages[0]
    )


def test_start_up_warning_quotes_the_docs_measured_table():
    """The warning's figures are the measured "kept" column of docs/mixed-precision.md (min–max
    over init and trained), so that neither can drift from the other."""
    page = os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs", "mixed-precision.md")
    with open(page, encoding="utf-8") as f:
        text = f.read()
    from fairseq_asam.optim import LOSS_INCREASE_KEPT

    for (optimizer, precision), quoted in LOSS_INCREASE_KEPT.items():
        row = re.search(
            rf"^\| {optimizer.upper()}, {precision} weights \|.*\| (\d+)% / (\d+)% \|$", text, re.M
        )
        assert row, (optimizer, precision)
        low, high = sorted(int(v) for v in row.groups())
        assert quoted == (f"{low}%" if low == high else f"{low}–{high}%"), (quoted, row.group(0))
