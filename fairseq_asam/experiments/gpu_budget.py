"""Table 4's GPU hours on paper: per run, per grid, on one A100/H100 and on an 8-GPU node.

An estimate, not a measurement (no GPU here): every number below is an assumption or a figure
from a named source, and `python -m fairseq_asam.experiments.gpu_budget` prints the README's
table from them.  The cost ratios of the optimizers are the benchmark's (README, "Cost"),
measured on a CPU; on a GPU the same two forward-backward passes per update should cost about
the same ratio, which nobody has measured here yet.

How one run's hours are computed, on GPU g:

    training   = updates x target tokens per update / (V100 fp16 tokens/s x speed-up of g)
                 x the row's cost ratio per update (Adam 1.00, ASAM 1.91, ...)
    validation = epochs x seconds per validation on a V100 / speed-up of g  (same for every row)
    evaluation = minutes of fairseq-generate on valid + test on a V100 / speed-up of g

A grid on one GPU takes the sum of its runs; on an 8-GPU node the runs go one per GPU (as
`fairseq-asam-table4` and a Slurm job array place them), longest first, and the node takes as
long as its busiest GPU.
"""

import heapq
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

# Every source, by key (cited in the README next to the numbers).
SOURCES = {
    "myleott": (
        "fairseq maintainer myleott, github.com/facebookresearch/fairseq/issues/940 (2019-07-31): "
        "at least 160k wps on 4 x V100 with --fp16 (about 73k without) for "
        "transformer_wmt_en_de (61M parameters)"
    ),
    "lambda": (
        "Lambda, 'NVIDIA A100 GPU Benchmarks for Deep Learning' (lambdalabs.com blog): A100 "
        "about 1.95x to 2.5x a V100 for language-model training with FP16 tensor cores"
    ),
    "ozmarx": (
        "ozmarx.com, 'H100 vs A100 training': 1.2-1.8x H100 over A100 for models under 3B "
        "parameters (data loading and small kernels dilute the 3.2x of the spec sheets)"
    ),
    "benchmark": "this project's fairseq-asam-benchmark (README, 'Cost'), measured on a CPU",
}


@dataclass(frozen=True)
class Assumptions:
    updates: int = 50_000  # configs/iwslt14_de_en/common.args: --max-update 50000
    # IWSLT'14 De->En: 160,239 training pairs, about 23 target BPE tokens each (assumed) = 3.7M
    # target tokens per epoch; at --max-tokens 4096 about 1,100 updates per epoch (assumed,
    # configs/README: ~45 epochs in 50k updates), i.e. ~3,300 target tokens per update.
    target_tokens_per_update: float = 3_300
    epochs: float = 45
    # myleott: 160k wps / 4 V100 with --fp16.  Taken unchanged for transformer_iwslt_de_en
    # (39.5M parameters, FFN 1024): its tokens are cheaper than transformer_wmt_en_de's, but a
    # 4,096-token batch on one GPU keeps it further from peak; we assume the two cancel.  We
    # also assume --amp (what the runner uses) as fast as fairseq's --fp16.
    v100_tokens_per_second: float = 160_000 / 4
    a100_over_v100: float = 2.2  # lambda: 1.95-2.5x, middle
    h100_over_a100: float = 1.5  # ozmarx: 1.2-1.8x for small models, middle
    # Per epoch: validation loss, and fairseq's in-training BLEU (beam 5 on 7,283 sentences)
    # of the default --checkpoint best-bleu; assumed, on a V100.
    validation_seconds_v100: float = 45
    # fairseq-generate (beam 5) on valid + test, 14,033 sentences, and loading; assumed.
    evaluation_minutes_v100: float = 2.0
    gpus_per_node: int = 8


# Cost of one update relative to Adam's (benchmark): IWSLT model, except LookSAM (small model).
ROW_COST = {
    "adam": 1.00,
    "sam": 1.89,
    "asam": 1.91,
    "asam_interval5": 1.07,
    "asam_looksam5": 1.22,
    # Plain Adam for 40k updates, ASAM for the last 10k: (40k x 1.00 + 10k x 1.91) / 50k.
    "asam_late": (40_000 * 1.00 + 10_000 * 1.91) / 50_000,
}
ROW_NOTE = {
    "asam_looksam5": "ratio measured on the small model only",
    "asam_late": "Adam's cost to update 40k, ASAM's after",
}
GPUS = ("A100", "H100")


def speedup(gpu: str, a: Assumptions) -> float:
    return {"V100": 1.0, "A100": a.a100_over_v100, "H100": a.a100_over_v100 * a.h100_over_a100}[gpu]


def run_hours(row: str, gpu: str, a: Assumptions = Assumptions()) -> float:
    """Hours of one run (training, per-epoch validation, final evaluation) on one GPU."""
    factor = speedup(gpu, a)
    adam_seconds = a.updates * a.target_tokens_per_update / a.v100_tokens_per_second
    training = adam_seconds * ROW_COST[row] / factor
    validation = a.epochs * a.validation_seconds_v100 / factor
    evaluation = a.evaluation_minutes_v100 * 60 / factor
    return (training + validation + evaluation) / 3600


def node_hours(durations: Sequence[float], gpus: int) -> float:
    """Wall-clock hours of runs placed one per GPU, longest first, each on the least busy GPU."""
    loads = [0.0] * gpus
    for duration in sorted(durations, reverse=True):
        heapq.heappush(loads, heapq.heappop(loads) + duration)
    return max(loads)


def grids() -> List[Tuple[str, List[str]]]:
    """(what, the row of every run) of the grids the README budgets."""
    seeds = 3
    return [
        ("Table 4: Adam, SAM, ASAM x 3 seeds", ["adam", "sam", "asam"] * seeds),
        ("ρ sweep: ASAM x 4 ρ x 3 seeds", ["asam"] * 4 * seeds),
        ("ρ x η sweep: ASAM x 4 ρ x 2 η x 3 seeds", ["asam"] * 8 * seeds),
        (
            "cheaper schedules: the 3 schedule rows x 3 seeds",
            ["asam_interval5", "asam_looksam5", "asam_late"] * seeds,
        ),
    ]


def run_table(a: Assumptions = Assumptions()) -> List[str]:
    lines = [
        "| row | cost per update (benchmark) | hours per run, A100 | hours per run, H100 |",
        "|---|---|---|---|",
    ]
    for row, cost in ROW_COST.items():
        note = f" ({ROW_NOTE[row]})" if row in ROW_NOTE else ""
        cells = [row, f"{cost:.2f}×{note}"] + [f"{run_hours(row, g, a):.2f}" for g in GPUS]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def grid_table(a: Assumptions = Assumptions()) -> List[str]:
    lines = [
        "| grid | runs | GPU-hours, A100 | GPU-hours, H100 | 8×A100 node, hours | "
        "8×H100 node, hours |",
        "|---|---|---|---|---|---|",
    ]
    for what, rows in grids():
        cells = [what, str(len(rows))]
        for gpu in GPUS:
            cells.append(f"{sum(run_hours(r, gpu, a) for r in rows):.1f}")
        for gpu in GPUS:
            durations = [run_hours(r, gpu, a) for r in rows]
            cells.append(f"{node_hours(durations, a.gpus_per_node):.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def savings(a: Assumptions = Assumptions()) -> Dict[str, float]:
    """Hours a schedule row saves against ASAM, per run on an A100, as a fraction."""
    asam = run_hours("asam", "A100", a)
    return {
        row: 1 - run_hours(row, "A100", a) / asam
        for row in ("asam_interval5", "asam_looksam5", "asam_late")
    }


def markdown(a: Assumptions = Assumptions()) -> str:
    return "\n".join(run_table(a) + [""] + grid_table(a)) + "\n"


def main() -> int:
    print(markdown(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
