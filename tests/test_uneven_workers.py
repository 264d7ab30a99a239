"""Several workers with uneven data: fairseq pads a short data shard with dummy batches.

2 gloo processes, fairseq's Trainer around torch DDP (wrapped as fairseq wraps it).  fairseq
all-reduces the training statistics as one packed buffer whose keys come from each worker's
first logging output, so every worker must log the same keys for every micro-batch — a dummy
batch, a plain update of --sam-interval, a sharpness-aware one alike.  A dummy batch must also
add nothing to the update: the gradient Adam receives is compared with the equations.
"""

import copy
import math

import pytest
import torch
from harness import (
    DDP_WORLD_SIZE,
    StepRecorder,
    batches,
    build_trainer,
    ddp_results,
    ddp_scenario,
    ddp_wrapper,
    reference_logged_sharpness,
    reference_update_gradient,
    relative_error,
    sharpness_aware_args,
)

pytestmark = pytest.mark.slow  # the session's spawned DDP group (harness.ddp_results)

WORLD_SIZE = DDP_WORLD_SIZE
RHO, ETA, LOOKSAM_ALPHA = 0.5, 0.01, 0.5
DUMMY = {}  # fairseq's ShardedIterator pads a short shard with empty samples: dummy batches
ASAM = sharpness_aware_args("asam", RHO, ETA)
OPTIMIZERS = {
    "adam": ["--optimizer", "adam"],
    "asam": ASAM,
    "sam": sharpness_aware_args("sam", RHO),
    "asam-interval2": ASAM + ["--sam-interval", "2"],
    "asam-looksam": ASAM + ["--sam-interval", "2", "--looksam-alpha", str(LOOKSAM_ALPHA)],
    "asam-eval": ASAM + ["--sharpness-eval-interval", "1"],
}
# The update Adam receives is the all-reduced sum of fp32 gradients, the reference sums them in
# another order: ~1e-7 relative (1e-6, fp32's bound).  LookSAM's reuse term also goes through g_v,
# a difference of two nearly parallel gradients that magnifies their rounding: 1e-5.
UPDATE_BOUND = {"asam-looksam": 1e-5}
UPDATE_BOUND_FP32 = 1e-6
# Rank 1's micro-batches per update ("real" or a dummy); rank 0 always has real ones.
PATTERNS = {
    "uf1-dummy": [["dummy"], ["dummy"]],
    "uf2-dummy-dummy": [["dummy", "dummy"], ["dummy", "dummy"]],
    "uf2-real-dummy": [["real", "dummy"], ["real", "dummy"]],
}
UPDATES = 2
EPOCH_OPTIMIZERS = ("adam", "asam", "asam-looksam")
ODD_BATCH_COUNT_MAX_TOKENS = 130  # 11 batches of the 120-pair toy corpus


def _logged(log_output, key):
    value = (log_output or {}).get(key)
    return None if value is None else float(value)


def _flat(tensors):
    return torch.cat([t.reshape(-1).double() for t in tensors])


def _reference_update(model0, criterion, optimizer, update, world, sample_size, g_v):
    """(the gradient Adam must receive, LookSAM's g_v after the update), from the equations:
    `world` holds each worker's micro-batches that train, `sample_size` what fairseq divides
    their summed gradient by, `g_v` LookSAM's g_v from the update before."""
    adaptive = OPTIMIZERS[optimizer][1] == "asam"
    eta = ETA if adaptive else 0.0

    def gradient(rho):
        return _flat(
            reference_update_gradient(
                model0,
                criterion,
                None,
                rho,
                eta,
                adaptive,
                world_samples=world,
                sample_size=sample_size,
            )
        )

    if optimizer == "adam" or not _perturbed(optimizer, update):
        plain = gradient(1e-30)
        if optimizer == "asam-looksam" and g_v is not None:  # G + α‖G‖/‖g_v‖ g_v
            return plain + LOOKSAM_ALPHA * plain.norm() / g_v.norm() * g_v, g_v
        return plain, g_v
    sharp = gradient(RHO)
    if optimizer == "asam-looksam":  # g_v: the part of G_s orthogonal to G
        plain = gradient(1e-30)
        g_v = sharp - (sharp @ plain) / (plain @ plain) * plain
    return sharp, g_v


def _perturbed(optimizer, update):
    """Whether `update` is sharpness-aware (--sam-interval 2: updates 0, 2, ...)."""
    if optimizer == "adam":
        return False
    return "--sam-interval" not in OPTIMIZERS[optimizer] or update % 2 == 0


def _run_pattern(rank, data_bin, optimizer, pattern):
    """Two updates of `pattern`; returns what each rank logged, the reference values, and how
    far the gradient Adam received is from the reference and from the control."""
    update_freq = len(pattern[0])
    args = OPTIMIZERS[optimizer] + [
        "--update-freq",
        str(update_freq),
        "--distributed-world-size",
        str(WORLD_SIZE),
    ]
    trainer = build_trainer(data_bin, args, wrap_model=ddp_wrapper("pytorch_ddp"))
    recorder = StepRecorder(trainer)
    pool = batches(trainer, 2 * UPDATES * update_freq + 1)
    trainer.reset_dummy_batch(pool[-1])
    out, g_v = [], None
    for update in range(UPDATES):
        rank0 = pool[2 * update * update_freq : (2 * update + 1) * update_freq]
        rank1_real = pool[(2 * update + 1) * update_freq : (2 * update + 2) * update_freq]
        rank1 = [s if kind == "real" else DUMMY for s, kind in zip(rank1_real, pattern[update])]
        own = rank0 if rank == 0 else rank1
        model0 = copy.deepcopy(trainer.get_model())
        log_output = trainer.train_step(own)
        # fairseq keeps a worker's statistics, its sample size too, only if its last
        # micro-batch is real; the gradients of all its real micro-batches are all-reduced.
        kept = rank0 + (rank1 if pattern[update][-1] == "real" else [])
        kept = [s for s in kept if s is not DUMMY]
        record = {k: _logged(log_output, k) for k in ("loss", "sharpness", "sharpness_eval")}
        if optimizer != "adam":
            adaptive = OPTIMIZERS[optimizer][1] == "asam"
            record["expected_sharpness"] = (
                reference_logged_sharpness(
                    model0, trainer.criterion, kept, RHO, ETA if adaptive else 0.0, adaptive
                )
                if _perturbed(optimizer, update)
                else None
            )
        # The label-smoothed cross-entropy's sample size: the target tokens.
        sample_size = sum(float(s["ntokens"]) for s in kept)
        trained = [rank0, [s for s in rank1 if s is not DUMMY]]
        expected, next_g_v = _reference_update(
            model0, trainer.criterion, optimizer, update, trained, sample_size, g_v
        )
        # Control: the update if the dummy batches (pool[-1]) were trained on like real ones.
        with_dummies = [rank0, [pool[-1] if s is DUMMY else s for s in rank1]]
        control, _ = _reference_update(
            model0, trainer.criterion, optimizer, update, with_dummies, sample_size, g_v
        )
        g_v = next_g_v
        actual = _flat(recorder.grads)
        record["update_error"] = relative_error([actual], [expected])
        record["control_error"] = relative_error([actual], [control])
        out.append(record)
    return out


for _pattern in PATTERNS:
    for _optimizer in OPTIMIZERS:
        ddp_scenario(
            f"uneven/{_pattern}/{_optimizer}",
            _run_pattern,
            optimizer=_optimizer,
            pattern=PATTERNS[_pattern],
        )


def _same(a, b):
    return a is b is None or (a is not None and b is not None and a == pytest.approx(b, rel=1e-6))


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("pattern_name", list(PATTERNS))
def test_dummy_batches_on_one_worker(data_bin, pattern_name, optimizer):
    case = f"{pattern_name}/{optimizer}"
    rank0, rank1 = ddp_results(data_bin, f"uneven/{case}")
    adam = ddp_results(data_bin, f"uneven/{pattern_name}/adam")[0]
    for update, (record, other) in enumerate(zip(rank0, rank1)):
        # Both workers log the same statistics: the packed all-reduce lined up.
        assert other["loss"] == pytest.approx(record["loss"], rel=1e-6), update
        assert _same(other["sharpness"], record["sharpness"]), update
        assert _same(other["sharpness_eval"], record["sharpness_eval"]), update
        assert (record["sharpness_eval"] is not None) == (optimizer == "asam-eval"), update
        if update == 0:  # same weights as Adam's first update: the same loss (pass 1's)
            assert record["loss"] == pytest.approx(adam[0]["loss"], rel=1e-6)
        if optimizer == "adam":
            assert record["sharpness"] is None
        elif record["expected_sharpness"] is None:  # a plain update of --sam-interval 2
            assert record["sharpness"] is None, update
        else:
            # fairseq logs it rounded to 4 decimals (5e-5), a difference of losses reduced
            # in fp32 (~1e-6 relative of L ≈ 6.3 bits each): 1e-4.
            assert record["sharpness"] == pytest.approx(record["expected_sharpness"], abs=1e-4), (
                update
            )
        # The update: the equations over the real micro-batches only, dummy batches adding
        # nothing; the control (dummy batches trained on) is far from it.
        bound = UPDATE_BOUND.get(optimizer, UPDATE_BOUND_FP32)
        assert record["update_error"] < bound, (update, record)
        assert other["update_error"] < bound, (update, other)
        assert record["control_error"] > 100 * bound, (update, record)


def _epochs(rank, data_bin, update_freq, optimizer):
    """Two epochs over a training set whose batch count is odd, through fairseq's own sharded
    epoch iterator: the short shard's last update holds a dummy batch."""
    from fairseq.data import iterators

    trainer = build_trainer(
        data_bin,
        OPTIMIZERS[optimizer]
        + [
            "--update-freq",
            str(update_freq),
            "--distributed-world-size",
            str(WORLD_SIZE),
            "--max-tokens",
            str(ODD_BATCH_COUNT_MAX_TOKENS),
        ],
        wrap_model=ddp_wrapper("pytorch_ddp"),
    )
    epoch_itr = trainer.get_train_iterator(epoch=1)
    logs = []
    for _ in range(2):
        itr = iterators.GroupedIterator(epoch_itr.next_epoch_itr(shuffle=True), update_freq)
        for samples in itr:
            log_output = trainer.train_step(samples)
            logs.append({k: _logged(log_output, k) for k in ("loss", "sharpness")})
    return {
        "total_batches": len(epoch_itr.frozen_batches),
        "logs": logs,
        "updates": trainer.get_num_updates(),
    }


for _update_freq in (1, 2):
    for _optimizer in EPOCH_OPTIMIZERS:
        ddp_scenario(
            f"uneven-epochs/uf{_update_freq}/{_optimizer}",
            _epochs,
            update_freq=_update_freq,
            optimizer=_optimizer,
        )


@pytest.mark.parametrize("optimizer", EPOCH_OPTIMIZERS)
@pytest.mark.parametrize("update_freq", (1, 2))
def test_epochs_with_odd_batch_count(data_bin, update_freq, optimizer):
    rank0, rank1 = ddp_results(data_bin, f"uneven-epochs/uf{update_freq}/{optimizer}")
    adam = ddp_results(data_bin, f"uneven-epochs/uf{update_freq}/adam")[0]["logs"]
    assert rank0["total_batches"] % 2 == 1  # one shard is padded with a dummy batch
    a, b = rank0["logs"], rank1["logs"]
    assert len(a) == len(b) == rank0["updates"] >= 4
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6) and math.isfinite(x["loss"])
        assert _same(x["sharpness"], y["sharpness"])
        if optimizer == "adam":
            assert x["sharpness"] is None
    if optimizer == "asam":
        assert all(x["sharpness"] is not None for x in a)
    # The first update starts from the same weights as Adam's: the same loss.
    assert a[0]["loss"] == pytest.approx(adam[0]["loss"], rel=1e-6)
