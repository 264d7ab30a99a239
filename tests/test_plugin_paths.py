"""The plugin off the IWSLT recipe's path: criteria that log floats, other units or a metric of
their own; legacy_ddp after a recovered OOM; LayerDrop drawing from numpy under
--sharpness-eval-interval; the host syncs an update costs."""

import copy
import math
import os
import sys

import numpy
import pytest
import torch
import torch.distributed as dist
from fairseq import metrics
from fairseq.criterions.label_smoothed_cross_entropy import LabelSmoothedCrossEntropyCriterion
from harness import (
    DDP_WORLD_SIZE,
    batches,
    build_trainer,
    ddp_results,
    ddp_scenario,
    ddp_wrapper,
    reference_logged_sharpness,
    reference_micro_batch,
    sharpness_aware_args,
)

import fairseq_asam

RHO, ETA = 0.5, 0.01
ASAM = sharpness_aware_args("asam", RHO, ETA)


def _criterion(cls):
    return lambda task: cls(task, sentence_avg=False, label_smoothing=0.1)


def _one_update(trainer, samples):
    with metrics.aggregate(new_root=True) as agg:
        trainer.train_step(samples)
    return agg


# --- a criterion's own units ----------------------------------------------------------------


class NatsPerSample(LabelSmoothedCrossEntropyCriterion):
    """Logs `loss` in nats per sample unit (as model_criterion, speech_ulm_criterion)."""

    @classmethod
    def reduce_metrics(cls, logging_outputs):
        loss = sum(log["loss"] for log in logging_outputs)
        size = sum(log["sample_size"] for log in logging_outputs)
        metrics.log_scalar("loss", loss / size, size)


class MeanOfMicroBatches(LabelSmoothedCrossEntropyCriterion):
    """Logs each micro-batch's mean loss and averages them over micro-batches (tacotron2 and
    fastspeech2 log means too, weighted by sample_size)."""

    def forward(self, model, sample, reduce=True):
        loss, sample_size, log = super().forward(model, sample, reduce=reduce)
        return loss, sample_size, {**log, "loss": log["loss"] / sample_size}

    @classmethod
    def reduce_metrics(cls, logging_outputs):
        count = len(logging_outputs)
        metrics.log_scalar("loss", sum(log["loss"] for log in logging_outputs) / count, count)


def test_sharpness_is_in_the_units_of_the_criterions_loss(data_bin):
    samples, logged, expected = None, {}, {}
    for name, cls in (("nats", NatsPerSample), ("mean", MeanOfMicroBatches)):
        trainer = build_trainer(
            data_bin, ASAM + ["--update-freq", "2"], make_criterion=_criterion(cls)
        )
        samples = samples or batches(trainer, 2)
        model0 = copy.deepcopy(trainer.get_model())
        logged[name] = float(_one_update(trainer, samples)["sharpness"].avg)
        steps = [
            reference_micro_batch(model0, trainer.criterion, s, RHO, ETA, True) for s in samples
        ]
        if name == "nats":
            rise = sum(s.perturbed_loss - s.loss for s in steps)
            expected[name] = rise / sum(s.sample_size for s in steps)
        else:
            expected[name] = sum((s.perturbed_loss - s.loss) / s.sample_size for s in steps) / 2
    # The same rises through a few fp32 reductions: 1e-4 as the other sharpness tests.
    assert logged["nats"] == pytest.approx(expected["nats"], rel=1e-4)
    assert logged["mean"] == pytest.approx(expected["mean"], rel=1e-4)
    # Control: fairseq's cross-entropy convention (base 2 per sample unit) is another number.
    base2 = expected["nats"] / math.log(2)
    assert abs(logged["nats"] - base2) > 0.3 * abs(base2)


# --- a criterion's own `sharpness` metric -----------------------------------------------------


class OwnSharpnessMetric(LabelSmoothedCrossEntropyCriterion):
    """Logs a metric named `sharpness` in reduce_metrics, from no logging-output key."""

    @classmethod
    def reduce_metrics(cls, logging_outputs):
        super().reduce_metrics(logging_outputs)
        metrics.log_scalar("sharpness", 123.0, 1)


@pytest.mark.parametrize("optimizer", ["adam", "asam"])
def test_a_criterions_own_sharpness_metric_from_reduce_metrics_is_kept(data_bin, optimizer):
    flags = ["--optimizer", "adam"] if optimizer == "adam" else ASAM
    trainer = build_trainer(data_bin, flags, make_criterion=_criterion(OwnSharpnessMetric))
    agg = _one_update(trainer, batches(trainer, 1))
    assert float(agg["sharpness"].avg) == 123.0  # neither removed (adam) nor averaged (asam)


def test_sharpness_is_the_mean_over_measured_micro_batches_around_a_dummy_one(data_bin):
    """A dummy micro-batch between two real ones (fairseq keeps its statistics: it is not the
    last) is not measured: the mean is over the real two, whatever the criterion's normalizer."""
    trainer = build_trainer(data_bin, ASAM + ["--update-freq", "3"])
    real = batches(trainer, 3)
    trainer.reset_dummy_batch(real[2])
    model0 = copy.deepcopy(trainer.get_model())
    logged = float(_one_update(trainer, [real[0], {}, real[1]])["sharpness"].avg)
    expected = reference_logged_sharpness(model0, trainer.criterion, real[:2], RHO, ETA, True)
    assert logged == pytest.approx(expected, rel=1e-4)


def test_looksam_reuses_nothing_after_a_zero_sharpness_aware_gradient():
    """g_v = 0 (e.g. a BMUF worker whose update was all dummy batches): the reuse term is 0,
    not 0 · ∞ = NaN in the weights."""
    from fairseq_asam import looksam

    scale = looksam.reuse_scale([torch.full((3,), 0.5)], torch.zeros(3), alpha=0.5)
    assert float(scale) == 0.0
    assert float(looksam.reuse_scale([torch.ones(4)], torch.full((4,), 2.0), 0.5)) == 0.5 / 2


# --- numpy's generator -------------------------------------------------------------------------


def test_eval_sharpness_leaves_numpys_generator_alone(data_bin, monkeypatch):
    """wav2vec 2.0's LayerDrop draws from numpy's global generator, in eval mode too."""
    next_draw = {}
    for interval in ("0", "1"):
        trainer = build_trainer(data_bin, ASAM + ["--sharpness-eval-interval", interval])
        encoder = trainer.get_model().encoder
        forward = encoder.forward

        def numpy_layerdrop_forward(*args, forward=forward, **kwargs):
            numpy.random.random()
            return forward(*args, **kwargs)

        monkeypatch.setattr(encoder, "forward", numpy_layerdrop_forward)
        numpy.random.seed(0)
        trainer.train_step(batches(trainer, 1))
        next_draw[interval] = numpy.random.random()
    assert next_draw["1"] == next_draw["0"]


# --- host syncs --------------------------------------------------------------------------------

# Tensor methods that make the host wait for the device (a stream sync on CUDA).
HOST_SYNCS = ("__bool__", "__float__", "__int__", "item", "tolist")
PLUGIN_DIR = os.path.dirname(os.path.abspath(fairseq_asam.__file__))


def _count_plugin_syncs(monkeypatch):
    """Counts host syncs and host-to-device tensor creation called from the plugin's code."""
    calls = []

    def counted(name, original):
        def wrapper(*args, **kwargs):
            if sys._getframe(1).f_code.co_filename.startswith(PLUGIN_DIR):
                calls.append(name)
            return original(*args, **kwargs)

        return wrapper

    for name in HOST_SYNCS:
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch, "tensor", counted("torch.tensor", torch.tensor))
    return calls


UPDATE_FREQ = 4


@pytest.mark.parametrize("looksam", [False, True])
def test_host_syncs_per_micro_batch(data_bin, monkeypatch, looksam):
    """One per perturbed micro-batch (is ‖T g‖ finite?), none on a plain update."""
    flags = ASAM + ["--update-freq", str(UPDATE_FREQ), "--sam-interval", "2"]
    if looksam:
        flags += ["--looksam-alpha", "0.5"]
    trainer = build_trainer(data_bin, flags)
    samples = batches(trainer, 2 * UPDATE_FREQ)
    calls = _count_plugin_syncs(monkeypatch)
    trainer.train_step(samples[:UPDATE_FREQ])  # update 0: sharpness-aware
    perturbed, calls[:] = list(calls), []
    trainer.train_step(samples[UPDATE_FREQ:])  # update 1: plain (--sam-interval 2)
    assert perturbed == ["__bool__"] * UPDATE_FREQ
    assert calls == []


# --- legacy_ddp after a recovered OOM -------------------------------------------------------


class OutOfMemoryOnCall(LabelSmoothedCrossEntropyCriterion):
    """Raises what fairseq's Trainer recovers from (a CUDA OOM) on the forward numbered `fail`."""

    fail, calls = 0, 0

    def forward(self, model, sample, reduce=True):
        type(self).calls += 1
        if type(self).calls == self.fail:
            raise RuntimeError("CUDA out of memory. (injected by the test)")
        return super().forward(model, sample, reduce=reduce)


def test_legacy_ddp_syncs_again_after_a_recovered_oom(data_bin, tmp_path, monkeypatch):
    """The OOM strikes pass 1 of the update's last micro-batch (forward 3), which the plugin
    runs under no_sync() where stock fairseq runs no no_sync() at all.  fairseq recovers; the
    wrapper must sync again.  (An OOM in an earlier micro-batch, inside fairseq's own
    no_sync(), leaves the flag set under Adam too: fairseq's, not tested here.)"""
    monkeypatch.setattr(OutOfMemoryOnCall, "fail", 3)
    monkeypatch.setattr(OutOfMemoryOnCall, "calls", 0)
    flags = ASAM + ["--update-freq", "2"]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/init", rank=0, world_size=1)
    try:
        trainer = build_trainer(
            data_bin,
            flags,
            wrap_model=ddp_wrapper("legacy_ddp"),
            make_criterion=_criterion(OutOfMemoryOnCall),
        )
        assert trainer.train_step(batches(trainer, 2)) is None  # recovered: update skipped
        assert OutOfMemoryOnCall.calls == OutOfMemoryOnCall.fail  # the OOM was the last forward
        assert trainer.model.module.accumulate_grads is False
    finally:
        dist.destroy_process_group()


# --- criteria whose statistics are gathered by pickling ---------------------------------------


class FloatStatistics(LabelSmoothedCrossEntropyCriterion):
    """Logs Python floats and cannot have its statistics summed (as wav2vec 2.0's, HuBERT's):
    fairseq gathers them by pickling into --all-gather-list-size (16,384) bytes."""

    def forward(self, model, sample, reduce=True):
        loss, sample_size, log = super().forward(model, sample, reduce=reduce)
        return loss, sample_size, {k: float(v) for k, v in log.items()}

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return False


WORLD_SIZE, MANY_MICRO_BATCHES = DDP_WORLD_SIZE, 32
ALL_GATHER_LIST_SIZE = 16384  # fairseq's default --all-gather-list-size


def _gathering(rank, data_bin):
    from fairseq.distributed import utils as distributed_utils

    # fairseq keeps all_gather_list's buffer on the GPU; given CPU buffers, the rest of it (the
    # size check, pickling, the all-reduce) runs unchanged over gloo.
    gather = distributed_utils.all_gather_list
    gather._buffer = torch.zeros(ALL_GATHER_LIST_SIZE * WORLD_SIZE, dtype=torch.uint8)
    gather._cpu_buffer = torch.zeros(ALL_GATHER_LIST_SIZE, dtype=torch.uint8)
    flags = ASAM + [
        "--update-freq",
        str(MANY_MICRO_BATCHES),
        "--distributed-world-size",
        str(WORLD_SIZE),
        "--sharpness-eval-interval",
        "1",
    ]
    trainer = build_trainer(
        data_bin,
        flags,
        wrap_model=ddp_wrapper("pytorch_ddp"),
        make_criterion=_criterion(FloatStatistics),
    )
    pool = batches(trainer, 2)
    world = [[pool[(i + r) % 2] for i in range(MANY_MICRO_BATCHES)] for r in range(WORLD_SIZE)]
    model0 = copy.deepcopy(trainer.get_model())
    log = trainer.train_step(world[rank])
    record = {"sharpness": float(log["sharpness"]), "sharpness_eval": float(log["sharpness_eval"])}
    if rank == 0:  # each distinct micro-batch once: the mean is the same as over all 64
        record["expected"] = reference_logged_sharpness(
            model0, trainer.criterion, pool, RHO, ETA, True
        )
    return record


ddp_scenario("gather-by-pickling", _gathering)


@pytest.mark.slow  # the session's spawned DDP group (harness.ddp_results)
def test_criteria_that_gather_statistics_by_pickling(data_bin):
    ranks = ddp_results(data_bin, "gather-by-pickling")
    assert ranks[1]["sharpness"] == ranks[0]["sharpness"]
    # Dropout is 0: the eval-mode value is the train-mode one, and both the equations'; the
    # Trainer returns them rounded to 4 decimals (abs 5e-5).
    assert ranks[0]["sharpness"] == pytest.approx(ranks[0]["expected"], rel=1e-4, abs=6e-5)
    assert ranks[0]["sharpness_eval"] == pytest.approx(ranks[0]["expected"], rel=1e-4, abs=6e-5)
