"""Table 4 of Kwon et al. (ICML 2021), IWSLT'14 De->En: the grid of runs, from data to report.

    <out>/grid.json                   what this grid is: preset, protocol (--checkpoint),
                                      optimizers, seeds, the training settings per row
    <out>/data/                       the preparation's work folder (data-bin inside)
    <out>/runs/<row>-seed<k>/         one run: command.txt, training.json, train.log,
                                      checkpoints/, generate-{valid,test}.txt, results.json,
                                      failure.json (if its last attempt failed), run.lock,
                                      run.holder (these names: experiments.layout);
                                      <row> is the optimizer's row (adam, asam, asam_interval5...)
                                      and, in a sweep, its swept values: asam-rho0.1-eta0.01
    <out>/submitit/                   the jobs' files under --launcher slurm / submitit-local
                                      (experiments.cluster)
    <out>/report/                     table4.md, table4.csv, plots (experiments.report)

Settings come from the fairseq-train argument files in configs/ (`TABLE4_PRESETS` says which): the
recipe, then the preset's overrides, then the optimizer's file, then the checkpoint protocol's
file (`--checkpoint`: best-bleu trains with in-training validation BLEU and selects by it), then
what the run itself sets (data, --save-dir, --seed, --user-dir).

Every stage records the settings it ran with, and a re-run compares them with the current ones
before anything starts:

* training (`training.json`: every fairseq-train option but --save-dir/--user-dir, and the data:
  its folder and `data_content`, a hash of what the folder holds; the data is prepared before
  that is compared, and --archive always goes through the preparation's step records):
  the same settings and finished -> skipped; the same and interrupted -> resumed from
  checkpoint_last.pt (one at --max-update already: marked finished, not resumed, since
  fairseq-train takes an update before it checks the budget); only --max-update raised ->
  continued from checkpoint_last.pt to the new budget; anything else changed -> the grid
  refuses to start, with one line naming what changed (a run is never silently reused, nor
  silently thrown away);
* evaluation (`results.json` -> `evaluation`: protocol, beam, references and data with their
  content, and the version of every checkpoint file it read): redone unless its fingerprint
  matches and every split (valid, test) is scored;
* adaptive sharpness (`--sharpness-rho`): redone when the evaluation or ρ changed.

Sweeps (`GridConfig.sweep`, `--rho 0.05,0.1 --eta 0.01,0.1`): one row per value of every
optimizer that takes it (SWEEPABLE), named after its values (`asam-rho0.1-eta0.01`); the values are
fairseq-train options of its runs, so in their settings and fingerprints.  The runs can also go
to jobs, on Slurm or submitit's local executor: experiments.cluster.

A run folder is locked (`layout.run_lock`) while a launcher works on it: a second launcher skips
it and says so.  A failure of one run — any exception, a trainer killed by a signal — is written to
its `failure.json` and the grid goes on; the report is written with what finished.  Ctrl-C
starts no new run or stage, stops the running children (SIGINT, then SIGKILL after a grace
period), writes the report and leaves every run resumable.  On GPUs the runs go one per GPU in
parallel (CUDA_VISIBLE_DEVICES); on a CPU one after the other.
"""

import datetime
import decimal
import itertools
import logging
import math
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from . import evaluation, prepare, recipe, report, synthetic_data
from .errors import ExperimentError, SettingError
from .files import read_json_object, write_json, write_text
from .layout import (
    CHECKPOINTS_FOLDER,
    COMMAND_FILE,
    FAILURE_RECORD,
    GRID_RECORD,
    RUNS_FOLDER,
    TRAIN_LOG,
    TRAINING_RECORD,
    RunLocked,
    plugin_dir,
    run_lock,
)

logger = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "sam", "asam")
# Cheaper schedules beyond the paper (configs/iwslt14_de_en/<name>.args): rows on request only.
SCHEDULE_ROWS = ("asam_interval5", "asam_looksam5", "asam_late")
DATA_FOLDER = "data"
SHARPNESS_JSON, SHARPNESS_LOG = "sharpness.json", "sharpness.log"
DATA_BIN_NAME = os.path.join("data-bin", prepare.PREP_NAME)
# fairseq-train options that name where a run writes, not how it trains.
RUN_LOCATION_FLAGS = ("--save-dir", "--user-dir")
SEED_FLAG, BUDGET_FLAG = "--seed", "--max-update"
DATA_SETTING = "data"
# What the data folder holds (evaluation.data_identity): the same path may hold other data.
DATA_CONTENT_SETTING = "data_content"
# Ctrl-C: how long the children get to exit after SIGINT before they are killed.
STOP_GRACE_SECONDS = 60.0
POLL_SECONDS = 0.5
INTERRUPTED_STATUS = 130  # the shell's status for a program ended by SIGINT
# The adaptive sharpness runs as fairseq-asam-sharpness in its own process, on the run's GPU.
SHARPNESS_COMMAND = (sys.executable, "-m", "fairseq_asam_experiments", "sharpness")


@dataclass(frozen=True)
class SampleArchive:
    """A generated de-en.tgz in the real IWSLT'14 layout (synthetic_data.build_sample_archive)."""

    n_train: int
    n_dev: int
    seed: int = 1


@dataclass(frozen=True)
class Table4Preset:
    name: str
    args_files: Tuple[str, ...]  # relative to the config folder, applied in order
    seeds: Tuple[int, ...]
    bpe_merges: int
    checkpoint: str  # the default protocol, evaluation.parse_checkpoint_choice
    description: str
    sample_archive: Optional[SampleArchive] = None  # data when no --archive is given
    # OMP_NUM_THREADS for runs on a CPU (unless set already): a tiny model is many times faster
    # on one thread than on threads that compete with each other or with other processes.
    cpu_threads: Optional[int] = None


TABLE4_PRESETS = {
    "paper": Table4Preset(
        "paper",
        (recipe.RECIPE_ARGS,),
        seeds=(1, 2, 3),
        bpe_merges=prepare.DEFAULT_BPE_MERGES,
        checkpoint=evaluation.DEFAULT_CHECKPOINT,
        description="Table 4 as published: needs --archive (the IWSLT'14 de-en.tgz) and GPUs",
    ),
    "tiny": Table4Preset(
        "tiny",
        (recipe.RECIPE_ARGS, recipe.TINY_OVERRIDES_ARGS),
        seeds=(1,),
        bpe_merges=500,
        checkpoint=evaluation.DEFAULT_CHECKPOINT,
        sample_archive=SampleArchive(n_train=2000, n_dev=40),
        cpu_threads=1,
        description="the same pipeline on a generated sample archive, a tiny Transformer, a CPU",
    ),
}


# Hyperparameters a grid can sweep (`--rho 0.05,0.1`, `--eta 0.01,0.1`): the fairseq-train flag
# of each, and the optimizers (the `--optimizer` of a row's argument file) that take it.
SWEEPABLE = {"rho": ("sam", "asam"), "eta": ("asam",)}


@dataclass(frozen=True)
class Run:
    optimizer: str  # the row's argument file: adam, sam, asam, asam_interval5, ...
    seed: int
    # Swept values of this row, in SWEEPABLE's order: (("rho", "0.1"), ("eta", "0.01")).
    hparams: Tuple[Tuple[str, str], ...] = ()

    @property
    def row(self) -> str:
        """The grid row: `asam`, or in a sweep `asam-rho0.1-eta0.01` (never a `-` in a value)."""
        return self.optimizer + "".join(f"-{name}{value}" for name, value in self.hparams)

    @property
    def name(self) -> str:
        return f"{self.row}-seed{self.seed}"

    def sweep_options(self) -> List[Tuple[str, Optional[str]]]:
        return [(f"--{name}", value) for name, value in self.hparams]


# --------------------------------------------------------------------------------------------
# Command-line values
# --------------------------------------------------------------------------------------------


def parse_optimizers(text: str) -> Tuple[str, ...]:
    choices = ",".join(OPTIMIZERS + SCHEDULE_ROWS)
    if not text.strip():
        raise SettingError(f"--optimizers: empty list; choose from {choices}")
    names = tuple(name.strip() for name in text.split(","))
    unknown = [name for name in names if name not in OPTIMIZERS + SCHEDULE_ROWS]
    if unknown:
        raise SettingError(
            f"--optimizers: unknown {', '.join(map(repr, unknown))}; choose from {choices}"
        )
    if len(set(names)) != len(names):
        raise SettingError(f"--optimizers: {text!r} names an optimizer twice")
    return names


def sweep_value(number: float) -> str:
    """The text of a swept value, in the run's folder name and on its command line: positional
    notation, no exponent (so never a `-`): 0.05, 0.1, 0.00001, 2."""
    text = format(decimal.Decimal(repr(float(number))).normalize(), "f")
    return text


def parse_sweep(name: str, text: str) -> Tuple[str, ...]:
    """`--rho 0.05,0.1` -> ("0.05", "0.1"): finite numbers, > 0 for rho, >= 0 for eta."""
    flag = f"--{name}"
    parts = [part.strip() for part in text.split(",")]
    values = []
    for part in parts:
        try:
            number = float(part)
        except ValueError:
            raise SettingError(
                f"{flag} must be a comma-separated list of numbers, got {text!r}"
            ) from None
        lowest_ok = number > 0 if name == "rho" else number >= 0
        if not (math.isfinite(number) and lowest_ok):
            bound = "> 0" if name == "rho" else ">= 0"
            raise SettingError(f"{flag}: every value must be a finite number {bound}, got {part!r}")
        values.append(sweep_value(number))
    twice = sorted({v for v in values if values.count(v) > 1})
    if twice:
        raise SettingError(f"{flag}: {text!r} names {', '.join(twice)} twice")
    return tuple(values)


def parse_seeds(text: str) -> Tuple[int, ...]:
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() and int(part) >= 1 for part in parts):
        raise SettingError(f"--seeds must be a comma-separated list of integers >= 1, got {text!r}")
    seeds = tuple(int(part) for part in parts)
    if len(set(seeds)) != len(seeds):
        raise SettingError(f"--seeds: {text!r} names a seed twice")
    return seeds


# --------------------------------------------------------------------------------------------
# fairseq-train commands and their settings
# --------------------------------------------------------------------------------------------


def train_command(
    data_bin: str,
    run_dir: str,
    run: Run,
    options: Sequence[Tuple[str, Optional[str]]],
    overrides: Sequence[Tuple[str, Optional[str]]] = (),
) -> List[str]:
    own = [
        ("--save-dir", os.path.join(run_dir, CHECKPOINTS_FOLDER)),
        (SEED_FLAG, str(run.seed)),
        ("--user-dir", plugin_dir()),
    ]
    return [sys.executable, "-m", "fairseq_cli.train", data_bin] + recipe.merge_options(
        options, overrides, own
    )


def settings_of_command(command: Sequence[str]) -> Dict[str, Optional[str]]:
    """{flag: value or None} of a fairseq-train command built by `train_command`, and its data
    folder; without the flags that only say where the run writes."""
    arguments = list(command[3:])
    settings: Dict[str, Optional[str]] = {DATA_SETTING: arguments[0]}
    index = 1
    while index < len(arguments):
        flag = arguments[index]
        has_value = index + 1 < len(arguments) and not arguments[index + 1].startswith("--")
        value = arguments[index + 1] if has_value else None
        if flag not in RUN_LOCATION_FLAGS:
            settings[flag] = value
        index += 2 if has_value else 1
    return settings


def training_settings_of(command: Sequence[str]) -> Dict[str, Optional[str]]:
    """The settings a run records and is compared by: its command's (`settings_of_command`)
    and what its data folder holds (None while the data is not prepared)."""
    settings = settings_of_command(command)
    settings[DATA_CONTENT_SETTING] = evaluation.data_identity(settings[DATA_SETTING])
    return settings


def recipe_fingerprint(settings: Dict[str, Optional[str]]) -> str:
    """The fingerprint of a run's training settings without its seed: the same for every seed
    of one row of the grid (the report takes only results with the current one)."""
    return evaluation.fingerprint({k: v for k, v in settings.items() if k != SEED_FLAG})


def describe_changes(old: Dict[str, Optional[str]], new: Dict[str, Optional[str]]) -> List[str]:
    """`--max-update 20 → 30`, `--eval-bleu added`, ... for every setting that differs."""

    def shown(value: Optional[str]) -> str:
        return "(switch)" if value is None else value

    changes = []
    for key in list(old) + [k for k in new if k not in old]:
        if key not in new:
            changes.append(f"{key} {shown(old[key])} removed")
        elif key not in old:
            changes.append(f"{key} {shown(new[key])} added")
        elif old[key] != new[key]:
            changes.append(f"{key} {shown(old[key])} → {shown(new[key])}")
    return changes


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------------


@dataclass
class GridConfig:
    out_dir: str
    preset: Table4Preset
    optimizers: Tuple[str, ...] = OPTIMIZERS
    seeds: Optional[Tuple[int, ...]] = None  # None: the preset's
    archive: Optional[str] = None
    data_bin: Optional[str] = None
    max_update: Optional[int] = None
    amp: bool = False  # fairseq's --amp: fp32 weights (ε survives: docs/mixed-precision.md)
    eval_bleu: bool = False
    checkpoint: Optional[str] = None  # the protocol; None: the preset's
    sharpness_rho: Optional[float] = None  # also measure the adaptive sharpness at this ρ
    config_dir: Optional[str] = None  # None: the installed configs (recipe.config_dir())
    gpus: Optional[List[str]] = None  # None: every visible GPU
    # Sweeps: {"rho": ("0.05", "0.1"), "eta": (...)} (parse_sweep); each value a row of every
    # optimizer that takes it (SWEEPABLE), the rows of several swept names their product.
    sweep: Optional[Dict[str, Tuple[str, ...]]] = None

    def base_optimizer(self, row: str) -> Optional[str]:
        """The `--optimizer` of a row's argument file (asam for asam_interval5)."""
        return dict(self.training_options(row)).get("--optimizer")

    def row_hparams(self, optimizer: str) -> List[Tuple[Tuple[str, str], ...]]:
        """The swept values of each row of `optimizer`: [()] without a sweep that applies."""
        base = self.base_optimizer(optimizer)
        names = [n for n in SWEEPABLE if (self.sweep or {}).get(n) and base in SWEEPABLE[n]]
        return [
            tuple(zip(names, values))
            for values in itertools.product(*[self.sweep[n] for n in names])
        ]

    @property
    def rows(self) -> List[Run]:
        """One Run (seed 0) per row of the grid, in order."""
        return [Run(o, 0, h) for o in self.optimizers for h in self.row_hparams(o)]

    @property
    def runs(self) -> List[Run]:
        return [Run(r.optimizer, s, r.hparams) for r in self.rows for s in self.seed_list]

    @property
    def seed_list(self) -> Tuple[int, ...]:
        return self.seeds or self.preset.seeds

    @property
    def protocol(self) -> evaluation.CheckpointChoice:
        return evaluation.parse_checkpoint_choice(self.checkpoint or self.preset.checkpoint)

    @property
    def default_data_bin(self) -> str:
        return os.path.join(self.out_dir, DATA_FOLDER, DATA_BIN_NAME)

    @property
    def data_bin_path(self) -> str:
        """Where the grid's binarized data is (or will be once prepared), absolute."""
        return os.path.abspath(
            self.data_bin if self.data_bin is not None else self.default_data_bin
        )

    def run_dir(self, run: Run) -> str:
        return os.path.join(self.out_dir, RUNS_FOLDER, run.name)

    def gpu_ids(self) -> List[str]:
        return self.gpus if self.gpus is not None else visible_gpus()

    def overrides(self) -> List[Tuple[str, Optional[str]]]:
        options = []
        if self.max_update is not None:
            options.append((BUDGET_FLAG, str(self.max_update)))
        if self.amp:
            options.append(("--amp", None))
        return options

    def training_options(self, optimizer: str) -> List[Tuple[str, Optional[str]]]:
        return recipe.training_options(
            self.preset.args_files,
            optimizer,
            self.eval_bleu,
            self.config_dir,
            selection_metric=self.protocol.selection_metric,
        )

    def command(self, run: Run, data_bin: Optional[str] = None) -> List[str]:
        return train_command(
            data_bin or self.data_bin_path,
            self.run_dir(run),
            run,
            self.training_options(run.optimizer),
            self.overrides() + run.sweep_options(),
        )

    def training_settings(self, run: Run) -> Dict[str, Optional[str]]:
        return training_settings_of(self.command(run))


def visible_gpus() -> List[str]:
    """CUDA_VISIBLE_DEVICES entries of the GPUs torch sees (indices if the variable is unset)."""
    import torch

    count = torch.cuda.device_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip()][:count]
    return [str(i) for i in range(count)]


def known_rows(config: GridConfig) -> List[str]:
    """Every row whose argument file exists in the config folder."""
    folder = config.config_dir or recipe.config_dir()
    return [
        name
        for name in OPTIMIZERS + SCHEDULE_ROWS
        if os.path.isfile(os.path.join(folder, recipe.OPTIMIZER_ARGS.format(optimizer=name)))
    ]


# --------------------------------------------------------------------------------------------
# What a run needs: its plan
# --------------------------------------------------------------------------------------------

# Plan actions
TRAIN, RESUME, EXTEND, EVALUATE, DONE = "train", "resume", "extend", "evaluate", "done"


@dataclass
class RunPlan:
    run: Run
    action: str
    reason: str = ""
    conflict: Optional[str] = None  # the settings changes that forbid reusing the run


def _has_checkpoints(run_dir: str) -> bool:
    folder = os.path.join(run_dir, CHECKPOINTS_FOLDER)
    return os.path.isdir(folder) and any(n.endswith(".pt") for n in os.listdir(folder))


def _budget(settings: Dict[str, Optional[str]]) -> Optional[int]:
    value = settings.get(BUDGET_FLAG)
    return int(value) if value is not None and value.isdigit() else None


def plan_training(config: GridConfig, run: Run) -> RunPlan:
    """What the run's training needs, from its training.json and the current settings."""
    run_dir = config.run_dir(run)
    record = read_json_object(os.path.join(run_dir, TRAINING_RECORD))
    current = config.training_settings(run)
    recorded = dict(record.get("settings", {})) if record is not None else {}
    if current.get(DATA_CONTENT_SETTING) is None:
        # Not prepared yet: compared once it is (run_grid checks again then).
        current.pop(DATA_CONTENT_SETTING, None)
        recorded.pop(DATA_CONTENT_SETTING, None)
    if record is None:
        if _has_checkpoints(run_dir):
            return RunPlan(
                run, TRAIN, conflict=f"has checkpoints but no {TRAINING_RECORD}: settings unknown"
            )
        return RunPlan(run, TRAIN, "training")
    changes = describe_changes(recorded, current)
    if changes:
        old, new = _budget(recorded), _budget(current)
        only_budget = all(change.startswith(BUDGET_FLAG + " ") for change in changes)
        if only_budget and old is not None and new is not None and new > old:
            return RunPlan(
                run, EXTEND, f"{BUDGET_FLAG} {old} → {new}: continuing from checkpoint_last.pt"
            )
        return RunPlan(run, TRAIN, conflict="trained with other settings: " + "; ".join(changes))
    if record.get("status") != "finished":
        return RunPlan(run, RESUME, "interrupted earlier: resuming from checkpoint_last.pt")
    return RunPlan(run, EVALUATE, "trained")


def sharpness_settings(config: GridConfig, evaluation_fingerprint: str) -> Optional[Dict]:
    if config.sharpness_rho is None:
        return None
    settings = {
        "rho": config.sharpness_rho,
        "measures": ["adaptive"],
        "evaluation": evaluation_fingerprint,
    }
    return {**settings, "fingerprint": evaluation.fingerprint(settings)}


def plan_run(config: GridConfig, run: Run, references: Dict[str, str]) -> RunPlan:
    """The training plan, or for a trained run whether its evaluation and sharpness are done."""
    plan = plan_training(config, run)
    if plan.action != EVALUATE or plan.conflict:
        return plan
    run_dir = config.run_dir(run)
    results = evaluation.read_results(os.path.join(run_dir, evaluation.RESULTS_NAME))
    try:
        settings = evaluation.evaluation_settings(
            config.data_bin_path,
            os.path.join(run_dir, CHECKPOINTS_FOLDER),
            config.protocol,
            references=references,
        )
    except ExperimentError as error:  # e.g. a checkpoint missing: the evaluation will say
        return RunPlan(run, EVALUATE, f"to evaluate ({error})")
    if not evaluation.evaluation_done(results, settings):
        return RunPlan(run, EVALUATE, "to evaluate")
    wanted = sharpness_settings(config, settings["fingerprint"])
    if wanted and results.get("sharpness_settings", {}).get("fingerprint") != wanted["fingerprint"]:
        return RunPlan(run, EVALUATE, "to measure its sharpness")
    if results.get("training", {}).get("fingerprint") != evaluation.fingerprint(
        config.training_settings(run)
    ):
        return RunPlan(run, EVALUATE, "to record its settings")
    return RunPlan(run, DONE, f"done ({evaluation.RESULTS_NAME} is current)")


def training_conflicts(config: GridConfig) -> List[str]:
    """One entry per kind of change: `adam-seed1, asam-seed1 trained with other settings:
    --max-update 30 → 20`."""
    grouped: Dict[str, List[str]] = {}
    for run in config.runs:
        try:
            plan = plan_training(config, run)
        except ExperimentError:  # an unreadable training.json: that run's failure, not the grid's
            continue
        if plan.conflict:
            grouped.setdefault(plan.conflict, []).append(run.name)
    return [
        f"{names[0] if len(names) == 1 else ', '.join(names)} {why}"
        for why, names in grouped.items()
    ]


def check_grid(config: GridConfig, jobs_have_gpus: Optional[bool] = None) -> None:
    """Every check that needs no work, so that bad input fails before anything starts.

    `jobs_have_gpus`: the runs go to jobs (experiments.cluster) that have GPUs or not; None:
    they run here, on this machine's GPUs."""
    if config.max_update is not None and config.max_update < 1:
        raise SettingError(f"--max-update must be >= 1, got {config.max_update}")
    evaluation.parse_checkpoint_choice(config.checkpoint or config.preset.checkpoint)
    for optimizer in config.optimizers:
        config.training_options(optimizer)
        check_epochs_kept(config, optimizer)
    for name, values in (config.sweep or {}).items():
        if name not in SWEEPABLE:
            raise SettingError(
                f"--{name}: not a hyperparameter the grid sweeps ({', '.join(SWEEPABLE)})"
            )
        takers = [o for o in config.optimizers if config.base_optimizer(o) in SWEEPABLE[name]]
        if values and not takers:
            raise SettingError(
                f"--{name}: no row of --optimizers ({','.join(config.optimizers)}) takes it; "
                f"it applies to --optimizer {' and '.join(SWEEPABLE[name])} and the rows built "
                "on them"
            )
    if config.data_bin is not None:
        evaluation.check_data_bin(config.data_bin)
    elif config.archive is not None:
        if not os.path.isfile(config.archive):
            raise SettingError(f"--archive: file not found: {config.archive}")
    elif config.preset.sample_archive is None and not os.path.isdir(config.default_data_bin):
        raise SettingError(
            f"--archive is required for --preset {config.preset.name} (the IWSLT'14 de-en.tgz), "
            f"unless {config.default_data_bin} exists or --data-bin is given"
        )
    if config.sharpness_rho is not None and not (
        math.isfinite(config.sharpness_rho) and config.sharpness_rho > 0
    ):
        raise SettingError(
            f"--sharpness-rho must be a finite number > 0, got {config.sharpness_rho}"
        )
    if config.amp and jobs_have_gpus is None and not config.gpu_ids():
        raise SettingError("--amp needs a GPU, and none is visible")
    if config.amp and jobs_have_gpus is False:
        raise SettingError("--amp needs a GPU, and the jobs get none (--gpus-per-job 0)")
    refuse_preparing_over_trained_data(config)
    refuse_conflicts(config)


KEEP_EPOCHS_FLAG, NO_EPOCH_CHECKPOINTS_FLAG = "--keep-last-epochs", "--no-epoch-checkpoints"


def check_epochs_kept(config: GridConfig, optimizer: str) -> None:
    """`--checkpoint average:N` averages the last N epoch checkpoints: the row's training must
    keep that many (--keep-last-epochs >= N, epoch checkpoints on)."""
    protocol = config.protocol
    if protocol.kind != "average":
        return
    options = dict(config.training_options(optimizer))
    files = recipe.training_files(
        config.preset.args_files, optimizer, config.eval_bleu, protocol.selection_metric
    )
    folder = config.config_dir or recipe.config_dir()
    if NO_EPOCH_CHECKPOINTS_FLAG in options:
        source = recipe.option_source(files, NO_EPOCH_CHECKPOINTS_FLAG, folder)
        raise SettingError(
            f"--checkpoint {protocol} averages epoch checkpoints, and {source} sets "
            f"{NO_EPOCH_CHECKPOINTS_FLAG} (row {optimizer})"
        )
    kept = options.get(KEEP_EPOCHS_FLAG)
    if kept is None or not kept.lstrip("-").isdigit() or int(kept) < 0:
        return  # fairseq's default -1: every epoch checkpoint is kept
    if int(kept) < protocol.num_epochs:
        source = recipe.option_source(files, KEEP_EPOCHS_FLAG, folder)
        raise SettingError(
            f"--checkpoint {protocol} needs the last {protocol.num_epochs} epoch checkpoints, "
            f"and {source} sets {KEEP_EPOCHS_FLAG} {kept} (row {optimizer}): use --checkpoint "
            f"average:{kept} or less, or raise {KEEP_EPOCHS_FLAG} there"
        )


def refuse_conflicts(config: GridConfig) -> None:
    """Raises SettingError, in one line, if a run of the grid was trained with other settings."""
    conflicts = training_conflicts(config)
    if conflicts:
        raise SettingError(
            f"{os.path.join(config.out_dir, RUNS_FOLDER)}: "
            + "; ".join(conflicts)
            + ". Re-run with the settings they were trained with, delete those run folders, "
            "or give another --out"
        )


def grid_record(config: GridConfig) -> Dict:
    """grid.json: what the report of this grid takes (preset, protocol, each row's settings).

    `recipe_fingerprints`: the training settings (without the seed) of every row of the grid and
    of every row the config folder has, as the grid would train them now; `row_settings`: those
    settings of the config folder's rows, so that the report can check a sweep row of another
    grid in the same folder (its swept values put over its row's settings).
    """
    fingerprints, row_settings = {}, {}
    for run in [Run(row, 1) for row in known_rows(config)] + config.rows:
        probe = Run(run.optimizer, 1, run.hparams)
        settings = config.training_settings(probe)
        fingerprints[probe.row] = recipe_fingerprint(settings)
        if not probe.hparams:
            row_settings[probe.row] = {k: v for k, v in settings.items() if k != SEED_FLAG}
    return {
        "preset": config.preset.name,
        "protocol": str(config.protocol),
        "optimizers": list(config.optimizers),
        "rows": [run.row for run in config.rows],
        "sweep": {name: list(values) for name, values in (config.sweep or {}).items() if values},
        "seeds": list(config.seed_list),
        "max_update": config.max_update,
        "sharpness_rho": config.sharpness_rho,
        "recipe_fingerprints": fingerprints,
        "row_settings": row_settings,
        "written": _now(),
    }


def refuse_preparing_over_trained_data(config: GridConfig) -> None:
    """Raises SettingError, before any work, if the preparation this grid would run replaces a
    data-bin in <out>/data that runs of this folder were trained on with other data (another
    --archive, or a preset with other BPE merges): their data would change under them, and under
    a launcher using it right now.

    The archive the data-bin was prepared from passes: the same file (same real path and size),
    or the same archive moved (same size and modification time); the preparation is then a
    no-op.  A preparation that left no record cannot tell, and the runs' data_content is
    checked after it (refuse_conflicts)."""
    if config.data_bin is not None:
        return
    data_bin = os.path.abspath(config.default_data_bin)
    workdir = os.path.join(config.out_dir, DATA_FOLDER)
    prepared = prepare.prepared_settings(workdir)
    if prepared is None or evaluation.missing_data_files(data_bin):
        return
    other_merges = prepared.get("bpe_merges") not in (None, config.preset.bpe_merges)
    archive = config.archive
    if archive is not None:
        size, mtime = os.path.getsize(archive), os.stat(archive).st_mtime_ns
        recorded = prepared.get("archive")
        same_file = recorded is not None and os.path.realpath(recorded) == os.path.realpath(archive)
        same_archive = prepared.get("archive_bytes", size) == size and (
            same_file or prepared.get("archive_mtime_ns") == mtime
        )
        if same_archive and not other_merges:
            return
    elif not other_merges:
        return  # the data-bin is used as it is (prepare_data)
    trained = trained_on(config, data_bin)
    if not trained:
        return
    if archive is not None:
        change = f"preparing --archive {archive} ({config.preset.bpe_merges} BPE merges) there"
        fix = "Give another --out, or --archive with the archive it was prepared from"
    else:
        change = (
            f"preparing it again with --preset {config.preset.name}'s "
            f"{config.preset.bpe_merges} BPE merges"
        )
        fix = "Give another --out, or the preset it was prepared for"
    raise SettingError(
        f"{data_bin} was prepared from {prepared.get('archive')} "
        f"({prepared.get('bpe_merges')} BPE merges) and {', '.join(trained)} trained on it; "
        f"{change} would change their data. {fix}"
    )


def trained_on(config: GridConfig, data_bin: str) -> List[str]:
    """The run folders of this output folder whose training.json names `data_bin` as data."""
    runs = os.path.join(config.out_dir, RUNS_FOLDER)
    names = []
    for name in sorted(os.listdir(runs)) if os.path.isdir(runs) else []:
        try:
            record = read_json_object(os.path.join(runs, name, TRAINING_RECORD))
        except ExperimentError:
            record = None  # unreadable: its own run's failure; it says nothing of the data
        data = ((record or {}).get("settings") or {}).get(DATA_SETTING)
        if data and os.path.realpath(data) == os.path.realpath(data_bin):
            names.append(name)
    return names


def prepare_data(config: GridConfig) -> str:
    """The binarized data: --data-bin, or prepared in <out>/data.

    With --archive the preparation always runs: its step records make it a no-op for the
    archive it prepared last, and redo what another archive changes.  Without, a data-bin in
    <out>/data is used as it is unless its preparation recorded another number of BPE merges
    than the preset's; it is then prepared again from the archive it recorded (or the preset's
    sample archive).  The runs' settings hold what the data-bin holds (data_content), so a run
    of other data is refused, never reused."""
    if config.data_bin is not None:
        return os.path.abspath(config.data_bin)
    data_bin = os.path.abspath(config.default_data_bin)
    workdir = os.path.join(config.out_dir, DATA_FOLDER)
    archive = config.archive
    if archive is None and not evaluation.missing_data_files(data_bin):
        prepared = prepare.prepared_settings(workdir) or {}
        merges = prepared.get("bpe_merges")
        if merges is None or merges == config.preset.bpe_merges:
            logger.info(f"data: using {data_bin} (delete it to prepare again)")
            return data_bin
        logger.info(
            f"data: {data_bin} has {merges} BPE merges, --preset {config.preset.name} "
            f"{config.preset.bpe_merges}: preparing it again"
        )
        recorded = prepared.get("archive")
        if recorded and os.path.isfile(recorded):
            archive = recorded
        elif config.preset.sample_archive is None:
            raise SettingError(
                f"--archive: {data_bin} was prepared with {merges} BPE merges, --preset "
                f"{config.preset.name} needs {config.preset.bpe_merges}, and its archive "
                f"{recorded} is gone: give --archive"
            )
    if archive is None:
        sample = config.preset.sample_archive
        os.makedirs(workdir, exist_ok=True)
        archive = synthetic_data.build_sample_archive(
            os.path.join(workdir, prepare.ARCHIVE_NAME),
            n_train=sample.n_train,
            n_dev=sample.n_dev,
            seed=sample.seed,
        )
        logger.info(f"data: built the sample archive {archive}")
    logger.info(f"data: preparing {archive} into {workdir}")
    return os.path.abspath(
        prepare.prepare_iwslt14(archive, workdir, bpe_merges=config.preset.bpe_merges)
    )


def reference_files(data_bin: str) -> Dict[str, str]:
    """Untokenized references `{split}.raw.en` written by the preparation, where they exist."""
    tokenized = os.path.join(os.path.dirname(os.path.dirname(data_bin)), prepare.PREP_NAME)
    found = {}
    for split in evaluation.EVALUATED_SPLITS:
        for folder in (os.path.join(tokenized, "tmp"), tokenized):
            path = os.path.join(folder, f"{split}.raw.{prepare.TARGET_LANG}")
            if os.path.isfile(path):
                found[split] = path
                break
    return found


# --------------------------------------------------------------------------------------------
# Children: every process the grid starts, so that Ctrl-C can stop them
# --------------------------------------------------------------------------------------------


class RunInterrupted(Exception):
    """The grid is stopping (Ctrl-C): the run stopped where it was, resumable."""


class Supervisor:
    """Starts the grid's child processes and stops them all on request.

    `call` refuses to start a child once `stop()` was called; `stop()` sends SIGINT to the
    running ones (the signal a terminal's Ctrl-C sends), waits up to `grace` seconds and kills
    what is left, and returns when every child has exited.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._children: List[subprocess.Popen] = []
        self.stopping = threading.Event()

    def call(
        self,
        command: Sequence[str],
        stdout,
        env: Optional[Dict[str, str]] = None,
    ) -> int:
        with self._lock:
            if self.stopping.is_set():
                raise RunInterrupted("not started: the grid is stopping")
            child = subprocess.Popen(
                list(command), stdout=stdout, stderr=subprocess.STDOUT, env=env
            )
            self._children.append(child)
        try:
            returncode = child.wait()
        finally:
            with self._lock:
                self._children.remove(child)
        if self.stopping.is_set() and returncode != 0:
            raise RunInterrupted(f"stopped ({evaluation.exit_description(returncode)})")
        return returncode

    def running(self) -> List[subprocess.Popen]:
        with self._lock:
            return list(self._children)

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        with self._lock:
            self.stopping.set()
            children = list(self._children)
        for child in children:
            if child.poll() is None:
                logger.info(f"stopping child {child.pid} (SIGINT)")
                child.send_signal(signal.SIGINT)
        deadline = time.monotonic() + grace
        try:
            for child in children:
                remaining = max(0.0, deadline - time.monotonic())
                try:
                    child.wait(timeout=remaining)
                except subprocess.TimeoutExpired:
                    pass
        except KeyboardInterrupt:  # a second Ctrl-C: no more waiting
            logger.warning("second Ctrl-C: killing the children")
        for child in children:
            if child.poll() is None:
                logger.warning(f"child {child.pid} did not stop within {grace:.0f} s: killing it")
                child.kill()
                child.wait()


# --------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------


def run_environment(preset: Table4Preset, gpu: Optional[str]) -> Dict[str, str]:
    """Environment variables a run sets: its GPU, or on a CPU the preset's thread count."""
    if gpu is not None:
        return {"CUDA_VISIBLE_DEVICES": gpu}
    if preset.cpu_threads is not None and "OMP_NUM_THREADS" not in os.environ:
        return {"OMP_NUM_THREADS": str(preset.cpu_threads)}
    return {}


@dataclass
class Progress:
    stage: str = "plan"


def record_failure(run_dir: str, run: Run, stage: str, error: BaseException) -> str:
    """failure.json in the run folder; returns the one-line message."""
    message = " ".join(str(error).splitlines()) or type(error).__name__
    if not isinstance(error, ExperimentError):
        message = f"{type(error).__name__}: {message}"
    os.makedirs(run_dir, exist_ok=True)
    write_json(
        os.path.join(run_dir, FAILURE_RECORD),
        {
            "run": run.name,
            "stage": stage,
            "error": message,
            "type": type(error).__name__,
            "traceback": "".join(
                traceback.format_exception(type(error), error, error.__traceback__)
            ),
            "time": _now(),
        },
    )
    return message


def train(
    config: GridConfig,
    run: Run,
    command: List[str],
    command_line: str,
    env: Dict[str, str],
    supervisor: Supervisor,
) -> None:
    """fairseq-train, appending to train.log; resumes from checkpoint_last.pt if there is one.

    training.json says `running` (with the settings) before the trainer starts and `finished`
    once it exited with status 0; results.json, made from older checkpoints, goes first.
    """
    run_dir = config.run_dir(run)
    settings = training_settings_of(command)
    record = {
        "run": run.name,
        "settings": settings,
        "fingerprint": evaluation.fingerprint(settings),
        "recipe_fingerprint": recipe_fingerprint(settings),
        "command": command_line,
        "status": "running",
        "started": _now(),
    }
    results_path = os.path.join(run_dir, evaluation.RESULTS_NAME)
    if os.path.exists(results_path):
        os.unlink(results_path)  # its checkpoints are about to change
    write_text(os.path.join(run_dir, COMMAND_FILE), command_line + "\n")
    write_json(os.path.join(run_dir, TRAINING_RECORD), record)
    log_path = os.path.join(run_dir, TRAIN_LOG)
    with open(log_path, "a", encoding="utf-8") as log:
        returncode = supervisor.call(command, stdout=log, env=env)
    if returncode != 0:
        how = "was killed by" if returncode < 0 else "failed with"
        raise ExperimentError(
            f"fairseq-train {how} {evaluation.exit_description(returncode)}; see {log_path}"
        )
    write_json(
        os.path.join(run_dir, TRAINING_RECORD), {**record, "status": "finished", "finished": _now()}
    )


def checkpoint_updates(path: str) -> Optional[int]:
    """The update count fairseq saved a checkpoint at (None if the file cannot tell)."""
    if not os.path.isfile(path):
        return None
    try:
        return evaluation.checkpoint_position(path)["num_updates"]
    except (ExperimentError, OSError, KeyError, TypeError, ValueError):
        return None


def finished_at_budget(config: GridConfig, run: Run) -> bool:
    """For a run to resume: if its checkpoint_last.pt is at --max-update already (the launcher
    was killed after fairseq-train's last save), marks training.json finished and returns True.
    fairseq-train resumed there would take one update beyond the budget before it stops."""
    run_dir = config.run_dir(run)
    record = read_json_object(os.path.join(run_dir, TRAINING_RECORD)) or {}
    budget = _budget(record.get("settings", {}))
    last = os.path.join(run_dir, CHECKPOINTS_FOLDER, evaluation.LAST_CHECKPOINT)
    updates = checkpoint_updates(last)
    if budget is None or updates is None or updates < budget:
        return False
    logger.info(
        f"{run.name}: {evaluation.LAST_CHECKPOINT} is at {updates} updates, {BUDGET_FLAG} "
        f"{budget}: training had finished; not resumed"
    )
    write_json(
        os.path.join(run_dir, TRAINING_RECORD),
        {**record, "status": "finished", "finished": _now(), "finished_by": "checkpoint_last.pt"},
    )
    return True


def measure_sharpness(
    config: GridConfig,
    run: Run,
    checkpoint: str,
    data_bin: str,
    env: Dict[str, str],
    gpu: Optional[str],
    supervisor: Supervisor,
) -> Dict:
    """fairseq-asam-sharpness on the evaluated checkpoint, in its own process on the run's GPU
    (CUDA_VISIBLE_DEVICES=<gpu>, device cuda:0 there); returns its JSON report."""
    run_dir = config.run_dir(run)
    json_path = os.path.join(run_dir, SHARPNESS_JSON)
    command = [
        *SHARPNESS_COMMAND,
        checkpoint,
        data_bin,
        "--rho",
        repr(config.sharpness_rho),
        "--measures",
        "adaptive",
        "--device",
        "cuda:0" if gpu is not None else "cpu",
        "--json",
        json_path,
    ]
    if os.path.exists(json_path):
        os.unlink(json_path)
    log_path = os.path.join(run_dir, SHARPNESS_LOG)
    with open(log_path, "w", encoding="utf-8") as log:
        returncode = supervisor.call(command, stdout=log, env=env)
    if returncode != 0 or not os.path.isfile(json_path):
        raise ExperimentError(
            f"fairseq-asam-sharpness failed with {evaluation.exit_description(returncode)}; "
            f"see {log_path}"
        )
    return read_json_object(json_path)


def execute_run(
    config: GridConfig,
    run: Run,
    data_bin: str,
    references: Dict[str, str],
    gpu: Optional[str],
    supervisor: Optional[Supervisor] = None,
    progress: Optional[Progress] = None,
) -> str:
    """Trains (or resumes, or continues) and evaluates one run, under its lock; returns its
    results.json.  Raises RunLocked if another launcher works on it."""
    supervisor = supervisor or Supervisor()
    progress = progress or Progress()
    run_dir = config.run_dir(run)
    os.makedirs(run_dir, exist_ok=True)
    with run_lock(run_dir):
        # Planned again under the lock: another launcher may have finished it meanwhile.
        plan = plan_run(config, run, references)
        if plan.conflict:
            raise ExperimentError(f"{run.name} {plan.conflict}")
        if plan.action == DONE:
            logger.info(f"{run.name}: {plan.reason}")
            return os.path.join(run_dir, evaluation.RESULTS_NAME)
        command = config.command(run, data_bin)
        settings = run_environment(config.preset, gpu)
        env = {**os.environ, **settings}
        command_line = " ".join(
            [f"{k}={shlex.quote(v)}" for k, v in settings.items()] + [shlex.join(command)]
        )
        where = f"GPU {gpu}" if gpu is not None else "CPU"
        if plan.action == RESUME and finished_at_budget(config, run):
            plan = RunPlan(run, EVALUATE, "trained")
        if plan.action in (TRAIN, RESUME, EXTEND):
            progress.stage = "train"
            logger.info(f"{run.name}: {plan.reason} on {where}")
            train(config, run, command, command_line, env, supervisor)
        if supervisor.stopping.is_set():
            raise RunInterrupted("trained; not evaluated (the grid is stopping)")
        progress.stage = "evaluate"
        results_path = os.path.join(run_dir, evaluation.RESULTS_NAME)
        save_dir = os.path.join(run_dir, CHECKPOINTS_FOLDER)
        settings_now = evaluation.evaluation_settings(
            data_bin, save_dir, config.protocol, references=references
        )
        results = evaluation.read_results(results_path)
        if not evaluation.evaluation_done(results, settings_now):
            evaluation.drop_evaluation(results_path)  # a failed redo leaves no stale scores
            logger.info(f"{run.name}: evaluating --checkpoint {config.protocol} on {where}")
            scores = evaluation.evaluate_checkpoint(
                data_bin,
                save_dir,
                plugin_dir(),
                config.protocol,
                references=references,
                output_dir=run_dir,
                env=env,
                call=supervisor.call,
            )
            results = evaluation.write_results(results_path, scores)
        training = read_json_object(os.path.join(run_dir, TRAINING_RECORD)) or {}
        results = evaluation.update_results(
            results_path,
            {
                "run": run.name,
                "optimizer": run.optimizer,
                "row": run.row,
                "hparams": dict(run.hparams),
                "seed": run.seed,
                "preset": config.preset.name,
                "data_bin": data_bin,
                "train_command": training.get("command", command_line),
                "training": {
                    "fingerprint": training.get("fingerprint"),
                    "recipe_fingerprint": training.get("recipe_fingerprint"),
                    "settings": training.get("settings"),
                },
            },
        )
        wanted = sharpness_settings(config, results["evaluation"]["fingerprint"])
        if (
            wanted
            and results.get("sharpness_settings", {}).get("fingerprint") != wanted["fingerprint"]
        ):
            if supervisor.stopping.is_set():
                raise RunInterrupted("evaluated; sharpness not measured (the grid is stopping)")
            progress.stage = "sharpness"
            evaluation.drop_results(results_path, evaluation.DEPENDENT_KEYS)  # of another ρ
            logger.info(f"{run.name}: measuring adaptive sharpness at rho={config.sharpness_rho}")
            measured = measure_sharpness(
                config, run, results["checkpoint"]["path"], data_bin, env, gpu, supervisor
            )
            evaluation.update_results(
                results_path, {"sharpness": measured, "sharpness_settings": wanted}
            )
        failure = os.path.join(run_dir, FAILURE_RECORD)
        if os.path.exists(failure):
            os.unlink(failure)
        logger.info(f"{run.name}: done, {results_path}")
        return results_path


# --------------------------------------------------------------------------------------------
# Every run
# --------------------------------------------------------------------------------------------


@dataclass
class RunOutcome:
    run: Run
    status: str  # "done", "failed", "interrupted", "locked", "cancelled"
    message: str = ""


class GridFailed(ExperimentError):
    """Some runs failed; the report (`outputs`) was written with the others."""

    def __init__(self, message: str, outputs: Dict[str, str]):
        super().__init__(message)
        self.outputs = outputs


class GridInterrupted(GridFailed):
    """Ctrl-C: the grid stopped; every run is resumable."""

    exit_status = INTERRUPTED_STATUS


def guarded_run(
    config: GridConfig,
    run: Run,
    data_bin: str,
    references: Dict[str, str],
    gpu: Optional[str],
    supervisor: Supervisor,
) -> RunOutcome:
    """execute_run, with whatever goes wrong kept to this run (and recorded in its folder)."""
    if supervisor.stopping.is_set():
        return RunOutcome(run, "cancelled", "not started (Ctrl-C)")
    progress = Progress()
    try:
        execute_run(config, run, data_bin, references, gpu, supervisor, progress)
        return RunOutcome(run, "done")
    except RunLocked as error:
        logger.warning(f"{run.name}: skipped, {error}")
        return RunOutcome(run, "locked", str(error))
    except (RunInterrupted, KeyboardInterrupt) as error:
        logger.warning(f"{run.name}: interrupted in {progress.stage} ({error}); resumable")
        return RunOutcome(run, "interrupted", str(error))
    except BaseException as error:  # any failure of one run stays that run's
        if supervisor.stopping.is_set():
            logger.warning(f"{run.name}: interrupted in {progress.stage} ({error}); resumable")
            return RunOutcome(run, "interrupted", str(error))
        message = record_failure(config.run_dir(run), run, progress.stage, error)
        logger.error(f"{run.name}: failed in {progress.stage}: {message}")
        return RunOutcome(run, "failed", f"{progress.stage}: {message}")


def run_grid(config: GridConfig, supervisor: Optional[Supervisor] = None) -> Dict[str, str]:
    """Data -> every run of the grid -> report; returns the report's files.

    Raises GridFailed (after writing the report) if a run failed, GridInterrupted on Ctrl-C.
    """
    check_grid(config)
    supervisor = supervisor or Supervisor()
    gpus = config.gpu_ids()
    os.makedirs(config.out_dir, exist_ok=True)
    write_json(os.path.join(config.out_dir, GRID_RECORD), grid_record(config))
    outcomes: Dict[Run, RunOutcome] = {}
    interrupted = False
    try:
        data_bin = prepare_data(config)
        refuse_conflicts(config)  # with what the data-bin holds now
        write_json(os.path.join(config.out_dir, GRID_RECORD), grid_record(config))
        references = reference_files(data_bin)
        pending = []
        for run in config.runs:
            try:
                plan = plan_run(config, run, references)
            except ExperimentError:  # e.g. a corrupt results.json: that run's failure, below
                pending.append(run)
                continue
            if plan.action == DONE:
                logger.info(f"{run.name}: skipped, {plan.reason}")
                outcomes[run] = RunOutcome(run, "done")
            else:
                pending.append(run)
        logger.info(
            f"{len(pending)} of {len(config.runs)} runs to do (--checkpoint {config.protocol}), "
            f"on {len(gpus) or 'no'} GPU(s)"
        )
        interrupted = _run_pending(
            config, pending, data_bin, references, gpus, supervisor, outcomes
        )
    except KeyboardInterrupt:  # during the data preparation or the planning
        interrupted = True
        supervisor.stop()
    outputs = report.write_report(config.out_dir)
    failed = [o for o in outcomes.values() if o.status == "failed"]
    if interrupted:
        stopped = [
            o.run.name for o in outcomes.values() if o.status in ("interrupted", "cancelled")
        ]
        raise GridInterrupted(
            "interrupted (Ctrl-C): "
            + (f"{', '.join(stopped)} stopped; " if stopped else "")
            + "every run is resumable: run the same command again to continue",
            outputs,
        )
    if failed:
        raise GridFailed(
            f"{len(failed)} run(s) failed: "
            + "; ".join(f"{o.run.name}: {o.message}" for o in failed)
            + f" (report written with the others; see each run's {FAILURE_RECORD})",
            outputs,
        )
    return outputs


def _run_pending(
    config: GridConfig,
    pending: List[Run],
    data_bin: str,
    references: Dict[str, str],
    gpus: List[str],
    supervisor: Supervisor,
    outcomes: Dict[Run, RunOutcome],
) -> bool:
    """Runs `pending` one per GPU (or one at a time); True if Ctrl-C stopped them."""
    devices: "queue.Queue[Optional[str]]" = queue.Queue()
    for device in gpus or [None]:
        devices.put(device)

    def on_free_device(run: Run) -> RunOutcome:
        device = devices.get()
        try:
            return guarded_run(config, run, data_bin, references, device, supervisor)
        finally:
            devices.put(device)

    pool = ThreadPoolExecutor(max_workers=max(1, len(gpus)))
    futures: Dict[Future, Run] = {pool.submit(on_free_device, run): run for run in pending}
    try:
        remaining = set(futures)
        while remaining:
            finished, remaining = wait(remaining, timeout=POLL_SECONDS, return_when=FIRST_COMPLETED)
            for future in finished:
                outcomes[futures[future]] = future.result()
        return False
    except KeyboardInterrupt:
        logger.warning(
            "Ctrl-C: starting no new run; stopping the running ones (SIGINT, then SIGKILL after "
            f"{STOP_GRACE_SECONDS:.0f} s); they resume when the grid runs again"
        )
        for future in futures:
            future.cancel()
        supervisor.stop()
        for future, run in futures.items():
            if future.cancelled():
                outcomes[run] = RunOutcome(run, "cancelled", "not started (Ctrl-C)")
                continue
            try:
                outcomes[run] = future.result()
            except KeyboardInterrupt:  # a second Ctrl-C while the workers wind down
                supervisor.stop(grace=0)
                outcomes[run] = future.result()
        return True
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
