"""Kendall's τ and granulated ψ (Jiang et al., ICLR 2020) of sharpness, adaptive sharpness and the
parameter norm against the generalization gap of translation models (Kwon et al. 2021, Fig. 3).

The family: a grid over 3 or more fairseq-train options (configs/correlation/), one budget; per
model (checkpoint_last.pt, eval mode) its nll losses, gap and measures (`Settings.describe`).
"""

import argparse
import copy
import dataclasses
import logging
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

from . import cli, files, grid, launch, recipe, table4
from .errors import ExperimentError, SettingError

PROGRAM = "fairseq-asam-correlation"
logger = logging.getLogger(__name__)
FAMILY_ARGS = "correlation/{preset}.args"  # in the config folder: the family's own flags
PRESETS = ("tiny", "paper")
MEASURES = ("sharpness", "adaptive_sharpness", "parameter_norm")
KENDALL = "tau-b"
TIES = "a pair tied in the gap or the measure is neither concordant nor discordant, and the \
denominator sqrt((n0-n1)(n0-n2)) leaves out the pairs tied in each; without ties, tau-b = tau-a"
SCALE_AXIS, DEFAULT_SCALES = "scale", (0.25, 4.0)
LN2 = math.log(2)
LAST_CHECKPOINT = os.path.join(grid.CHECKPOINTS_FOLDER, "checkpoint_last.pt")  # in a run folder


def _setting(default, text: str):  # a Settings field and its flag's help
    return dataclasses.field(default=default, metadata={"help": text})


@dataclasses.dataclass(frozen=True)
class Settings:
    """How each model is measured (stated in correlation.json); each field is a flag."""

    rho_plain: float = _setting(0.05, "ρ of plain sharpness")
    rho_adaptive: float = _setting(0.5, "ρ of adaptive sharpness (η = 0, biases normalized)")
    steps: int = _setting(10, "ascent steps K of both estimates")
    train_batches: int = _setting(8, "batches of the fixed training subset")
    batch_tokens: int = _setting(1024, "tokens per batch of the training subset and the test")
    device: str = _setting("cpu", "where to measure")

    def describe(self) -> Dict[str, str]:
        """What the losses and each measure are, in words (correlation.json, the caption)."""
        return {
            "losses": "fairseq's nll_loss (no label smoothing) per target token in bits, eval "
            f"mode; train: the first {self.train_batches} batches of {self.batch_tokens} tokens "
            "of the train split as epoch 1 of seed 1 draws them; test: the test split; gap = "
            "test - train",
            "sharpness": f"plain, rho {self.rho_plain}, {self.steps} ascent steps, bits",
            "adaptive_sharpness": f"adaptive, rho {self.rho_adaptive}, eta 0, biases "
            f"normalized, {self.steps} ascent steps, bits",
            "parameter_norm": "the L2 norm of every trained tensor",
        }


def build_grid(args: argparse.Namespace) -> grid.Grid:
    """The family's grid: configs/correlation/<preset>.args (--grid-preset, --optimizers,
    --seeds, --sweep..., --max-update), a --sweep or --max-update given replacing the file's."""
    path = os.path.join(recipe.config_dir(), FAMILY_ARGS.format(preset=args.preset))
    options = recipe.read_args_file(path)
    given = dict(options)
    sweeps = args.sweep or [value for flag, value in options if flag == "--sweep"]
    built = grid.Grid(
        os.path.abspath(args.out),
        grid.PRESETS[given["--grid-preset"]],
        rows=grid.parse_rows(given["--optimizers"]),
        seeds=grid.parse_seeds(given["--seeds"]),
        sweeps=tuple(grid.parse_sweep(text) for text in sweeps),
        max_update=int(given["--max-update"]) if args.max_update is None else args.max_update,
        checkpoint="last",
    )
    built.check()
    if len(axes_of(built)) < 3:
        raise SettingError(f"--sweep: a family needs 3 axes or more, got {axes_of(built)}")
    return built


def axes_of(built: grid.Grid) -> List[str]:  # the swept options, and the optimizer if several
    return [s.option for s in built.sweeps] + (["optimizer"] if len(built.rows) > 1 else [])


def rescale_ffn(model, scale: float):
    """A copy computing the same function: every FFN's fc1 (weight and bias) × a, fc2 ÷ a."""
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


def model_measures(model, batches, loss_fn, settings: Settings) -> Dict[str, float]:
    """Sharpness and adaptive sharpness (bits per target token), the parameter norm, and the
    train-subset loss they are of (a rescaled copy's own, which must equal its original's)."""
    import torch

    from .sharpness import estimate_sharpness

    rho, steps = settings.rho_plain, settings.steps
    plain = estimate_sharpness(model, batches, loss_fn, rho, adaptive=False, steps=steps)
    adaptive = estimate_sharpness(
        model, batches, loss_fn, settings.rho_adaptive, eta=0.0, normalize_biases=True, steps=steps
    )
    trained = [p.detach().double().norm() for p in model.parameters() if p.requires_grad]
    norm = float(torch.stack(trained).norm())
    values = (plain.sharpness / LN2, adaptive.sharpness / LN2, norm, plain.loss / LN2)
    return dict(zip((*MEASURES, "own_train_loss"), values))


def measure_model(checkpoint: str, data_bin: str, settings: Settings, scales) -> List[dict]:
    """A row per copy (scale 1: the model; then `scales`): losses (fairseq's cross_entropy
    criterion: label_smoothed_cross_entropy's nll_loss) and measures."""
    import torch
    from fairseq import utils
    from fairseq.criterions.cross_entropy import CrossEntropyCriterion

    from . import loading

    loaded = loading.load_checkpoint(checkpoint, data_bin, "train")
    model, device = loaded.model.to(settings.device), settings.device
    skip = loaded.cfg.dataset.skip_invalid_size_inputs_valid_test
    options = dict(max_tokens=settings.batch_tokens, seed=1, ignore_invalid_inputs=skip)
    criterion = CrossEntropyCriterion(loaded.task, sentence_avg=False)

    def loss_fn(model, sample):  # (nll in nats summed over the target tokens, their count)
        return criterion(model, sample)[:2]

    def batches(split: str, count: Optional[int]) -> list:  # as epoch 1 of seed 1 draws them
        found = loading.split_batches(loaded, split, count, shuffle=True, **options)
        return [utils.apply_to_sample(lambda t: t.to(device), batch) for batch in found]

    def bits(part: list) -> float:
        with torch.no_grad():
            totals = [loss_fn(model, batch) for batch in part]
        return sum(float(loss) for loss, _ in totals) / sum(float(n) for _, n in totals) / LN2

    train = batches("train", settings.train_batches)
    train_loss, test_loss = bits(train), bits(batches("test", None))
    losses = {"train_loss": train_loss, "test_loss": test_loss, "gap": test_loss - train_loss}
    rows = []
    for a in (1.0, *scales):
        copy = rescale_ffn(model, a) if a != 1 else model
        rows.append({SCALE_AXIS: a, **losses, **model_measures(copy, train, loss_fn, settings)})
    return rows


def kendall_tau(rows: Sequence[dict], measure: str) -> Optional[float]:
    """scipy's tau-b of `measure` against the gap; None if undefined (< 2 rows, or constant)."""
    from scipy import stats

    x, y = [row[measure] for row in rows], [row["gap"] for row in rows]
    tau = stats.kendalltau(x, y, variant="b").statistic if len(rows) >= 2 else math.nan
    return None if math.isnan(tau) else float(tau)


def granulated(rows: Sequence[dict], axes: Sequence[str], measure: str) -> dict:
    """ψ per axis (Jiang et al. 2020, eq. 4) with its cells, undefined ones (left out) and models;
    Ψ ("overall"), the mean of the defined ψ."""
    per_axis = {}
    for axis in axes:
        cells: Dict[tuple, List[dict]] = {}
        for row in rows:
            cells.setdefault(tuple(row[a] for a in axes if a != axis), []).append(row)
        taus = [(kendall_tau(cell, measure), len(cell)) for cell in cells.values()]
        defined = [(tau, size) for tau, size in taus if tau is not None]
        psi = sum(tau for tau, _ in defined) / len(defined) if defined else None
        undefined, models = len(cells) - len(defined), sum(size for _, size in defined)
        per_axis[axis] = dict(psi=psi, cells=len(cells), undefined_cells=undefined, models=models)
    psis = [v["psi"] for v in per_axis.values() if v["psi"] is not None]
    return {"per_axis": per_axis, "overall": sum(psis) / len(psis) if psis else None}


def correlations(rows: Sequence[dict], axes: Sequence[str]) -> Dict[str, dict]:
    """Per measure: τ against the gap over all rows, ψ per axis and Ψ, and the model count."""
    return {
        m: dict(tau=kendall_tau(rows, m), psi=granulated(rows, axes, m), models=len(rows))
        for m in MEASURES
    }


def fmt(value: Optional[float]) -> str:
    return "undefined" if value is None else f"{value:+.3f}"


def markdown_table(stats: Dict[str, dict], axes: Sequence[str], caption: str) -> str:
    """τ, ψ per axis and Ψ per measure, sharpness beside adaptive sharpness, with model counts."""

    def psi(c: dict) -> str:
        defined = c["cells"] - c["undefined_cells"]
        return f"{fmt(c['psi'])} ({c['models']}; {defined} of {c['cells']} cells)"

    rows = [["", *(m.replace("_", " ") for m in MEASURES)], ["---"] * 4]
    rows.append(["τ", *(f"{fmt(stats[m]['tau'])} ({stats[m]['models']})" for m in MEASURES)])
    rows += [[f"ψ {a}", *(psi(stats[m]["psi"]["per_axis"][a]) for m in MEASURES)] for a in axes]
    rows.append(["Ψ", *(fmt(stats[m]["psi"]["overall"]) for m in MEASURES)])
    return "\n".join(["| " + " | ".join(row) + " |" for row in rows] + ["", caption, ""])


def scatter_plots(out: str, rows: Sequence[dict], axes: Sequence[str], stats) -> None:
    """scatter-<measure>.png: gap against measure, a panel per axis coloured by its values."""
    from matplotlib.figure import Figure

    for m in MEASURES:
        figure = Figure(figsize=(3.6 * len(axes), 3.4))
        panels = figure.subplots(1, len(axes), squeeze=False)
        for panel, axis in zip(panels[0], axes):
            for value in sorted({row[axis] for row in rows}, key=str):
                chosen = [row for row in rows if row[axis] == value]
                x, y = [row[m] for row in chosen], [row["gap"] for row in chosen]
                panel.scatter(x, y, label=f"{axis} {value}", alpha=0.7)
            panel.set(xlabel=m.replace("_", " "), ylabel="gap: test − train nll (bits/token)")
            panel.legend(fontsize=7)
        tau = f"Kendall τ ({KENDALL}) {fmt(stats[m]['tau'])} over {stats[m]['models']} models"
        figure.suptitle(f"{m.replace('_', ' ')} against the gap: {tau}")
        figure.tight_layout()
        with files.atomic_output(os.path.join(out, f"scatter-{m}.png")) as temporary:
            figure.savefig(temporary, format="png", dpi=80)


def write_outputs(out: str, rows, axes, settings: Settings, record: dict, failed) -> str:
    """correlation.json, correlation.md (returned), correlation.csv, the scatter plots."""
    import pandas

    stats, text = correlations(rows, axes), settings.describe()
    report = dict(grid=record, losses=text["losses"], settings=dataclasses.asdict(settings))
    report.update(axes=list(axes), kendall=KENDALL, ties=TIES, models=len(rows), failed_runs=failed)
    report.update({m: {"definition": text[m], **stats[m]} for m in MEASURES})
    files.write_json(os.path.join(out, "correlation.json"), report)
    caption = f"Kendall τ ({KENDALL}; {TIES}) against the gap. " + ". ".join(
        f"{key.replace('_', ' ').capitalize()}: {value}" for key, value in text.items()
    )
    files.write_text(os.path.join(out, "correlation.md"), markdown_table(stats, axes, caption))
    with files.atomic_output(os.path.join(out, "correlation.csv")) as temporary:
        pandas.DataFrame(rows).to_csv(temporary, index=False)
    scatter_plots(out, rows, axes, stats)
    return markdown_table(stats, axes, caption)


def train_family(built: grid.Grid, data_bin: str, args, gpus, plans) -> Optional[Dict[str, tuple]]:
    """launch's train stage for the runs left to train: here, or a job each (table4's --launcher);
    {run: outcome}, None while Slurm jobs are out (without --wait a run's job goes once)."""
    todo = [run for run in built.runs() if plans[run.name] is not None]  # launch.check_runs
    outcomes = {run.name: ("done", "") for run in built.runs()}
    if args.launcher == "slurm" and not args.wait:
        for run in list(todo):
            run_dir = built.run_dir(run)
            if os.path.exists(os.path.join(run_dir, launch.JOB_RECORD)):
                failure = files.read_json_object(os.path.join(run_dir, launch.FAILURE_RECORD))
                outcomes[run.name] = ("failed", failure["error"]) if failure else ("out", "")
                todo.remove(run)
        if todo:
            launch.launch_jobs(built, todo, data_bin, None, args)
        return None if todo or ("out", "") in outcomes.values() else outcomes
    if todo and args.launcher == "local":
        outcomes.update(launch.launch_local(built, todo, data_bin, None, gpus))
    elif todo:
        outcomes.update(launch.launch_jobs(built, todo, data_bin, None, args))
    return outcomes


def family_rows(built: grid.Grid, data_bin: str, settings, scales, outcomes) -> Tuple[list, list]:
    """(CSV rows, failed runs) of the trained runs, measured; a failed one is left out."""
    rows, failed = [], []
    for run in built.runs():
        try:
            status, why = outcomes[run.name]
            if status != "done":
                raise ExperimentError(f"{run.name}: {status} in training: {why}")
            logger.info("measuring %s", run.name)
            checkpoint = os.path.join(built.run_dir(run), LAST_CHECKPOINT)
            measured = measure_model(checkpoint, data_bin, settings, scales)
        except ExperimentError as error:
            logger.error("%s", error)
            failed.append({"run": run.name, "error": str(error)})
            continue
        rows += [{"run": run.name, "optimizer": run.row, **dict(run.swept), **r} for r in measured]
    return rows, failed


def parse_scales(text: str) -> Tuple[float, ...]:
    """`--rescaled-copies 0.25,4`: the scales (> 0, not 1); argparse reports a ValueError."""
    scales = tuple(float(v) for v in text.split(","))
    if not all(math.isfinite(a) and a > 0 and a != 1 for a in scales):
        raise ValueError(text)
    return scales


def work(args: argparse.Namespace) -> int:
    settings = Settings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)})
    for f in dataclasses.fields(Settings):  # before any training
        if f.type is not str and not 0 < getattr(settings, f.name) < math.inf:
            raise SettingError(f"--{f.name.replace('_', '-')} must be a finite number > 0")
    built = build_grid(args)
    gpus = table4.check_launcher(args, built)
    if args.launcher == "local" or args.wait:  # else it measures when run again, maybe elsewhere
        from .sharpness import check_device  # imports torch: not at the top, for --help

        check_device(settings.device)
    archive, data_bin = table4.locate_data(args, built)  # <out>/data/<named by its content>
    grid.check_options_known(built, data_bin)
    plans = launch.check_runs(built, data_bin)  # a changed setting is refused before any work
    table4.prepare_data(built, archive, data_bin)
    files.write_json(os.path.join(built.out_dir, grid.GRID_RECORD), built.record())
    outcomes = train_family(built, data_bin, args, gpus, plans)
    if outcomes is None:
        logger.info("jobs out: run this again once they end (delete job.json to resubmit a run)")
        return 0
    if any(status == "interrupted" for status, _ in outcomes.values()):
        raise launch.Interrupted("interrupted (Ctrl-C): the family resumes when run again")
    rows, failed = family_rows(built, data_bin, settings, args.rescaled_copies, outcomes)
    if len({row["run"] for row in rows}) < 2:
        raise ExperimentError(f"fewer than 2 models measured ({len(failed)} failed): no τ")
    axes = axes_of(built) + ([SCALE_AXIS] if args.rescaled_copies else [])
    print(write_outputs(built.out_dir, rows, axes, settings, built.record(), failed))
    return 1 if failed else 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROGRAM, description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=PRESETS, default="tiny", help="configs/correlation/")
    p.add_argument("--out", required=True, help="the family's folder (a rerun resumes)")
    p.add_argument("--archive", help="IWSLT'14 de-en.tgz (default: the tiny preset's sample)")
    p.add_argument("--data-bin", help="already binarized IWSLT'14 de-en data (no preparation)")
    p.add_argument("--sweep", action="append", metavar="OPTION=V1,V2", help="replaces the preset's")
    p.add_argument("--max-update", type=int, help="every model's budget (default: the preset's)")
    for f in dataclasses.fields(Settings):
        flag, kind = "--" + f.name.replace("_", "-"), type(f.default)
        p.add_argument(flag, type=kind, default=f.default, help=f.metadata["help"])
    copies = dict(type=parse_scales, const=DEFAULT_SCALES, default=(), metavar="A,..")
    text = f"add each model's FFN-rescaled copies (A default: {DEFAULT_SCALES})"
    p.add_argument("--rescaled-copies", nargs="?", help=text, **copies)
    return table4.add_launcher_flags(p)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    return cli.run_command(PROGRAM, lambda: work(args))
