"""What only a GPU can show, each against the update written from the equations (harness.py).

    bash scripts/gpu_check.sh               # CUDA: one line per check, exit 1 on a failure
    python tests/gpu_check.py --device cpu  # the same checks on the CPU (the tests run the
                                            # data-parallel ones: test_gpu_check.py)

Checks: fp32; fairseq's flat --fp16; bf16 weights (common.bf16); --amp (CUDA: GradScaler and
fp16 autocast on, compared with the equations evaluated under the same autocast); data parallel
over as many ranks as there are GPUs (NCCL, fairseq's own DistributedFairseqModel): the update
is the sum of every worker's perturbed gradients, and dummy batches on the last rank (uneven
data) add nothing to the update while every rank logs the same loss and sharpness.  On the CPU,
flat --fp16 is emulated (harness.emulate_flat_fp16_on_cpu), --amp is fp32 (fairseq's AMP is
CUDA-only) and the data-parallel checks run over 2 gloo processes with torch DDP.
"""

import argparse
import contextlib
import copy
import datetime
import os
import sys
import tempfile

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (  # noqa: E402
    StepRecorder,
    batches,
    build_trainer,
    emulate_flat_fp16_on_cpu,
    make_data_bin,
    parse_cfg,
    reference_logged_sharpness,
    reference_update_gradient,
    relative_error,
    sharpness_aware_args,
    spawn_workers,
)

RHO, ETA, UPDATE_FREQ = 0.5, 0.01, 2
ASAM_FLAGS = sharpness_aware_args("asam", RHO, ETA, UPDATE_FREQ)
# fp16/bf16 gradients round differently from the fp32 reference; the plain gradient is ~0.4
# away at this ρ, so these bounds still tell the two apart (a check also needs control > 3 × bound).
BOUND = {
    "fp32": 1e-5,
    "fp16-flat": 1e-2,
    "bf16": 6e-2,
    "amp-cuda": 1e-2,
    "amp-cpu": 1e-6,
    "ddp": 1e-5,
}
CPU_DDP_WORLD_SIZE = 2
DDP_TIMEOUT = datetime.timedelta(seconds=300)  # a hang fails the check in minutes
DUMMY = {}  # what fairseq's ShardedIterator pads a short shard with


def _flat_if_needed(grads, *references):
    """flat --fp16 hands Adam one flat gradient (the model's parameter order)."""
    if len(grads) == 1 and len(references[0]) > 1:
        return [[torch.cat([g.reshape(-1) for g in ref])] for ref in references]
    return list(references)


def update_check(name, data_bin, device, flags=(), bf16=False, autocast=None, bound_key=None):
    """One update of the tiny model; the gradient Adam received against the reference."""
    emulate = emulate_flat_fp16_on_cpu() if device == "cpu" else contextlib.nullcontext()
    with emulate:
        trainer = build_trainer(data_bin, ASAM_FLAGS + list(flags), bf16=bf16, device=device)
        samples = batches(trainer, UPDATE_FREQ)
        model0 = copy.deepcopy(trainer.get_model()).float()
        recorder = StepRecorder(trainer)
        trainer.train_step(samples)
    prepared = [trainer._prepare_sample(s)[0] for s in samples]
    criterion = trainer.criterion
    with torch.autocast(device, dtype=autocast) if autocast else contextlib.nullcontext():
        expected = reference_update_gradient(model0, criterion, prepared, RHO, ETA, True)
        plain = reference_update_gradient(model0, criterion, prepared, 1e-30, ETA, True)
    grads = [g.float() for g in recorder.grads]
    expected, plain = _flat_if_needed(grads, expected, plain)
    bound = BOUND[bound_key or name]
    error, control = relative_error(grads, expected), relative_error(grads, plain)
    ok = error < bound and control > 3 * bound
    extra = ""
    if name == "amp":
        scaler = trainer.optimizer._grad_scaler.is_enabled()
        ok = ok and scaler == (device == "cuda")
        extra = f", GradScaler {'on' if scaler else 'off (CPU: this is fp32)'}"
    return ok, (
        f"{name}: {type(trainer.optimizer).__name__}, relative error vs reference {error:.2e} "
        f"(bound {bound:.0e}), vs plain gradient {control:.2e}{extra}"
    )


def _wrap_for(device, rank, data_bin):
    if device == "cuda":
        from fairseq.models import DistributedFairseqModel

        cfg = parse_cfg(
            data_bin, ["--ddp-backend", "pytorch_ddp", "--device-id", str(rank)], device
        )

        def wrap(model):
            return DistributedFairseqModel(
                cfg.distributed_training, model.cuda(), dist.group.WORLD, torch.device("cuda", rank)
            )
    else:
        from fairseq.distributed import ModuleProxyWrapper

        def wrap(model):
            return ModuleProxyWrapper(torch.nn.parallel.DistributedDataParallel(model))

    return wrap


def ddp_rank_checks(rank, world_size, device, data_bin):
    """This rank's part of the data-parallel checks (in a process group already joined)."""
    flags = ASAM_FLAGS + ["--distributed-world-size", str(world_size)]
    result = {}

    trainer = build_trainer(
        data_bin, flags, wrap_model=_wrap_for(device, rank, data_bin), device=device
    )
    world = [
        batches(trainer, UPDATE_FREQ, shard_id=r, num_shards=world_size) for r in range(world_size)
    ]
    model0 = copy.deepcopy(trainer.get_model())
    recorder = StepRecorder(trainer)
    trainer.train_step(world[rank])
    prepared = [[trainer._prepare_sample(s)[0] for s in worker] for worker in world]
    expected = reference_update_gradient(
        model0, trainer.criterion, None, RHO, ETA, True, world_samples=prepared
    )
    result["error"] = relative_error(recorder.grads, expected)

    if world_size > 1:  # the last rank's shard ran out: its micro-batches are dummy batches
        trainer = build_trainer(
            data_bin, flags, wrap_model=_wrap_for(device, rank, data_bin), device=device
        )
        trainer.reset_dummy_batch(world[0][0])
        model0 = copy.deepcopy(trainer.get_model())
        recorder = StepRecorder(trainer)
        own = [DUMMY] * UPDATE_FREQ if rank == world_size - 1 else world[rank]
        log = trainer.train_step(own)
        result["loss"], result["sharpness"] = float(log["loss"]), float(log["sharpness"])
        kept = prepared[:-1]  # the last rank trains on nothing; its sample size is zeroed
        result["expected_sharpness"] = reference_logged_sharpness(
            model0, trainer.criterion, [s for worker in kept for s in worker], RHO, ETA, True
        )
        expected = reference_update_gradient(
            model0, trainer.criterion, None, RHO, ETA, True, world_samples=kept
        )
        # Control: the update if the dummy batches (world[0][0]) were trained on.
        with_dummies = kept + [[prepared[0][0]] * UPDATE_FREQ]
        control = reference_update_gradient(
            model0,
            trainer.criterion,
            None,
            RHO,
            ETA,
            True,
            world_samples=with_dummies,
            sample_size=sum(float(s["ntokens"]) for worker in kept for s in worker),
        )
        result["dummy_error"] = relative_error(recorder.grads, expected)
        result["dummy_control"] = relative_error(recorder.grads, control)
    return result


def ddp_checks(data_bin, device):
    world_size = torch.cuda.device_count() if device == "cuda" else CPU_DDP_WORLD_SIZE
    ranks = spawn_workers(
        ddp_rank_checks,
        (device, data_bin),
        world_size,
        "nccl" if device == "cuda" else "gloo",
        DDP_TIMEOUT,
    )
    return ddp_check_lines(ranks, device)


def ddp_check_lines(ranks, device):
    """(ok, line) of the data-parallel checks from every rank's `ddp_rank_checks`."""
    world_size = len(ranks)
    transport = "NCCL, DistributedFairseqModel" if device == "cuda" else "gloo, torch DDP"
    worst = max(r["error"] for r in ranks)
    checks = [
        (
            worst < BOUND["ddp"],
            f"ddp: {world_size} ranks ({transport}), update vs reference sum of "
            f"per-worker perturbed gradients {worst:.2e} (bound {BOUND['ddp']:.0e})",
        )
    ]
    if world_size == 1:
        checks.append((True, "ddp-dummy-batch: skipped, needs 2 or more GPUs"))
        return checks
    losses = {r["loss"] for r in ranks}
    sharpness = [r["sharpness"] for r in ranks]
    expected = ranks[0]["expected_sharpness"]
    spread = max(sharpness) - min(sharpness)
    # fairseq logs the sharpness rounded to 4 decimals (5e-5), a difference of losses reduced
    # in fp32 (~1e-6 relative each): 1e-4 absolute.
    error = abs(sharpness[0] - expected)
    worst = max(r["dummy_error"] for r in ranks)
    control = min(r["dummy_control"] for r in ranks)
    ok = (
        len(losses) == 1
        and spread == 0
        and error < 1e-4
        and worst < BOUND["ddp"]
        and control > 3 * BOUND["ddp"]
    )
    checks.append(
        (
            ok,
            f"ddp-dummy-batch: last of {world_size} ranks on dummy batches: update vs reference "
            f"{worst:.2e} (bound {BOUND['ddp']:.0e}), vs dummy batches trained on {control:.2e}; "
            f"loss {sorted(losses)} on every rank, sharpness spread {spread:.1e}, "
            f"vs reference {error:.1e} (bound 1e-4)",
        )
    )
    return checks


def run(device: str):
    data_bin = make_data_bin(tempfile.mkdtemp())
    checks = [
        update_check("fp32", data_bin, device),
        update_check("fp16-flat", data_bin, device, ["--fp16", "--fp16-init-scale", "128"]),
        update_check("bf16", data_bin, device, bf16=True),
        update_check(
            "amp",
            data_bin,
            device,
            ["--amp"],
            autocast=torch.float16 if device == "cuda" else None,
            bound_key=f"amp-{device}",
        ),
    ]
    checks += ddp_checks(data_bin, device)
    return checks


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_check: error: no CUDA device (use --device cpu to run the checks on the CPU)",
            file=sys.stderr,
        )
        return 1
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}", flush=True)
    checks = run(args.device)
    for ok, line in checks:
        print(f"[{'ok' if ok else 'FAIL'}] {line}", flush=True)
    print(f"{sum(ok for ok, _ in checks)}/{len(checks)} checks passed", flush=True)
    return 0 if all(ok for ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
