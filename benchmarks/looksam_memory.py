#!/usr/bin/env python
"""Transient memory of LookSAM's bookkeeping, beyond the buffers it keeps (g_v, and G while a
sharpness-aware update runs), on fp32 parameters of 25 M entries (one flat fp32 copy: 95 MiB).

    PYTHONPATH=. python benchmarks/looksam_memory.py [--parameters 25000000]

Measured as fairseq-asam-benchmark measures memory (fairseq_asam_experiments/benchmark.py): each
row in a fresh process, freed blocks returned to the system at once, peak resident set (VmHWM)
during the call minus the resident set just before it.  Rows:
  record      record_plain_gradient on a second micro-batch (G already holds the first);
  sa-step     the optimizer step of a sharpness-aware update (g_v and G exist: steady state);
  plain-step  the optimizer step of a plain update, which adds the reuse term.
"""

import argparse
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import torch
from omegaconf import OmegaConf

from fairseq_asam.optim import FairseqASAM, FairseqASAMConfig
from fairseq_asam_experiments.benchmark import (
    FP32_BYTES,
    MIB,
    release_freed_memory_at_once,
    reset_peak_rss,
    resident_kib,
)

ROWS = ("record", "sa-step", "plain-step")
TENSOR_SIZE = 500 * 500  # entries per parameter tensor (about a Transformer matrix's)


def measure(row: str, parameters: int) -> int:
    """Bytes the row's call adds to the peak resident set, in this (fresh) process."""
    assert release_freed_memory_at_once(), "needs glibc"
    torch.set_num_threads(1)
    params = [
        torch.nn.Parameter(torch.zeros(TENSOR_SIZE)) for _ in range(parameters // TENSOR_SIZE)
    ]
    for p in params:
        p.grad = torch.randn(TENSOR_SIZE)
    cfg = OmegaConf.structured(
        FairseqASAMConfig(lr=[1e-3], tpu=False, sam_interval=2, looksam_alpha=0.5)
    )
    sam = FairseqASAM(cfg, params)
    sam.record_plain_gradient(params)
    sam.sharpness_aware_update = True
    sam._looksam()  # the first sharpness-aware update: g_v exists from here on
    if row != "plain-step":
        sam.record_plain_gradient(params)  # G of the next sharpness-aware update
    sam.sharpness_aware_update = row == "sa-step"
    call = (lambda: sam.record_plain_gradient(params)) if row == "record" else sam._looksam
    before = resident_kib("VmRSS") * 1024
    reset_peak_rss()
    call()
    return resident_kib("VmHWM") * 1024 - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parameters", type=int, default=25_000_000)
    args = parser.parse_args()
    copy = args.parameters // TENSOR_SIZE * TENSOR_SIZE * FP32_BYTES
    print(
        f"{args.parameters // TENSOR_SIZE * TENSOR_SIZE} fp32 parameters; one flat copy: "
        f"{copy / MIB:.1f} MiB; peak over the memory before, fresh process per row"
    )
    for row in ROWS:
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
            extra = pool.submit(measure, row, args.parameters).result()
        print(f"{row:>10}: {extra / MIB:+6.1f} MiB = {extra / copy:+.2f} flat copies")


if __name__ == "__main__":
    main()
