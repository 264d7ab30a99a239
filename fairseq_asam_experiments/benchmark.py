"""The measured cost of sharpness-aware training: Adam, SAM and ASAM updates side by side.

Every row builds fairseq's own Trainer from the recipe's argument files (configs/) plus the
row's optimizer options, and times `Trainer.train_step` (fp16 wrappers, gradient clipping and
accumulation included) on the same synthetic batches.  The rows' updates are interleaved
(update i of every row, then update i + 1, each round starting one row later) so that other
load on the machine hits them alike.

Per update the benchmark also times the forward passes (the criterion's forward), the backward
passes (`optimizer.backward`) and the optimizer step (`optimizer.step`), and the perturbation
(`perturbation.perturb` + `restore`) directly:

    outside    = update − forward − backward − optimizer step   (all passes, all micro-batches)
    overhead   = outside(row) − outside(Adam)                     the perturbation overhead

Ratios to Adam and overheads are taken per round (a row's update i against Adam's update i,
run seconds apart) and then their median, so that load changing between rounds cancels.

`outside` holds fairseq's own bookkeeping (sample preparation, gradient norm and clipping,
logging) for every row, plus, for SAM/ASAM, the perturbation, its restore and the two-pass
step's gradient juggling; subtracting Adam's leaves what sharpness-aware training adds.

Peak memory is measured per row in a fresh process: the peak resident set (CPU) or
`torch.cuda.max_memory_allocated` (GPU) during the updates, minus the memory in use before
the first one.  On CPU that process has glibc return every freed block of 64 KiB or more to
the system at once, so that its resident set follows the tensors alive (by default freed
memory stays resident and a reuse pattern shows up as extra peak).  What SAM/ASAM may add
is known analytically: one copy of the parameters (the saved w) and, with --update-freq > 1,
the accumulated gradient set aside during pass 1.

With `--sam-interval K` only every K-th update is sharpness-aware, so the row's cost is
amortized: (median sharpness-aware update + (K − 1) × median plain update) / K, and the same
for each timed part.
"""

import ctypes
import functools
import logging
import math
import os
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from fairseq_asam import USER_DIR, perturbation, two_pass
from fairseq_asam.optim import find_sharpness_aware

from . import loading, recipe
from .errors import SettingError

logger = logging.getLogger(__name__)

# fairseq's IWSLT'14 de-en dictionaries (examples/translation/prepare-iwslt14.sh, 10k joint BPE
# codes): 8,848 German and 6,632 English types, fairseq's 4 special symbols included.
IWSLT14_DICTIONARY_SIZES = (8848, 6632)
SMALL_DICTIONARY_SIZES = (512, 512)
# Synthetic sentences: lengths in tokens (with </s>) from a log-normal of mean ≈ 25, about the
# ≈ 144 sentences per 4,096-token batch of IWSLT'14 (160k pairs, ≈ 1,100 updates an epoch);
# the target is the source's length times a ratio drawn uniformly from the range.
MEDIAN_SENTENCE_TOKENS = 22
SENTENCE_LENGTH_SIGMA = 0.5
MIN_SENTENCE_TOKENS, MAX_SENTENCE_TOKENS = 2, 128
TARGET_LENGTH_RATIO_RANGE = (0.8, 1.2)
# Sentences generated per batch needed, over the average that fills one (the rest is slack).
SENTENCE_SLACK = 1.5

BYTES_PER_MIB = 2**20
# glibc mallopt: allocations from this size on get their own mapping, unmapped when freed.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES = 64 * 1024
FP32_BYTES = 4
PRECISIONS = ("fp32", "fp16", "bf16")
DEVICES = ("cpu", "cuda")

# Targets on transformer_iwslt_de_en (the acceptance numbers).
MAX_ASAM_TO_ADAM_RATIO = 2.05
MAX_OVERHEAD_FRACTION = 0.02
MAX_INTERVAL_TO_ADAM_RATIO = 1.3
# The measured extra memory may pass the analytic budget by this share: page rounding of the
# ~250 separately allocated buffers of the saved copy, and small temporaries.
MEMORY_TOLERANCE = 0.02

# Timed parts of an update: record_function names fairseq emits, plus the perturbation's.
FORWARD, BACKWARD, OPTIMIZER = "forward", "backward", "optimizer"
PERTURB, RESTORE = "perturb", "restore"
TWO_PASS_STEP = "two-pass-step"


@dataclass(frozen=True)
class BenchmarkPreset:
    args_files: Tuple[str, ...]  # fairseq-train argument files in configs/, applied in order
    dictionary_sizes: Tuple[int, int]  # (source, target), special symbols included
    warmup: int
    timed: int
    description: str


LOOKSAM_ALPHA = 0.7  # the reuse weight α of the LookSAM row

BENCHMARK_PRESETS = {
    "iwslt": BenchmarkPreset(
        (recipe.RECIPE_ARGS,),
        IWSLT14_DICTIONARY_SIZES,
        warmup=3,
        timed=5,
        description="transformer_iwslt_de_en, fairseq's IWSLT'14 recipe, 4,096 tokens per batch",
    ),
    "small": BenchmarkPreset(
        (recipe.RECIPE_ARGS, recipe.TINY_OVERRIDES_ARGS),
        SMALL_DICTIONARY_SIZES,
        warmup=3,
        timed=10,
        description="the tiny preset's 1-layer, 32-dimensional Transformer, 1,024 tokens per batch",
    ),
}


@dataclass(frozen=True)
class BenchmarkSpec:
    preset: str = "small"
    device: str = "cpu"
    precision: str = "fp32"
    update_freq: int = 1
    warmup: Optional[int] = None  # None: the preset's
    timed: Optional[int] = None  # None: the preset's
    sam_interval: int = 5  # of the `--sam-interval` row
    seed: int = 1

    @property
    def warmup_updates(self) -> int:
        return BENCHMARK_PRESETS[self.preset].warmup if self.warmup is None else self.warmup

    @property
    def timed_updates(self) -> int:
        return BENCHMARK_PRESETS[self.preset].timed if self.timed is None else self.timed

    @property
    def total_updates(self) -> int:
        return self.warmup_updates + self.timed_updates


@dataclass(frozen=True)
class Row:
    name: str
    optimizer_args: str  # configs/iwslt14_de_en/<file>.args
    options: Tuple[Tuple[str, str], ...] = ()  # (flag, value) over the optimizer's file


def rows_for(spec: BenchmarkSpec) -> List[Row]:
    """Adam, SAM, ASAM, ASAM on every K-th update, ASAM that never starts (plain Adam), ASAM
    that also measures the noise-free `sharpness_eval` on every update (its cost per measured
    update; every N-th update costs 1/N of it), and LookSAM's reuse on every K-th update."""
    return [
        Row("adam", "adam"),
        Row("sam", "sam"),
        Row("asam", "asam"),
        Row(
            f"asam-interval-{spec.sam_interval}",
            "asam",
            (("--sam-interval", str(spec.sam_interval)),),
        ),
        Row("asam-not-started", "asam", (("--sam-start-update", str(spec.total_updates)),)),
        Row("asam-eval-sharpness-1", "asam", (("--sharpness-eval-interval", "1"),)),
    ] + (
        [
            Row(
                f"asam-looksam-{spec.sam_interval}",
                "asam",
                (
                    ("--sam-interval", str(spec.sam_interval)),
                    ("--looksam-alpha", str(LOOKSAM_ALPHA)),
                ),
            )
        ]
        if spec.sam_interval >= 2
        else []
    )


def check_spec(spec: BenchmarkSpec) -> None:
    if spec.preset not in BENCHMARK_PRESETS:
        raise SettingError(
            f"--preset must be one of {sorted(BENCHMARK_PRESETS)}, got {spec.preset!r}"
        )
    if spec.device not in DEVICES:
        raise SettingError(f"--device must be one of {DEVICES}, got {spec.device!r}")
    if spec.precision not in PRECISIONS:
        raise SettingError(f"precision must be one of {PRECISIONS}, got {spec.precision!r}")
    if spec.precision != "fp32" and spec.device != "cuda":
        raise SettingError(f"--{spec.precision} needs --device cuda")
    if spec.device == "cuda" and not torch.cuda.is_available():
        raise SettingError("--device cuda: no GPU is visible")
    if spec.update_freq < 1 or spec.warmup_updates < 0 or spec.sam_interval < 1:
        raise SettingError("--update-freq and --sam-interval must be >= 1, --warmup >= 0")
    if spec.timed_updates < spec.sam_interval:
        raise SettingError(
            f"--timed ({spec.timed_updates}) must be >= --sam-interval ({spec.sam_interval}): "
            "the interval row needs a sharpness-aware and a plain update among the timed ones"
        )


# --------------------------------------------------------------------------------------------
# Trainer and batches
# --------------------------------------------------------------------------------------------


def training_argv(spec: BenchmarkSpec, row: Row) -> List[str]:
    options = recipe.training_options(BENCHMARK_PRESETS[spec.preset].args_files, row.optimizer_args)
    own = [
        ("--seed", str(spec.seed)),
        ("--num-workers", "0"),
        ("--update-freq", str(spec.update_freq)),
        ("--user-dir", USER_DIR),
    ]
    if spec.device == "cpu":
        own.append(("--cpu", None))
    if spec.precision == "fp16":
        own.append(("--fp16", None))
    # The data folder is never read: the dictionaries and batches are generated.
    return ["<synthetic>"] + recipe.merge_options(options, own, row.options)


def synthetic_dictionary(size: int):
    from fairseq.data import Dictionary

    dictionary = Dictionary()
    while len(dictionary) < size:
        dictionary.add_symbol(f"w{len(dictionary)}")
    return dictionary


def build_trainer(spec: BenchmarkSpec, row: Row):
    """fairseq's Trainer for `row`; its model is initialized from `spec.seed` as every row's."""
    from fairseq.tasks.translation import TranslationTask
    from fairseq.trainer import Trainer

    source_size, target_size = BENCHMARK_PRESETS[spec.preset].dictionary_sizes
    built = loading.build_from_args(
        training_argv(spec, row),
        lambda cfg: TranslationTask(
            cfg.task, synthetic_dictionary(source_size), synthetic_dictionary(target_size)
        ),
    )
    # fairseq-train's --bf16 also means TPU; bf16 alone is common.bf16 (as fairseq-hydra-train).
    built.cfg.common.bf16 = spec.precision == "bf16"
    return Trainer(built.cfg, built.task, built.model, built.criterion)


def sentence_lengths(rng: np.random.Generator, count: int) -> Tuple[np.ndarray, np.ndarray]:
    source = rng.lognormal(math.log(MEDIAN_SENTENCE_TOKENS), SENTENCE_LENGTH_SIGMA, count)
    target = source * rng.uniform(*TARGET_LENGTH_RATIO_RANGE, count)
    clip = functools.partial(np.clip, a_min=MIN_SENTENCE_TOKENS, a_max=MAX_SENTENCE_TOKENS)
    return clip(np.rint(source)).astype(np.int64), clip(np.rint(target)).astype(np.int64)


def synthetic_updates(trainer, spec: BenchmarkSpec) -> List[List[dict]]:
    """`total_updates` lists of `update_freq` batches of random sentences, cut by fairseq's own
    batch iterator at the recipe's --max-tokens (the same batches for every row)."""
    from fairseq.data import LanguagePairDataset

    task, cfg = trainer.task, trainer.cfg
    batches_needed = spec.total_updates * spec.update_freq
    mean_length = MEDIAN_SENTENCE_TOKENS * math.exp(SENTENCE_LENGTH_SIGMA**2 / 2)
    count = math.ceil(batches_needed * cfg.dataset.max_tokens / mean_length * SENTENCE_SLACK)
    rng = np.random.default_rng(spec.seed)
    source_sizes, target_sizes = sentence_lengths(rng, count)

    def sentences(sizes, dictionary):
        first, end = dictionary.nspecial, len(dictionary)
        return [
            torch.from_numpy(np.append(rng.integers(first, end, n - 1), dictionary.eos()))
            for n in sizes
        ]

    dataset = LanguagePairDataset(
        sentences(source_sizes, task.src_dict),
        source_sizes,
        task.src_dict,
        sentences(target_sizes, task.tgt_dict),
        target_sizes,
        task.tgt_dict,
        left_pad_source=cfg.task.left_pad_source,
        left_pad_target=cfg.task.left_pad_target,
    )
    batches = loading.first_batches(
        task,
        dataset,
        batches_needed,
        shuffle=True,
        max_tokens=cfg.dataset.max_tokens,
        max_sentences=cfg.dataset.batch_size,
        seed=spec.seed,
    )
    if len(batches) < batches_needed:
        raise RuntimeError(
            f"generated {len(batches)} batches, {batches_needed} needed: raise SENTENCE_SLACK"
        )
    return [batches[i : i + spec.update_freq] for i in range(0, batches_needed, spec.update_freq)]


def parameter_bytes(trainer) -> Dict[str, int]:
    """What SAM/ASAM may keep beyond Adam: one fp32 copy of the parameters, and the gradient
    set aside during pass 1 when gradients accumulate over micro-batches."""
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    return {
        "parameters": sum(p.numel() for p in params),
        "fp32_copy": sum(p.numel() for p in params) * FP32_BYTES,
        "gradient_stash": sum(p.numel() * p.element_size() for p in params),
    }


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


class PartTimer:
    """Seconds spent in each timed part of the update running now (reset between updates)."""

    def __init__(self, device: str):
        self.synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        self.seconds: Dict[str, float] = {}

    def reset(self) -> None:
        self.seconds = {part: 0.0 for part in (FORWARD, BACKWARD, OPTIMIZER, PERTURB, RESTORE)}

    def timed(self, part: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            self.synchronize()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.synchronize()
                self.seconds[part] += time.perf_counter() - start

        return wrapper

    def attach(self, trainer) -> None:
        """Times the trainer's criterion forward, optimizer.backward and optimizer.step."""
        criterion, optimizer = trainer.criterion, trainer.optimizer
        criterion.forward = self.timed(FORWARD, criterion.forward)
        optimizer.backward = self.timed(BACKWARD, optimizer.backward)
        optimizer.step = self.timed(OPTIMIZER, optimizer.step)


@contextmanager
def patched(module, wrappers: Dict[str, Callable[[Callable], Callable]]) -> Iterator[None]:
    """Replaces module.<name> by wrappers[name](module.<name>) for the duration."""
    originals = {name: getattr(module, name) for name in wrappers}
    try:
        for name, wrap in wrappers.items():
            setattr(module, name, wrap(originals[name]))
        yield
    finally:
        for name, fn in originals.items():
            setattr(module, name, fn)


@dataclass
class UpdateRecord:
    seconds: float
    parts: Dict[str, float]
    ntokens: int
    perturbed: bool


def run_update(trainer, samples: List[dict], synchronize: Callable[[], None]) -> Tuple[float, bool]:
    """One Trainer.train_step; its wall time and whether it took the sharpness-aware gradient."""
    sam = find_sharpness_aware(trainer.optimizer)
    perturbed = sam is not None and sam.perturbs_at(trainer.get_num_updates())
    synchronize()
    start = time.perf_counter()
    trainer.train_step(samples)
    synchronize()
    return time.perf_counter() - start, perturbed


@dataclass
class TimedRows:
    records: Dict[str, List[UpdateRecord]]  # the timed updates of each row
    fractions: Dict[str, float]  # each row's long-run share of sharpness-aware updates
    sizes: Dict[str, int]  # parameter_bytes


def sharpness_aware_fraction(spec: BenchmarkSpec, trainer) -> float:
    """Share of updates that are sharpness-aware in the long run of this row's optimizer."""
    sam = find_sharpness_aware(trainer.optimizer)
    if sam is None or sam.sam_start_update >= spec.total_updates:
        return 0.0
    return 1.0 / sam.sam_interval


def time_rows(spec: BenchmarkSpec, rows: Sequence[Row]) -> TimedRows:
    """Interleaved updates of every row on one set of batches; the timed updates' records."""
    timer = PartTimer(spec.device)
    trainers = {row.name: build_trainer(spec, row) for row in rows}
    for trainer in trainers.values():
        timer.attach(trainer)
    first = next(iter(trainers.values()))
    updates = synthetic_updates(first, spec)
    names = [row.name for row in rows]
    records: Dict[str, List[UpdateRecord]] = {name: [] for name in names}
    with patched(
        perturbation,
        {
            PERTURB: functools.partial(timer.timed, PERTURB),
            RESTORE: functools.partial(timer.timed, RESTORE),
        },
    ):
        for index, samples in enumerate(updates):
            # Each round starts one row later, so that no row always runs first.
            start = index % len(names)
            for name in names[start:] + names[:start]:
                trainer = trainers[name]
                timer.reset()
                seconds, perturbed = run_update(trainer, samples, timer.synchronize)
                logger.info("update %d of %d, %s: %.1f s", index + 1, len(updates), name, seconds)
                if index >= spec.warmup_updates:
                    ntokens = sum(int(sample["ntokens"]) for sample in samples)
                    records[name].append(
                        UpdateRecord(seconds, dict(timer.seconds), ntokens, perturbed)
                    )
    fractions = {
        name: sharpness_aware_fraction(spec, trainer) for name, trainer in trainers.items()
    }
    return TimedRows(records, fractions, parameter_bytes(first))


def amortized(values: Sequence[float], perturbed: Sequence[bool], fraction: float) -> float:
    """fraction × median over sharpness-aware updates + (1 − fraction) × median over plain ones."""
    total = 0.0
    for is_perturbed, weight in ((True, fraction), (False, 1.0 - fraction)):
        group = [v for v, p in zip(values, perturbed) if p == is_perturbed]
        if weight > 0:
            if not group:
                raise SettingError("no timed update of a kind the row needs: raise --timed")
            total += weight * statistics.median(group)
    return total


def summarize_row(
    records: Sequence[UpdateRecord], adam: Sequence[UpdateRecord], fraction: float
) -> Dict[str, float]:
    """Amortized milliseconds per update of the update and each part, tokens per second, and
    the comparisons with Adam.

    `records[i]` and `adam[i]` ran seconds apart (one round), so the ratio and the overhead
    are taken round by round before the median: load that changes between rounds cancels.
    """
    perturbed = [r.perturbed for r in records]

    def ms(values):
        return 1e3 * amortized(values, perturbed, fraction)

    def outside(r: UpdateRecord) -> float:
        return r.seconds - r.parts[FORWARD] - r.parts[BACKWARD] - r.parts[OPTIMIZER]

    update = ms([r.seconds for r in records])
    overhead = ms([outside(r) - outside(a) for r, a in zip(records, adam)])
    return {
        "update_ms": update,
        "ratio_to_adam": amortized(
            [r.seconds / a.seconds for r, a in zip(records, adam)], perturbed, fraction
        ),
        "forward_ms": ms([r.parts[FORWARD] for r in records]),
        "backward_ms": ms([r.parts[BACKWARD] for r in records]),
        "optimizer_ms": ms([r.parts[OPTIMIZER] for r in records]),
        "outside_ms": ms([outside(r) for r in records]),
        "overhead_ms": overhead,
        "overhead_fraction": overhead / update,
        "perturb_restore_ms": ms([r.parts[PERTURB] + r.parts[RESTORE] for r in records]),
        "tokens_per_s": statistics.mean(r.ntokens for r in records) / (update / 1e3),
        "sharpness_aware_fraction": fraction,
        "updates": [asdict(r) for r in records],
    }


# --------------------------------------------------------------------------------------------
# Peak memory, one fresh process per row
# --------------------------------------------------------------------------------------------


def resident_kib(field_name: str) -> int:
    """VmRSS / VmHWM of this process, in KiB (Linux)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def release_freed_memory_at_once() -> bool:
    """Makes glibc unmap freed blocks >= MMAP_THRESHOLD_BYTES and trim the heap at every free;
    False where the C library is not glibc."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, 0)
    )


def reset_peak_rss() -> None:
    """Makes VmHWM start again from the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")


def memory_updates(spec: BenchmarkSpec) -> int:
    """Updates 0 to K (K = the interval row's --sam-interval): Adam's state exists from update
    0's step on, and every row that perturbs does so again after it (at update 1 or K)."""
    return min(spec.total_updates, spec.sam_interval + 1)


def measure_peak_memory(spec: BenchmarkSpec, row: Row) -> Dict[str, float]:
    """In this (fresh) process: peak memory during the row's updates over the memory before them.

    Every row runs the same first `memory_updates` updates (same batches, same activations).
    """
    tight_rss = spec.device == "cpu" and release_freed_memory_at_once()
    trainer = build_trainer(spec, row)
    updates = synthetic_updates(trainer, spec)[: memory_updates(spec)]
    if spec.device == "cuda":
        trainer.cuda_env = None  # fairseq would reset the peak statistics after every update
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        before = resident_kib("VmRSS") * 1024
        reset_peak_rss()
    for samples in updates:
        trainer.train_step(samples)
    if spec.device == "cuda":
        peak = torch.cuda.max_memory_allocated()
        kind = "torch.cuda.max_memory_allocated"
    else:
        peak = resident_kib("VmHWM") * 1024
        kind = "peak RSS (VmHWM)" + (", freed blocks unmapped at once" if tight_rss else "")
    return {"peak_increase_bytes": peak - before, "memory_measure": kind}


def measure_rows_memory(spec: BenchmarkSpec, rows: Sequence[Row]) -> Dict[str, Dict[str, float]]:
    """Each row in its own new process, one after the other.

    CPU: forked from a server that has only imported this module (fresh and quick);
    CUDA: spawned, since a CUDA context does not survive a fork.
    """
    if spec.device == "cuda":
        context = get_context("spawn")
    else:
        context = get_context("forkserver")
        context.set_forkserver_preload([__name__])
    out = {}
    for row in rows:
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            out[row.name] = pool.submit(measure_peak_memory, spec, row).result()
    return out


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine_info(spec: BenchmarkSpec) -> Dict[str, object]:
    info = {
        "platform": platform.platform(),
        "processor": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    if spec.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def check_targets(
    rows: Dict[str, Dict[str, float]], spec: BenchmarkSpec, sizes: Dict[str, int]
) -> List[Dict[str, object]]:
    """The issue's targets (set for transformer_iwslt_de_en) against the measured rows."""
    asam, interval = rows["asam"], rows[f"asam-interval-{spec.sam_interval}"]
    targets = [
        ("ASAM / Adam update time", asam["ratio_to_adam"], MAX_ASAM_TO_ADAM_RATIO, "×"),
        (
            "perturbation overhead / ASAM update",
            asam["overhead_fraction"],
            MAX_OVERHEAD_FRACTION,
            "",
        ),
        (
            f"--sam-interval {spec.sam_interval} / Adam update time",
            interval["ratio_to_adam"],
            MAX_INTERVAL_TO_ADAM_RATIO,
            "×",
        ),
    ]
    if "extra_memory_bytes" in asam:
        budget = sizes["fp32_copy"] + (sizes["gradient_stash"] if spec.update_freq > 1 else 0)
        stash = " + the gradient stash" if spec.update_freq > 1 else ""
        for name in ("sam", "asam"):
            targets.append(
                (
                    f"{name.upper()} extra peak memory over Adam / (one fp32 copy{stash})",
                    rows[name]["extra_memory_bytes"] / budget,
                    1.0 + MEMORY_TOLERANCE,
                    "×",
                )
            )
    return [
        {"target": name, "measured": value, "limit": limit, "unit": unit, "met": value <= limit}
        for name, value, limit, unit in targets
    ]


def run_benchmark(spec: BenchmarkSpec, measure_memory: bool = True) -> Dict[str, object]:
    """Times every row (interleaved, one process), then measures each row's peak memory."""
    check_spec(spec)
    rows = rows_for(spec)
    load_before = os.getloadavg()
    timed = time_rows(spec, rows)
    load_after = os.getloadavg()
    sizes = timed.sizes
    summary = {
        name: summarize_row(records, timed.records["adam"], timed.fractions[name])
        for name, records in timed.records.items()
    }
    if measure_memory:
        memory = measure_rows_memory(spec, rows)
        for name, row in summary.items():
            row.update(memory[name])
            row["extra_memory_bytes"] = (
                memory[name]["peak_increase_bytes"] - memory["adam"]["peak_increase_bytes"]
            )
    return {
        "spec": {
            **asdict(spec),
            "warmup_updates": spec.warmup_updates,
            "timed_updates": spec.timed_updates,
            "memory_updates": memory_updates(spec) if measure_memory else 0,
        },
        "preset": BENCHMARK_PRESETS[spec.preset].description,
        "machine": machine_info(spec),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "parameter_bytes": sizes,
        "rows": [
            {
                "name": row.name,
                "optimizer": row.optimizer_args,
                "options": [" ".join(o) for o in row.options],
                **summary[row.name],
            }
            for row in rows
        ],
        "targets": check_targets(summary, spec, sizes),
    }


def format_benchmark(result: Dict[str, object]) -> str:
    spec, sizes = result["spec"], result["parameter_bytes"]
    header = [
        "row",
        "update ms",
        "×Adam",
        "fwd ms",
        "bwd ms",
        "opt ms",
        "outside ms",
        "overhead ms",
        "overhead %",
        "perturb+restore ms",
        "tokens/s",
        "peak Δ MiB",
        "extra MiB",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in result["rows"]:
        memory = [
            f"{row[k] / BYTES_PER_MIB:.0f}" if k in row else "-"
            for k in ("peak_increase_bytes", "extra_memory_bytes")
        ]
        cells = [
            row["name"],
            f"{row['update_ms']:.1f}",
            f"{row['ratio_to_adam']:.3f}",
            f"{row['forward_ms']:.1f}",
            f"{row['backward_ms']:.1f}",
            f"{row['optimizer_ms']:.1f}",
            f"{row['outside_ms']:.1f}",
            f"{row['overhead_ms']:.1f}",
            f"{100 * row['overhead_fraction']:.2f}",
            f"{row['perturb_restore_ms']:.1f}",
            f"{row['tokens_per_s']:.0f}",
        ] + memory
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"{result['preset']}; {spec['device']} {spec['precision']}, "
        f"--update-freq {spec['update_freq']}, {spec['warmup_updates']} warm-up + "
        f"{spec['timed_updates']} timed updates per row, interleaved; {sizes['parameters']:,} "
        f"parameters (one fp32 copy = {sizes['fp32_copy'] / BYTES_PER_MIB:.0f} MiB)."
    )
    if spec["memory_updates"]:
        lines.append(
            f"peak memory: {result['rows'][0]['memory_measure']}, "
            f"over the first {spec['memory_updates']} "
            "updates, in a fresh process per row."
        )
    lines.append(
        "load average (1, 5, 15 min) before "
        f"{tuple(round(x, 2) for x in result['load_average_before'])}, "
        f"after {tuple(round(x, 2) for x in result['load_average_after'])}; "
        f"{result['machine']['cpu_count']} CPUs ({result['machine']['processor']}), "
        f"{result['machine']['torch_threads']} torch threads."
    )
    lines.append("")
    for target in result["targets"]:
        mark = "met" if target["met"] else "NOT met"
        lines.append(
            f"- {target['target']}: {target['measured']:.4g}{target['unit']} "
            f"(target <= {target['limit']:.4g}{target['unit']}): {mark}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Profile of one sharpness-aware update
# --------------------------------------------------------------------------------------------

PROFILED_RANGES = (
    FORWARD,
    BACKWARD,
    PERTURB,
    RESTORE,
    "reduce-grads",
    "multiply-grads",
    "clip-grads",
    OPTIMIZER,
)


def profile_update(spec: BenchmarkSpec, row_name: str = "asam") -> Dict[str, object]:
    """torch.profiler over one update of `row_name` after the warm-up.

    Returns milliseconds per range (fairseq's record_function ranges, plus `perturb`,
    `restore` and the whole `two-pass-step`), the two-pass step's own time outside its
    passes and perturbation, and the operators inside perturb and restore.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    check_spec(spec)
    row = next(r for r in rows_for(spec) if r.name == row_name)
    trainer = build_trainer(spec, row)
    updates = synthetic_updates(trainer, spec)
    synchronize = PartTimer(spec.device).synchronize
    for samples in updates[: spec.warmup_updates]:
        trainer.train_step(samples)

    def ranged(name):
        def wrap(fn):
            @functools.wraps(fn)
            def wrapper(*args, **kwargs):
                with record_function(name):
                    return fn(*args, **kwargs)

            return wrapper

        return wrap

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if spec.device == "cuda" else [])
    with patched(perturbation, {PERTURB: ranged(PERTURB), RESTORE: ranged(RESTORE)}), patched(
        two_pass, {"sharpness_aware_train_step": ranged(TWO_PASS_STEP)}
    ), profile(activities=activities) as prof:
        seconds, _ = run_update(trainer, updates[spec.warmup_updates], synchronize)
    events = prof.events()
    ranges: Dict[str, float] = {}
    operators: Dict[str, Dict[str, float]] = {PERTURB: {}, RESTORE: {}}
    step_ranges = 0.0  # time of the ranges directly inside the two-pass step
    for event in events:
        if event.name in PROFILED_RANGES + (TWO_PASS_STEP,):
            ranges[event.name] = ranges.get(event.name, 0.0) + event.cpu_time_total / 1e3
        if event.name in operators:
            for child in event.cpu_children:
                ops = operators[event.name]
                ops[child.name] = ops.get(child.name, 0.0) + child.cpu_time_total / 1e3
        parent = event.cpu_parent
        if parent is not None and parent.name == TWO_PASS_STEP and event.name in PROFILED_RANGES:
            step_ranges += event.cpu_time_total / 1e3
    return {
        "row": row_name,
        "update_ms": 1e3 * seconds,
        "ranges_ms": ranges,
        "two_pass_bookkeeping_ms": ranges.get(TWO_PASS_STEP, 0.0) - step_ranges,
        "operators_ms": {
            name: dict(sorted(ops.items(), key=lambda kv: -kv[1]))
            for name, ops in operators.items()
        },
    }


def format_profile(profile_result: Dict[str, object]) -> str:
    lines = [
        f"profile of one {profile_result['row']} update "
        f"({profile_result['update_ms']:.1f} ms under the profiler):"
    ]
    for name, ms in profile_result["ranges_ms"].items():
        lines.append(f"  {name:<16} {ms:10.2f} ms")
    lines.append(
        "  two-pass step outside passes/perturb/restore: "
        f"{profile_result['two_pass_bookkeeping_ms']:.2f} ms"
    )
    for part, ops in profile_result["operators_ms"].items():
        lines.append(f"  inside {part}:")
        lines.extend(f"    {op:<32} {ms:8.2f} ms" for op, ms in ops.items())
    return "\n".join(lines)
