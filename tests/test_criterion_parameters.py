"""A criterion with parameters of its own: loss · exp(s), s learnable.

The sharpness-aware update is ∇ of exp(s)·L(w + ε): for s that is exp(s)·L(w + ε) per
micro-batch (pass 2's loss), never pass 1's exp(s)·L(w); s itself is not perturbed (ε lives on
the model's weights), and when fairseq wraps the criterion in DDP, pass 1 must not sync it.
"""

import copy

import pytest
import torch
from fairseq.criterions.label_smoothed_cross_entropy import LabelSmoothedCrossEntropyCriterion
from harness import (
    DDP_WORLD_SIZE,
    StepRecorder,
    batches,
    build_trainer,
    ddp_results,
    ddp_scenario,
    reference_micro_batch,
    reference_update_gradient,
    relative_error,
)

RHO, ETA = 0.5, 0.01
INITIAL_LOG_SCALE = 0.3
WORLD_SIZE = DDP_WORLD_SIZE


class ScaledCriterion(LabelSmoothedCrossEntropyCriterion):
    """Label-smoothed cross-entropy times exp(s); records s at every call."""

    def __init__(self, task):
        super().__init__(task, sentence_avg=False, label_smoothing=0.1)
        self.log_scale = torch.nn.Parameter(torch.tensor(INITIAL_LOG_SCALE))
        self.seen_log_scale = []

    def forward(self, model, sample, reduce=True):
        self.seen_log_scale.append(float(self.log_scale.detach()))
        loss, sample_size, logging_output = super().forward(model, sample, reduce=reduce)
        return loss * self.log_scale.exp(), sample_size, logging_output


def build(data_bin, extra, wrap_model=None, wrap_criterion=None):
    flags = ["--optimizer", "asam", "--rho", str(RHO), "--eta", str(ETA)] + list(extra)
    trainer = build_trainer(
        data_bin,
        flags,
        wrap_model=wrap_model,
        make_criterion=ScaledCriterion,
        wrap_criterion=wrap_criterion,
    )
    return trainer, trainer.get_criterion()


def expected_criterion_gradients(model, criterion, world_samples):
    """∂/∂s of the update from the equations, and the two wrong answers (controls)."""
    steps = [
        reference_micro_batch(model, criterion, s, RHO, ETA, True)
        for worker in world_samples
        for s in worker
    ]
    size = sum(s.sample_size for s in steps)
    return {
        "sharpness_aware": sum(s.perturbed_loss for s in steps) / size,  # exp(s)·L(w + ε)
        "plain": sum(s.loss for s in steps) / size,  # exp(s)·L(w): Adam's
        "both_passes": sum(s.loss + s.perturbed_loss for s in steps) / size,
    }


@pytest.mark.parametrize("update_freq", [1, 2])
def test_criterion_parameter_gets_pass_two_gradient_only(data_bin, update_freq):
    trainer, criterion = build(data_bin, ["--update-freq", str(update_freq)])
    samples = batches(trainer, update_freq)
    model0, criterion0 = copy.deepcopy(trainer.get_model()), ScaledCriterion(trainer.task)
    recorder = StepRecorder(trainer)
    trainer.train_step(samples)

    expected = expected_criterion_gradients(model0, criterion0, [samples])
    received = float(recorder.grads[-1])  # the optimizer's parameters: the model's, then s
    assert received == pytest.approx(expected["sharpness_aware"], rel=1e-5)
    assert abs(received - expected["plain"]) > 1e-2 * abs(expected["plain"])  # controls
    assert abs(received - expected["both_passes"]) > 0.5 * abs(expected["plain"])
    # s is not perturbed: every forward pass (2 per micro-batch) saw its initial value.
    assert len(criterion.seen_log_scale) == 2 * update_freq
    assert criterion.seen_log_scale == [float(torch.tensor(INITIAL_LOG_SCALE))] * (2 * update_freq)
    # The model's gradient is the update rule's, with the criterion's scale in it.
    model_grads = recorder.grads[:-1]
    reference = reference_update_gradient(model0, criterion0, samples, RHO, ETA, True)
    assert relative_error(model_grads, reference) < 1e-6


def _ddp(module):
    from fairseq.distributed import ModuleProxyWrapper

    return ModuleProxyWrapper(torch.nn.parallel.DistributedDataParallel(module))


def _counting_allreduce(counter):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def hook(state, bucket):
        counter.append(1)
        return allreduce_hook(None, bucket)

    return hook


def _in_ddp(rank, data_bin):
    update_freq = 2
    trainer, criterion = build(
        data_bin,
        [
            "--update-freq",
            str(update_freq),
            "--distributed-world-size",
            str(WORLD_SIZE),
            "--ddp-backend",
            "pytorch_ddp",
        ],
        wrap_model=_ddp,
        wrap_criterion=_ddp,
    )
    syncs = []
    trainer.criterion.module.register_comm_hook(None, _counting_allreduce(syncs))
    world_samples = [
        batches(trainer, update_freq, shard_id=r, num_shards=WORLD_SIZE) for r in range(WORLD_SIZE)
    ]
    model0, criterion0 = copy.deepcopy(trainer.get_model()), ScaledCriterion(trainer.task)
    recorder = StepRecorder(trainer)
    trainer.train_step(world_samples[rank])
    expected = expected_criterion_gradients(model0, criterion0, world_samples)
    reference = reference_update_gradient(
        model0, criterion0, None, RHO, ETA, True, world_samples=world_samples
    )
    return {
        "received": float(recorder.grads[-1]),
        **expected,
        "criterion_syncs": len(syncs),
        "model_error": relative_error(recorder.grads[:-1], reference),
    }


ddp_scenario("criterion-in-ddp", _in_ddp)


@pytest.mark.slow  # the session's spawned DDP group (harness.ddp_results)
def test_criterion_in_ddp(data_bin):
    for r in ddp_results(data_bin, "criterion-in-ddp"):
        assert r["received"] == pytest.approx(r["sharpness_aware"], rel=1e-5)
        assert abs(r["received"] - r["plain"]) > 1e-2 * abs(r["plain"])
        assert r["model_error"] < 1e-6
        # fairseq syncs the criterion on every backward it runs (it wraps only the model in
        # no_sync for accumulation): pass 2 of each of the 2 micro-batches, never pass 1.
        assert r["criterion_syncs"] == 2
