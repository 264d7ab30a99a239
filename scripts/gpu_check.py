"""What only a GPU can show: fairseq's flat --fp16 path, bf16, and fairseq's own DDP wrapper over
NCCL, each against the reference update written from the equations (tests/harness.py).

Run through scripts/gpu_check.sh on one CUDA GPU; it prints each check and its numbers and exits
non-zero if one fails.  Takes about a minute after fairseq's import.
"""
import copy
import os
import sys
import tempfile

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from harness import (  # noqa: E402
    StepRecorder,
    batches,
    build_trainer,
    make_data_bin,
    reference_update_gradient,
    relative_error,
)

RHO, ETA, UPDATE_FREQ = 0.5, 0.01, 2
# fp16/bf16 pass-2 gradients round differently from the fp32 reference; plain Adam's gradient
# is ~0.4 away at this ρ, so these bounds still tell the two apart.
TOLERANCE = {"fp32": 1e-5, "fp16-flat": 1e-2, "bf16": 6e-2, "fp32-ddp-nccl": 1e-5}


def check(name, data_bin, extra, bf16=False, wrap_model=None):
    flags = ["--optimizer", "asam", "--rho", str(RHO), "--eta", str(ETA), "--update-freq", str(UPDATE_FREQ)]
    flags += [f for f in extra if f != "--cpu"]
    trainer = build_trainer(data_bin, flags, bf16=bf16, wrap_model=wrap_model)
    samples = batches(trainer, UPDATE_FREQ)
    model0 = copy.deepcopy(trainer.get_model()).float()
    recorder = StepRecorder(trainer)
    trainer.train_step(samples)
    cuda_samples = [trainer._prepare_sample(s)[0] for s in samples]
    criterion = copy.deepcopy(trainer.criterion).float()
    expected = reference_update_gradient(model0, criterion, cuda_samples, RHO, ETA, True)
    plain = reference_update_gradient(model0, criterion, cuda_samples, 1e-30, ETA, True)
    grads = [g.float() for g in recorder.grads]
    error, control = relative_error(grads, expected), relative_error(grads, plain)
    ok = error < TOLERANCE[name] and control > 3 * TOLERANCE[name]
    print(f"[{'ok' if ok else 'FAIL'}] {name}: optimizer={type(trainer.optimizer).__name__} "
          f"relative error vs reference {error:.2e} (bound {TOLERANCE[name]:.0e}), "
          f"vs plain gradient {control:.2e}", flush=True)
    return ok


def main():
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device")
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    import harness

    harness.BASE_ARGS = [a for a in harness.BASE_ARGS if a != "--cpu"]
    data_bin = make_data_bin(tempfile.mkdtemp())
    results = [
        check("fp32", data_bin, []),
        check("fp16-flat", data_bin, ["--fp16", "--fp16-init-scale", "128"]),
        check("bf16", data_bin, [], bf16=True),
    ]
    # fairseq's own DistributedFairseqModel (device_ids, NCCL) with one rank: the wrapper,
    # no_sync and the all-reduce path run for real; several ranks need several GPUs.
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1)
    from fairseq.models import DistributedFairseqModel

    def wrap(model):
        cfg = harness.parse_cfg(data_bin, ["--ddp-backend", "pytorch_ddp", "--device-id", "0"])
        return DistributedFairseqModel(cfg.distributed_training, model.cuda(), dist.group.WORLD, "cuda")

    results.append(check("fp32-ddp-nccl", data_bin, ["--distributed-world-size", "1"], wrap_model=wrap))
    dist.destroy_process_group()
    print(f"{sum(results)}/{len(results)} GPU checks passed", flush=True)
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
