"""Sharpness and adaptive sharpness as generalization measures over a family of translation
models: Kendall's τ and Jiang et al.'s granulated ψ (ICLR 2020), as Kwon et al. (ICML 2021,
Figure 3) show them on CIFAR-10.

The family is a `grid.Grid` swept over at least three fairseq-train options, every model
trained to the same --max-update budget.  Per model (checkpoint_last.pt, eval mode):
    train loss: fairseq's nll_loss (cross-entropy, no label smoothing) per target token in bits,
                on a fixed training subset (the first --train-batches batches of
                --batch-tokens tokens of the train split, in fairseq's fixed order);
    test loss:  the same on the whole test split;  gap = test − train;
    sharpness / adaptive sharpness: sharpness.estimate_sharpness of that train-subset loss
                (in bits), plain at --rho-plain, adaptive at --rho-adaptive with η = 0 and
                biases normalized (the scale-invariant setting);
    parameter norm: ‖w‖₂ over every trained tensor (a baseline).
τ: scipy's tau-b of each measure against the gap over all models.  ψ_i: the mean, over the
settings of the other axes, of τ over the models where only axis i varies; a cell whose τ is
undefined (fewer than 2 models, or the gap or the measure constant) is left out and counted.
Ψ: the mean of the defined ψ_i.  `--rescaled-copies`: each model's copy with every FFN's fc1
(weight, bias) × a and fc2 weight ÷ a (the same function, ReLU) joins the family with its
original's losses; the scale a is then one more axis (whose cells are all undefined: the copies
share their original's gap).
"""

import argparse
import csv
import dataclasses
import logging
import math
import os
import subprocess
from typing import Dict, List, Optional, Sequence, Tuple

from . import files, grid
from .errors import ExperimentError, SettingError

PROGRAM = "fairseq-asam-correlation"
logger = logging.getLogger(__name__)
MEASURES = ("sharpness", "adaptive_sharpness", "parameter_norm")
MEASURE_TITLES = {
    "sharpness": "sharpness",
    "adaptive_sharpness": "adaptive sharpness",
    "parameter_norm": "parameter norm",
}
KENDALL_VARIANT = "tau-b"
TIES = (
    "tau-b (scipy.stats.kendalltau, variant='b'): a pair tied in the gap or in the measure counts "
    "as neither concordant nor discordant, and the denominator sqrt((n0-n1)(n0-n2)) leaves out "
    "the pairs tied in each; without ties it equals Jiang et al.'s tau-a"
)
SCALE_AXIS, DEFAULT_SCALES = "scale", (0.25, 4.0)
MEASUREMENT_FILE = "correlation-measures.json"  # in each run folder: reused for the same settings
LN2 = math.log(2)


@dataclasses.dataclass(frozen=True)
class Family:
    preset: str
    rows: Tuple[str, ...]
    sweeps: Tuple[str, ...]  # grid.parse_sweep texts
    max_update: int


FAMILIES = {
    # 8 one-layer models on the generated corpus: about a minute each on one CPU thread.
    "tiny": Family(
        "tiny", ("adam",), ("lr=0.002,0.006", "dropout=0,0.3", "max-tokens=256,1024"), 200
    ),
    # 27 IWSLT'14 models (docs/correlation.md estimates the GPU-hours).
    "paper": Family(
        "paper",
        ("adam",),
        ("lr=2.5e-4,5e-4,1e-3", "dropout=0.1,0.2,0.3", "max-tokens=2048,4096,8192"),
        50000,
    ),
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """How each model is measured (stated in correlation.json)."""

    rho_plain: float = 0.05
    rho_adaptive: float = 0.5
    steps: int = 10
    train_batches: int = 8
    batch_tokens: int = 1024
    device: str = "cpu"


def build_grid(out: str, family: Family) -> grid.Grid:
    sweeps = tuple(grid.parse_sweep(text) for text in family.sweeps)
    built = grid.Grid(
        out,
        grid.PRESETS[family.preset],
        rows=family.rows,
        sweeps=sweeps,
        max_update=family.max_update,
        checkpoint="last",
    )
    built.check()
    return built


def prepare_data(built: grid.Grid, archive: Optional[str]) -> str:
    """The family's data-bin: `archive`, or the preset's generated sample archive, prepared
    under <out>/data.  STAND-IN until the prepare rewrite merges (prepare_iwslt14(archive,
    data_root, bpe_merges) -> data_dir with data_dir/data-bin): it calls today's prepare."""
    from . import prepare, synthetic_data

    root = os.path.join(built.out_dir, "data")
    if archive is None:
        if built.preset.sample_archive is None:
            raise SettingError(f"--preset {built.preset.name} needs --archive (the de-en.tgz)")
        archive = os.path.join(root, "sample-de-en.tgz")
        if not os.path.isfile(archive):
            synthetic_data.build_sample_archive(archive, *built.preset.sample_archive)
    return prepare.prepare_iwslt14(archive, root, bpe_merges=built.preset.bpe_merges)


def train_stand_in(built: grid.Grid, run: grid.Run, data_bin: str) -> None:
    """Trains one model into grid.run_dir(run); resumable (fairseq restarts from
    checkpoint_last.pt).  STAND-IN for launch.run_one(grid, run, data_bin, references, gpu),
    to be replaced by it when the launch module merges (it adds --launcher slurm)."""
    folder = built.run_dir(run)
    settings = built.settings(run, data_bin)
    if files.read_stamp(folder, "train") == settings:
        return
    command = built.command(run, data_bin)
    os.makedirs(folder, exist_ok=True)
    files.write_text(os.path.join(folder, "command.txt"), " ".join(command) + "\n")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    logger.info("training %s", run.name)
    with open(os.path.join(folder, "train.log"), "w", encoding="utf-8") as log:
        status = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if status != 0:
        raise ExperimentError(f"{run.name}: fairseq-train exited {status}, see {folder}/train.log")
    files.write_stamp(folder, "train", settings)


# ---------------------------------------------------------------- the measures of one model


def rescale_ffn(model, scale: float):
    """A copy computing the same function: every FFN's fc1 (weight and bias) × a, fc2 ÷ a."""
    import copy

    import torch

    model = copy.deepcopy(model)
    layers = [m for m in model.modules() if hasattr(m, "fc1") and hasattr(m, "fc2")]
    if not layers or any(layer.activation_fn is not torch.nn.functional.relu for layer in layers):
        raise ExperimentError("--rescaled-copies needs FFN layers with a ReLU activation")
    with torch.no_grad():
        for layer in layers:
            layer.fc1.weight.mul_(scale)
            layer.fc1.bias.mul_(scale)
            layer.fc2.weight.div_(scale)
    return model


def nll_loss_fn(task, device: str):
    """(model, batch) -> (nll summed over target tokens in nats, ntokens): fairseq's
    cross_entropy criterion, i.e. the nll_loss that label_smoothed_cross_entropy logs."""
    from fairseq import utils
    from fairseq.criterions.cross_entropy import CrossEntropyCriterion

    criterion = CrossEntropyCriterion(task, sentence_avg=False)

    def loss_fn(model, sample):
        loss, sample_size, _ = criterion(
            model, utils.apply_to_sample(lambda t: t.to(device), sample)
        )
        return loss, sample_size

    return loss_fn


def mean_bits(model, batches, loss_fn) -> float:
    import torch

    with torch.no_grad():
        totals = [loss_fn(model, batch) for batch in batches]
    return sum(float(loss) for loss, _ in totals) / sum(float(n) for _, n in totals) / LN2


def model_measures(model, batches, loss_fn, settings: Settings) -> Dict[str, float]:
    """Sharpness, adaptive sharpness (in bits per target token), the parameter norm, and the
    train-subset loss the sharpness is of."""
    import torch

    from .sharpness import estimate_sharpness

    plain = estimate_sharpness(
        model, batches, loss_fn, settings.rho_plain, adaptive=False, steps=settings.steps
    )
    adaptive = estimate_sharpness(
        model,
        batches,
        loss_fn,
        settings.rho_adaptive,
        eta=0.0,
        normalize_biases=True,
        steps=settings.steps,
    )
    norm = torch.linalg.vector_norm(
        torch.stack([p.detach().double().norm() for p in model.parameters() if p.requires_grad])
    )
    return {
        "sharpness": plain.sharpness / LN2,
        "adaptive_sharpness": adaptive.sharpness / LN2,
        "parameter_norm": float(norm),
        "measured_train_loss": plain.loss / LN2,
    }


def measure_model(
    checkpoint: str, data_bin: str, settings: Settings, scales: Sequence[float]
) -> List[Dict[str, float]]:
    """One row per copy (scale 1: the model itself, then `scales`): losses and measures."""
    from . import loading

    loaded = loading.load_checkpoint(checkpoint, data_bin, "train")
    model = loaded.model.to(settings.device)
    dataset_cfg = loaded.cfg.dataset
    options = dict(
        max_tokens=settings.batch_tokens,
        max_sentences=None,
        seed=1,
        ignore_invalid_inputs=dataset_cfg.skip_invalid_size_inputs_valid_test,
    )
    train = loading.split_batches(loaded, "train", settings.train_batches, **options)
    test = loading.split_batches(loaded, "test", None, **options)
    loss_fn = nll_loss_fn(loaded.task, settings.device)
    train_loss, test_loss = mean_bits(model, train, loss_fn), mean_bits(model, test, loss_fn)
    losses = {"train_loss": train_loss, "test_loss": test_loss, "gap": test_loss - train_loss}
    rows = []
    for scale in (1.0,) + tuple(scales):
        copy = model if scale == 1.0 else rescale_ffn(model, scale)
        rows.append({SCALE_AXIS: scale, **losses, **model_measures(copy, train, loss_fn, settings)})
    return rows


def measure_run(built: grid.Grid, run: grid.Run, data_bin: str, settings, scales) -> List[dict]:
    """measure_model of the run's checkpoint_last.pt, reused from the run folder when the
    run's training and these settings are unchanged."""
    folder = built.run_dir(run)
    inputs = {
        "train": files.read_stamp(folder, "train"),
        "settings": dataclasses.asdict(settings),
        "scales": list(scales),
    }
    saved = files.read_json_object(os.path.join(folder, MEASUREMENT_FILE))
    if saved is not None and saved.get("inputs") == inputs:
        return saved["rows"]
    checkpoint = os.path.join(folder, grid.CHECKPOINTS_FOLDER, "checkpoint_last.pt")
    logger.info("measuring %s", run.name)
    rows = measure_model(checkpoint, data_bin, settings, scales)
    files.write_json(os.path.join(folder, MEASUREMENT_FILE), {"inputs": inputs, "rows": rows})
    return rows


# ---------------------------------------------------------------- statistics


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    """scipy's tau-b; None where it is undefined (fewer than 2 values, or x or y constant)."""
    from scipy import stats

    if len(x) < 2:
        return None
    tau = stats.kendalltau(x, y, variant="b").statistic
    return None if math.isnan(tau) else float(tau)


def granulated(rows: Sequence[dict], axes: Sequence[str], measure: str) -> dict:
    """ψ per axis (Jiang et al. 2020, eq. 4) and Ψ, the mean of the defined ψ; each axis with
    its cells, the undefined ones left out and counted, and the models behind its ψ."""
    per_axis = {}
    for axis in axes:
        others = [a for a in axes if a != axis]
        cells: Dict[tuple, List[dict]] = {}
        for row in rows:
            cells.setdefault(tuple(row[a] for a in others), []).append(row)
        taus, models = [], 0
        for cell in cells.values():
            tau = kendall_tau([r[measure] for r in cell], [r["gap"] for r in cell])
            if tau is not None:
                taus.append(tau)
                models += len(cell)
        per_axis[axis] = {
            "psi": sum(taus) / len(taus) if taus else None,
            "cells": len(cells),
            "undefined_cells": len(cells) - len(taus),
            "models": models,
        }
    defined = [v["psi"] for v in per_axis.values() if v["psi"] is not None]
    return {"per_axis": per_axis, "overall": sum(defined) / len(defined) if defined else None}


def correlations(rows: Sequence[dict], axes: Sequence[str]) -> Dict[str, dict]:
    """Per measure: τ against the gap over all rows, ψ per axis and Ψ, and the model count."""
    gaps = [row["gap"] for row in rows]
    return {
        measure: {
            "tau": kendall_tau([row[measure] for row in rows], gaps),
            "psi": granulated(rows, axes, measure),
            "models": len(rows),
        }
        for measure in MEASURES
    }


# ---------------------------------------------------------------- outputs


def fmt(value: Optional[float]) -> str:
    return "undefined" if value is None else f"{value:+.3f}"


def markdown_table(stats: Dict[str, dict], axes: Sequence[str], caption: str) -> str:
    """Sharpness and adaptive sharpness side by side (then the baselines): τ, ψ per axis, Ψ,
    with the models behind each figure (ψ: in cells where τ is defined / all cells)."""
    head = "| | " + " | ".join(MEASURE_TITLES[m] for m in MEASURES) + " |"
    lines = [head, "|---" * (len(MEASURES) + 1) + "|"]
    lines.append(
        "| τ (all models) | "
        + " | ".join(f"{fmt(stats[m]['tau'])} ({stats[m]['models']})" for m in MEASURES)
        + " |"
    )
    for axis in axes:
        cells = [stats[m]["psi"]["per_axis"][axis] for m in MEASURES]
        lines.append(
            f"| ψ {axis} | "
            + " | ".join(
                f"{fmt(c['psi'])} ({c['models']}; {c['cells'] - c['undefined_cells']}/{c['cells']} "
                "cells)"
                for c in cells
            )
            + " |"
        )
    lines.append(
        "| Ψ (mean ψ) | " + " | ".join(fmt(stats[m]["psi"]["overall"]) for m in MEASURES) + " |"
    )
    return "\n".join(lines + ["", caption, ""])


def write_csv(path: str, rows: Sequence[dict]) -> None:
    with files.atomic_output(path) as temporary, open(temporary, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def scatter_plots(out: str, rows: Sequence[dict], axes: Sequence[str], stats) -> List[str]:
    """One PNG per measure: one panel per axis, the gap against the measure, each point
    coloured by that axis's value; τ in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for measure in MEASURES:
        figure, panels = plt.subplots(1, len(axes), figsize=(4 * len(axes), 3.6), squeeze=False)
        for panel, axis in zip(panels[0], axes):
            for value in sorted({row[axis] for row in rows}, key=float):
                chosen = [row for row in rows if row[axis] == value]
                panel.scatter(
                    [row[measure] for row in chosen],
                    [row["gap"] for row in chosen],
                    label=f"{axis} {value}",
                    alpha=0.8,
                )
            panel.set_xlabel(MEASURE_TITLES[measure])
            panel.set_ylabel("gap (test − train nll, bits/token)")
            panel.legend(fontsize=7)
        tau = stats[measure]["tau"]
        figure.suptitle(
            f"{MEASURE_TITLES[measure]} vs generalization gap: Kendall τ ({KENDALL_VARIANT}) "
            f"{fmt(tau)} over {stats[measure]['models']} models"
        )
        figure.tight_layout()
        path = os.path.join(out, f"scatter-{measure}.png")
        with files.atomic_output(path) as temporary:
            figure.savefig(temporary, format="png", dpi=90)
        plt.close(figure)
        paths.append(path)
    return paths


def write_outputs(out: str, rows, axes, settings: Settings, record: dict, failed) -> dict:
    stats = correlations(rows, axes)
    report = {
        "grid": record,
        "losses": "fairseq nll_loss (no label smoothing) per target token, base 2, eval mode; "
        f"train: first {settings.train_batches} batches of {settings.batch_tokens} tokens of the "
        "train split (fairseq's fixed order); test: the whole test split; gap = test - train",
        "measures": {
            "sharpness": f"plain, rho {settings.rho_plain}, {settings.steps} ascent steps, bits",
            "adaptive_sharpness": f"adaptive, rho {settings.rho_adaptive}, eta 0, biases "
            f"normalized, {settings.steps} ascent steps, bits",
            "parameter_norm": "L2 norm of every trained tensor",
        },
        "kendall": {"variant": KENDALL_VARIANT, "ties": TIES},
        "settings": dataclasses.asdict(settings),
        "axes": list(axes),
        "models": len(rows),
        "failed_runs": failed,
        **stats,
    }
    files.write_json(os.path.join(out, "correlation.json"), report)
    caption = (
        f"Kendall τ ({KENDALL_VARIANT}: ties count as neither concordant nor discordant) of each "
        f"measure against the generalization gap; models in parentheses. {report['losses']}. "
        f"Sharpness: {report['measures']['sharpness']}; adaptive: "
        f"{report['measures']['adaptive_sharpness']}. A ψ cell is undefined when its gap or "
        "measure is constant; undefined cells are left out of ψ."
    )
    files.write_text(os.path.join(out, "correlation.md"), markdown_table(stats, axes, caption))
    write_csv(os.path.join(out, "correlation.csv"), rows)
    scatter_plots(out, rows, axes, stats)
    return report


# ---------------------------------------------------------------- the command


def family_rows(built: grid.Grid, data_bin: str, settings: Settings, scales) -> Tuple[list, list]:
    """Trains (stand-in) and measures every run; (CSV rows, failed runs).  A run that fails is
    logged and left out, the others go on."""
    rows, failed = [], []
    for run in built.runs():
        try:
            train_stand_in(built, run, data_bin)
            measured = measure_run(built, run, data_bin, settings, scales)
        except ExperimentError as error:
            logger.error("%s", error)
            failed.append({"run": run.name, "error": str(error)})
            continue
        for row in measured:
            rows.append({"run": run.name, "optimizer": run.row, **dict(run.swept), **row})
    return rows, failed


def work(args: argparse.Namespace) -> int:
    family = FAMILIES[args.preset]
    if args.max_update is not None:
        family = dataclasses.replace(family, max_update=args.max_update)
    if args.sweep:
        family = dataclasses.replace(family, sweeps=tuple(args.sweep))
    settings = Settings(args.rho_plain, args.rho_adaptive, args.steps, args.train_batches,
                        args.batch_tokens, args.device)  # fmt: skip
    scales = parse_scales(args.rescaled_copies) if args.rescaled_copies else ()
    built = build_grid(os.path.abspath(args.out), family)
    axes = [s.option for s in built.sweeps] + (["optimizer"] if len(built.rows) > 1 else [])
    if len(axes) < 3:
        raise SettingError(f"--sweep: the family needs at least 3 axes, got {', '.join(axes)}")
    data_bin = prepare_data(built, args.archive)
    grid.check_options_known(built, data_bin)
    files.write_json(os.path.join(built.out_dir, grid.GRID_RECORD), built.record())
    rows, failed = family_rows(built, data_bin, settings, scales)
    if len({row["run"] for row in rows}) < 2:
        raise ExperimentError(f"fewer than 2 models measured ({len(failed)} failed): no τ")
    report = write_outputs(built.out_dir, rows, axes + ([SCALE_AXIS] if scales else []),
                           settings, built.record(), failed)  # fmt: skip
    print(open(os.path.join(built.out_dir, "correlation.md"), encoding="utf-8").read())
    return 0 if not report["failed_runs"] else 1


def parse_scales(text: str) -> Tuple[float, ...]:
    try:
        scales = tuple(float(v) for v in text.split(","))
    except ValueError:
        scales = ()
    if not scales or any(not (math.isfinite(a) and a > 0 and a != 1) for a in scales):
        raise SettingError(
            f"--rescaled-copies takes scales > 0 other than 1 (e.g. 0.25,4), got {text!r}"
        )
    return scales


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROGRAM,
        description="Kendall τ and granulated ψ of sharpness, adaptive sharpness and the "
        "parameter norm against the generalization gap over a family of trained models "
        "(docs/correlation.md).",
    )
    p.add_argument("--preset", choices=sorted(FAMILIES), default="tiny")
    p.add_argument("--out", required=True, help="the family's folder (resumable)")
    p.add_argument("--archive", help="IWSLT'14 de-en.tgz (default: the tiny preset's sample)")
    p.add_argument("--sweep", action="append", metavar="OPTION=V1,V2",
                   help="replaces the preset's sweeps (at least 3)")  # fmt: skip
    p.add_argument("--max-update", type=int, help="the budget of every model")
    p.add_argument("--rho-plain", type=float, default=Settings.rho_plain)
    p.add_argument("--rho-adaptive", type=float, default=Settings.rho_adaptive)
    p.add_argument("--steps", type=int, default=Settings.steps, help="ascent steps K")
    p.add_argument("--train-batches", type=int, default=Settings.train_batches)
    p.add_argument("--batch-tokens", type=int, default=Settings.batch_tokens)
    p.add_argument("--device", default=Settings.device)
    p.add_argument(
        "--rescaled-copies", nargs="?", const=",".join(map(str, DEFAULT_SCALES)), metavar="A,..",
        help=f"add each model's FFN-rescaled copies (default scales {DEFAULT_SCALES})",
    )  # fmt: skip
    return p


def main(argv=None) -> int:
    from .cli import run_command
    from .logs import log_to_stdout

    args = parser().parse_args(argv)
    log_to_stdout()
    return run_command(PROGRAM, lambda: work(args))
