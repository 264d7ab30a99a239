"""fairseq-asam-benchmark: the time and memory of an Adam, SAM and ASAM update (docs/cost.md).

Each row is fairseq's own Trainer on the same synthetic batches; the rows take turns, update by
update, so that load hits them alike, and their ratios to Adam are taken round by round, then the
median (amortized over both kinds of update for a row perturbing 1/K of them).  Peak memory: each
row in a fresh process, over the memory before its first update.
"""

import argparse
import collections
import ctypes
import logging
import math
import os
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Dict, List
from unittest import mock

import numpy as np
import torch
from fairseq.data import Dictionary, LanguagePairDataset
from fairseq.tasks.translation import TranslationTask
from fairseq.trainer import Trainer

from fairseq_asam import USER_DIR, perturbation
from fairseq_asam.optim import find_sharpness_aware

from . import loading, recipe
from .cli import run_command
from .errors import SettingError
from .files import write_json

PROGRAM = "fairseq-asam-benchmark"
Preset = collections.namedtuple("Preset", "args_files dictionary_sizes timed description")
IWSLT = "transformer_iwslt_de_en, fairseq's IWSLT'14 recipe, 4,096 tokens per batch"
SMALL = "the tiny preset's 1-layer, 32-dimensional Transformer, 1,024 tokens per batch"
PRESETS = {  # fairseq's IWSLT'14 dictionaries (10k joint BPE): 8,848 German, 6,632 English types
    "iwslt": Preset((recipe.RECIPE_ARGS,), (8848, 6632), 5, IWSLT),
    "small": Preset((recipe.RECIPE_ARGS, recipe.TINY_OVERRIDES_ARGS), (512, 512), 10, SMALL),
}
# Sentence lengths (</s> included): log-normal of median 22 (mean ≈ 25, IWSLT'14's ≈ 144
# sentences per 4,096 tokens) clipped to [2, 128], targets ×U(0.8, 1.2); 1.5× the sentences needed.
MEDIAN, SIGMA, CLIP, RATIO, SLACK = 22, 0.5, (2, 128), (0.8, 1.2), 1.5
PARTS = ("forward", "backward", "optimizer", "perturb", "restore")
MIB, FP32_BYTES, LOOKSAM_ALPHA = 2**20, 4, 0.7
Spec = argparse.Namespace  # the flags (`parse_spec`), and `total`: warm-up + timed updates


def rows_for(spec: Spec) -> Dict[str, tuple]:
    """name -> (optimizer argument file, extra options).  `asam-not-started` never perturbs;
    `asam-eval-sharpness-1` also measures sharpness_eval on every update."""
    k = str(spec.sam_interval)
    rows = {"adam": ("adam", []), "sam": ("sam", []), "asam": ("asam", [])}
    rows[f"asam-interval-{k}"] = ("asam", [("--sam-interval", k)])
    rows["asam-not-started"] = ("asam", [("--sam-start-update", str(spec.total))])
    rows["asam-eval-sharpness-1"] = ("asam", [("--sharpness-eval-interval", "1")])
    if spec.sam_interval >= 2:
        looksam = [("--sam-interval", k), ("--looksam-alpha", str(LOOKSAM_ALPHA))]
        rows[f"asam-looksam-{k}"] = ("asam", looksam)
    return rows


def check_spec(spec: Spec) -> None:
    if spec.precision != "fp32" and spec.device != "cuda":
        raise SettingError(f"--{spec.precision} needs --device cuda")
    if spec.device == "cuda" and not torch.cuda.is_available():
        raise SettingError("--device cuda: no GPU is visible")
    if min(spec.update_freq, spec.sam_interval, spec.warmup + 1) < 1:
        raise SettingError("--update-freq and --sam-interval must be >= 1, --warmup >= 0")
    if spec.timed < spec.sam_interval:
        raise SettingError(
            f"--timed ({spec.timed}) must be >= --sam-interval ({spec.sam_interval}): the "
            "interval row needs a sharpness-aware and a plain update among the timed ones"
        )


def build_trainer(spec: Spec, row: tuple):
    """fairseq's Trainer for a row on synthetic dictionaries; the model from `spec.seed`."""
    own = [("--seed", str(spec.seed)), ("--num-workers", "0"), ("--user-dir", USER_DIR)]
    own += [("--update-freq", str(spec.update_freq))] + [("--cpu", None)] * (spec.device == "cpu")
    own += [("--fp16", None)] * (spec.precision == "fp16")
    options = recipe.training_options(PRESETS[spec.preset].args_files, row[0])
    argv = ["<synthetic>"] + recipe.merge_options(options, own, row[1])  # no data folder read

    def dictionary(size: int):
        d = Dictionary()
        for i in range(len(d), size):
            d.add_symbol(f"w{i}")
        return d

    dictionaries = [dictionary(size) for size in PRESETS[spec.preset].dictionary_sizes]
    built = loading.build_from_args(argv, lambda c: TranslationTask(c.task, *dictionaries))
    built.cfg.common.bf16 = spec.precision == "bf16"  # fairseq-train's --bf16 also means TPU
    return Trainer(built.cfg, built.task, built.model, built.criterion)


def synthetic_updates(trainer, spec: Spec) -> List[List[dict]]:
    """`spec.total` updates of `update_freq` batches of random sentences, cut by fairseq's batch
    iterator at the recipe's --max-tokens (the same for every row)."""
    task, data, rng = trainer.task, trainer.cfg.dataset, np.random.default_rng(spec.seed)
    needed = spec.total * spec.update_freq
    count = math.ceil(needed * data.max_tokens / (MEDIAN * math.exp(SIGMA**2 / 2)) * SLACK)
    source = rng.lognormal(math.log(MEDIAN), SIGMA, count)
    target = source * rng.uniform(*RATIO, count)
    sides = []  # the dataset's arguments: sentences, lengths, dictionary of each side
    for x, d in ((source, task.src_dict), (target, task.tgt_dict)):
        n = np.clip(np.rint(x), *CLIP).astype(np.int64)
        words = [np.append(rng.integers(d.nspecial, len(d), k - 1), d.eos()) for k in n]
        sides += [[torch.from_numpy(w) for w in words], n, d]
    dataset = LanguagePairDataset(*sides)  # left-padded sources as fairseq's translation task
    options = dict(max_tokens=data.max_tokens, max_sentences=data.batch_size, seed=spec.seed)
    batches = loading.first_batches(task, dataset, needed, shuffle=True, **options)
    assert len(batches) == needed, f"generated {len(batches)} of {needed} batches: raise SLACK"
    return [batches[i : i + spec.update_freq] for i in range(0, needed, spec.update_freq)]


def timed(seconds: Dict[str, float], part: str, fn, synchronize=lambda: None):
    """`fn` adding its wall time to seconds[part] (CUDA synchronized around it)."""

    def wrapper(*args, **kwargs):
        synchronize()
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            synchronize()
            seconds[part] += time.perf_counter() - start

    return wrapper


def time_rows(spec: Spec, rows: Dict[str, tuple]):
    """Interleaved updates of every row on one set of batches: (each row's timed updates, each
    row's long-run share of sharpness-aware updates, the number of parameters)."""
    sync = torch.cuda.synchronize if spec.device == "cuda" else (lambda: None)
    trainers, parts = {name: build_trainer(spec, row) for name, row in rows.items()}, {}
    for t in trainers.values():
        t.criterion.forward = timed(parts, "forward", t.criterion.forward, sync)
        t.optimizer.backward = timed(parts, "backward", t.optimizer.backward, sync)
        t.optimizer.step = timed(parts, "optimizer", t.optimizer.step, sync)
    names, records = list(rows), {name: [] for name in rows}
    sams = {name: find_sharpness_aware(t.optimizer) for name, t in trainers.items()}
    patched = {name: timed(parts, name, getattr(perturbation, name), sync) for name in PARTS[3:]}
    with mock.patch.multiple(perturbation, **patched):
        for index, samples in enumerate(synthetic_updates(trainers["adam"], spec)):
            ntokens = sum(int(s["ntokens"]) for s in samples)
            for name in names[index % len(names) :] + names[: index % len(names)]:
                sam, trainer = sams[name], trainers[name]
                perturbed = sam is not None and sam.perturbs_at(trainer.get_num_updates())
                parts.update(dict.fromkeys(PARTS + ("update",), 0.0))
                timed(parts, "update", trainer.train_step, sync)(samples)
                if index >= spec.warmup:
                    record = dict(seconds=parts.pop("update"), parts=dict(parts), ntokens=ntokens)
                    records[name].append(dict(record, perturbed=perturbed))
    fractions = {  # the long-run share of sharpness-aware updates
        name: 1.0 / sam.sam_interval if sam and sam.sam_start_update < spec.total else 0.0
        for name, sam in sams.items()
    }
    return records, fractions, sum(p.numel() for p in trainers["adam"].model.parameters())


def amortized(values, perturbed, fraction: float) -> float:
    """fraction × median over sharpness-aware updates + (1 − fraction) × median over plain ones."""
    total = 0.0
    for kind, weight in ((True, fraction), (False, 1.0 - fraction)):
        group = [v for v, p in zip(values, perturbed) if p == kind]
        if weight > 0 and not group:
            raise SettingError("no timed update of a kind the row needs: raise --timed")
        total += weight * statistics.median(group) if weight > 0 else 0.0
    return total


def summarize_row(records, adam, fraction: float) -> Dict[str, object]:
    """Amortized ms of the update and each part, tokens/s, and the comparisons with Adam taken
    round by round (records[i] and adam[i] ran seconds apart)."""
    perturbed = [r["perturbed"] for r in records]

    def ms(values):
        return 1e3 * amortized(list(values), perturbed, fraction)

    def outside(r):
        return r["seconds"] - sum(r["parts"][p] for p in PARTS[:3])

    out = {f"{part}_ms": ms(r["parts"][part] for r in records) for part in PARTS[:3]}
    out.update(update_ms=ms(r["seconds"] for r in records), outside_ms=ms(map(outside, records)))
    ratios = [r["seconds"] / a["seconds"] for r, a in zip(records, adam)]
    out["ratio_to_adam"] = amortized(ratios, perturbed, fraction)
    out["overhead_ms"] = ms(outside(r) - outside(a) for r, a in zip(records, adam))
    out["overhead_fraction"] = out["overhead_ms"] / out["update_ms"]
    out["perturb_restore_ms"] = ms(r["parts"]["perturb"] + r["parts"]["restore"] for r in records)
    out["tokens_per_s"] = statistics.mean(r["ntokens"] for r in records) / out["update_ms"] * 1e3
    return dict(out, sharpness_aware_fraction=fraction, updates=records)


def resident_kib(field_name: str) -> int:
    """VmRSS / VmHWM of this process, in KiB (Linux)."""
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field_name + ":"))


def release_freed_memory_at_once() -> bool:
    """glibc mallopt: blocks from 64 KiB get their own mapping, unmapped when freed
    (M_MMAP_THRESHOLD = -3), and the heap is trimmed at every free (M_TRIM_THRESHOLD = -1).
    The measure reads Linux's /proc, and torch's Linux wheels need glibc."""
    mallopt = ctypes.CDLL("libc.so.6").mallopt
    return bool(mallopt(-3, 64 * 1024)) and bool(mallopt(-1, 0))


def reset_peak_rss() -> None:
    """VmHWM starts again from the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")


def measure_peak_memory(spec: Spec, row: tuple) -> Dict[str, object]:
    """In this fresh process: the peak over updates 0 to K (K = --sam-interval: Adam's state exists
    after update 0, each perturbing row perturbs again by K) minus the memory before them."""
    cuda, tight = spec.device == "cuda", spec.device == "cpu" and release_freed_memory_at_once()
    trainer = build_trainer(spec, row)
    updates = synthetic_updates(trainer, spec)[: min(spec.total, spec.sam_interval + 1)]
    if cuda:
        trainer.cuda_env = None  # fairseq would reset the peak statistics after every update
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else resident_kib("VmRSS") * 1024
    if not cuda:
        reset_peak_rss()
    for samples in updates:
        trainer.train_step(samples)
    peak = torch.cuda.max_memory_allocated() if cuda else resident_kib("VmHWM") * 1024
    kind = "torch.cuda.max_memory_allocated" if cuda else "peak RSS (VmHWM)"
    kind += ", freed blocks unmapped at once" * tight
    return dict(peak_increase_bytes=peak - before, memory_measure=kind, memory_updates=len(updates))


def measure_rows_memory(spec: Spec, rows: Dict[str, tuple]) -> Dict[str, dict]:
    """Each row in its own new process: forked from a server that only imported this module
    (CPU), or spawned (a CUDA context does not survive a fork)."""
    context = get_context("spawn" if spec.device == "cuda" else "forkserver")
    if spec.device == "cpu":
        context.set_forkserver_preload([__name__])
    out = {}
    for name, row in rows.items():
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            out[name] = pool.submit(measure_peak_memory, spec, row).result()
    adam = out["adam"]["peak_increase_bytes"]
    for memory in out.values():
        memory["extra_memory_bytes"] = memory["peak_increase_bytes"] - adam
    return out


def run_benchmark(spec: Spec) -> int:
    """Times every row (interleaved), then each row's peak memory; prints them, writes --json."""
    check_spec(spec)
    rows, load = rows_for(spec), [os.getloadavg()]
    records, fractions, parameters = time_rows(spec, rows)
    load.append(os.getloadavg())
    memory = {} if spec.no_memory else measure_rows_memory(spec, rows)
    table = [
        dict(name=name, optimizer=optimizer, options=options, **memory.get(name, {}))
        | summarize_row(records[name], records["adam"], fractions[name])
        for name, (optimizer, options) in rows.items()
    ]
    machine = f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), torch "
    machine += f"{torch.__version__}, {torch.get_num_threads()} torch threads"
    result = dict(spec=vars(spec), preset=PRESETS[spec.preset].description, machine=machine)
    result.update(rows=table, load_average=load, parameters=parameters)
    print(format_benchmark(result))
    if spec.json:
        write_json(spec.json, result)
    return 0


def markdown_table(header: List[str], rows: List[list]) -> str:
    lines = [header, ["---"] * len(header)] + rows
    return "\n".join("| " + " | ".join(map(str, line)) + " |" for line in lines)


COLUMNS = {  # header: (row key, format, scale)
    "update ms": ("update_ms", ".1f", 1),
    "×Adam": ("ratio_to_adam", ".3f", 1),
    "fwd ms": ("forward_ms", ".1f", 1),
    "bwd ms": ("backward_ms", ".1f", 1),
    "opt ms": ("optimizer_ms", ".1f", 1),
    "overhead %": ("overhead_fraction", ".2f", 100),
    "perturb+restore ms": ("perturb_restore_ms", ".1f", 1),
    "tokens/s": ("tokens_per_s", ".0f", 1),
    "extra MiB": ("extra_memory_bytes", ".0f", 1 / MIB),
}


def format_benchmark(result: Dict[str, object]) -> str:
    spec, rows, parameters = result["spec"], result["rows"], result["parameters"]
    cells = [
        [r["name"]] + [f"{r[k] * x:{f}}" if k in r else "-" for k, f, x in COLUMNS.values()]
        for r in rows
    ]
    before, after = ([round(x, 2) for x in load] for load in result["load_average"])
    lines = [
        markdown_table(["row", *COLUMNS], cells),
        "",
        f"{result['preset']}; {spec['device']} {spec['precision']}, --update-freq "
        f"{spec['update_freq']}, {spec['warmup']} warm-up + {spec['timed']} timed updates per "
        f"row, interleaved; {parameters:,} parameters (one fp32 copy = "
        f"{parameters * FP32_BYTES / MIB:.0f} MiB).",
        f"load average before {before}, after {after}; {result['machine']}.",
    ]
    if "memory_measure" in rows[0]:
        lines.append(
            f"peak memory: {rows[0]['memory_measure']}, over the first "
            f"{rows[0]['memory_updates']} updates, in a fresh process per row."
        )
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROGRAM, description=__doc__.split("\n\n")[0])
    presets = "; ".join(f"{name}: {preset.description}" for name, preset in PRESETS.items())
    p.add_argument("--preset", choices=sorted(PRESETS), default="iwslt", help=presets)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    low = p.add_mutually_exclusive_group()
    for name in ("fp16", "bf16"):
        low.add_argument(f"--{name}", dest="precision", action="store_const", const=name)
    p.set_defaults(precision="fp32")  # --fp16/--bf16: weights in that precision (--device cuda)
    p.add_argument("--update-freq", type=int, default=1, help="micro-batches per update")
    p.add_argument("--warmup", type=int, default=3, help="untimed updates first (%(default)s)")
    p.add_argument("--timed", type=int, help="timed updates per row (default: the preset's)")
    p.add_argument("--sam-interval", type=int, default=5, help="K of the interval/LookSAM rows")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    return p


def parse_spec(argv=None) -> Spec:
    spec = parser().parse_args(argv)
    spec.timed = PRESETS[spec.preset].timed if spec.timed is None else spec.timed
    spec.total = spec.warmup + spec.timed
    return spec


def main(argv=None) -> int:
    spec = parse_spec(argv)
    # fairseq's own progress is not the benchmark's output
    return run_command(PROGRAM, lambda: run_benchmark(spec), logging.WARNING)
