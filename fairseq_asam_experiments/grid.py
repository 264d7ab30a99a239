"""A grid of fairseq-train runs: rows × combinations of swept values × seeds, each run's command,
and grid.json (`Grid.record`); `<out>/runs/<run>/` is one run (launch).

A run's options, a later one replacing an earlier: the argument files of configs/ (the preset's,
the row's `iwslt14_de_en/<row>.args`, the checkpoint protocol's, --eval-bleu's), the grid's
--max-update and --amp, the run's swept values, then --save-dir, --seed, --user-dir.  A sweep is
any fairseq-train option (`--sweep lr=5e-4,1e-3`); ρ and η only on rows whose optimizer takes
them (`SWEEP_TAKERS`).  Run names hold no exponent: `asam-lr0.001-rho0.1-seed1`.
"""

import decimal
import itertools
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from . import evaluation, recipe
from .errors import SettingError
from .recipe import Option

OPTIMIZERS = ("adam", "sam", "asam")
SCHEDULE_ROWS = ("asam_interval5", "asam_looksam5", "asam_late")  # beyond the paper
RUNS_FOLDER, GRID_RECORD, CHECKPOINTS_FOLDER = "runs", "grid.json", "checkpoints"
BUDGET_FLAG, SEED_FLAG = "--max-update", "--seed"
# Options a sweep may not take: the grid sets them by its own flags.
NOT_SWEPT = {"max-update": "--max-update", "seed": "--seeds", "save-dir": "--out"}
# The optimizers (the `--optimizer` of a row's file) that take an option; others: every row.
SWEEP_TAKERS = {"rho": ("sam", "asam"), "eta": ("asam",)}
WORD_VALUE = re.compile(r"^[A-Za-z0-9_.]+$")  # a non-numeric swept value (it names folders)


@dataclass(frozen=True)
class Preset:
    name: str
    args_files: Tuple[str, ...]  # relative to the config folder, applied in order
    seeds: Tuple[int, ...]
    bpe_merges: int
    description: str
    sample_archive: Optional[Tuple[int, int]] = None  # (train, dev) pairs generated if no data
    # OMP_NUM_THREADS of runs on a CPU (unless set): a tiny model is many times faster on one.
    cpu_threads: Optional[int] = None
    checkpoint: str = "best-bleu"  # the default protocol (evaluation.parse_checkpoint_choice)


PAPER = "Table 4 as published: needs --archive (the IWSLT'14 de-en.tgz) and GPUs"
TINY = "the same pipeline on a generated sample archive, a tiny Transformer, a CPU"
PRESETS = {
    "paper": Preset("paper", (recipe.RECIPE_ARGS,), (1, 2, 3), 10000, PAPER),
    "tiny": Preset(
        "tiny", (recipe.RECIPE_ARGS, recipe.TINY_OVERRIDES_ARGS), (1,), 500, TINY, (2000, 40), 1
    ),
}


def sweep_value(text: str, option: str) -> str:
    """A swept value as it goes on the command line and in the run's name: a number in
    positional notation (5e-4 -> 0.0005, 1024.0 -> 1024), or a word of [A-Za-z0-9_.]."""
    try:
        number = decimal.Decimal(text)
    except decimal.InvalidOperation:
        if WORD_VALUE.match(text):
            return text
        word = "a word of [A-Za-z0-9_.]"
        raise SettingError(f"--sweep {option}: {text!r} is neither a number nor {word}") from None
    if not number.is_finite():
        raise SettingError(f"--sweep {option}: {text!r} is not a finite number")
    return format(number.normalize(), "f")


@dataclass(frozen=True)
class Sweep:
    option: str  # a fairseq-train option without its dashes: lr, dropout, rho...
    values: Tuple[str, ...]


def parse_sweep(text: str) -> Sweep:
    """`lr=5e-4,1e-3` (also `--lr=...`) -> Sweep("lr", ("0.0005", "0.001"))."""
    option, equals, values = text.partition("=")
    option = option.strip().lstrip("-")
    if not equals or not option or not values.strip():
        raise SettingError(f"--sweep takes OPTION=V1,V2,... (e.g. lr=5e-4,1e-3), got {text!r}")
    if option in NOT_SWEPT:
        raise SettingError(f"--sweep {option}: set it with {NOT_SWEPT[option]}")
    parsed = tuple(sweep_value(v.strip(), option) for v in values.split(","))
    if len(set(parsed)) != len(parsed):
        raise SettingError(f"--sweep {option}: {values!r} names a value twice")
    if option == "rho" and any(decimal.Decimal(v) <= 0 for v in parsed):
        raise SettingError(f"--sweep rho: every value must be > 0, got {values!r}")
    return Sweep(option, parsed)


def parse_seeds(text: str) -> Tuple[int, ...]:
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() and int(part) >= 1 for part in parts):
        raise SettingError(f"--seeds must be a comma-separated list of integers >= 1, got {text!r}")
    if len(set(parts)) != len(parts):
        raise SettingError(f"--seeds: {text!r} names a seed twice")
    return tuple(int(part) for part in parts)


def parse_rows(text: str) -> Tuple[str, ...]:
    """`--optimizers adam,asam`: rows of the grid, each an argument file of configs/."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    known = OPTIMIZERS + SCHEDULE_ROWS
    unknown = [name for name in names if name not in known]
    if not names or unknown:
        raise SettingError(f"--optimizers: got {text!r}; choose from {','.join(known)}")
    if len(set(names)) != len(names):
        raise SettingError(f"--optimizers: {text!r} names an optimizer twice")
    return names


@dataclass(frozen=True)
class Run:
    row: str  # the row's argument file: adam, sam, asam, asam_interval5...
    seed: int
    swept: Tuple[Tuple[str, str], ...] = ()  # (option, value) in the grid's sweep order

    @property
    def label(self) -> str:
        """The row with its swept values, `asam-lr0.001-rho0.1`: one line of the report."""
        return self.row + "".join(f"-{o.replace('-', '_')}{v}" for o, v in self.swept)

    @property
    def name(self) -> str:
        return f"{self.label}-seed{self.seed}"


@dataclass
class Grid:
    out_dir: str
    preset: Preset
    rows: Tuple[str, ...] = OPTIMIZERS
    seeds: Optional[Tuple[int, ...]] = None  # None: the preset's
    sweeps: Tuple[Sweep, ...] = ()
    max_update: Optional[int] = None
    amp: bool = False  # fairseq's --amp: fp32 weights (ε survives: docs/mixed-precision.md)
    eval_bleu: bool = False
    checkpoint: Optional[str] = None  # the protocol; None: the preset's
    sharpness_rho: Optional[float] = None  # also measure the adaptive sharpness at this ρ
    config_dir: Optional[str] = None  # None: the installed configs (recipe.config_dir())
    _options: Dict[str, List[Option]] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.seeds = self.seeds or self.preset.seeds

    @property
    def protocol(self) -> "evaluation.CheckpointChoice":
        return evaluation.parse_checkpoint_choice(self.checkpoint or self.preset.checkpoint)

    def row_options(self, row: str) -> List[Option]:
        """The options of a row's argument files (read once), before overrides and sweeps."""
        if row not in self._options:
            metric = self.protocol.selection_metric
            files = self.preset.args_files, row, self.eval_bleu, self.config_dir, metric
            self._options[row] = recipe.training_options(*files)
        return self._options[row]

    def optimizer_of(self, row: str) -> Optional[str]:
        """The `--optimizer` of a row (asam for asam_interval5)."""
        return dict(self.row_options(row)).get("--optimizer")

    def takes(self, row: str, sweep: Sweep) -> bool:
        takers = SWEEP_TAKERS.get(sweep.option)  # None: every row
        return takers is None or self.optimizer_of(row) in takers

    def runs(self) -> List[Run]:
        """Each row × every combination of the sweeps it takes × the seeds."""
        runs = []
        for row in self.rows:
            sweeps = [s for s in self.sweeps if self.takes(row, s)]
            for values in itertools.product(*[s.values for s in sweeps]):
                swept = tuple(zip([s.option for s in sweeps], values))
                runs += [Run(row, seed, swept) for seed in self.seeds]
        return runs

    def run_dir(self, run: Run) -> str:
        return os.path.join(self.out_dir, RUNS_FOLDER, run.name)

    def options(self, run: Run) -> List[Option]:
        """Every fairseq-train option of `run` but its data folder and where it writes."""
        grid = [(BUDGET_FLAG, str(self.max_update))] if self.max_update is not None else []
        grid += [("--amp", None)] if self.amp else []
        swept = [(f"--{option}", value) for option, value in run.swept]
        merged = {**dict(self.row_options(run.row)), **dict(grid), **dict(swept)}  # later wins
        return [*merged.items(), (SEED_FLAG, str(run.seed))]

    def settings(self, run: Run, data_bin: str) -> Dict[str, Optional[str]]:
        """What the run is, for its training stamp: {flag: value or None for a switch}; the
        data relative to the output folder when inside it (a moved folder keeps its runs)."""
        data, out = os.path.abspath(data_bin), os.path.abspath(self.out_dir)
        data = os.path.relpath(data, out) if data.startswith(out + os.sep) else data
        return {"data": data, **dict(self.options(run))}

    def command(self, run: Run, data_bin: str) -> List[str]:
        save_dir = os.path.join(self.run_dir(run), CHECKPOINTS_FOLDER)
        own = [("--save-dir", save_dir), ("--user-dir", recipe.plugin_dir())]
        argv = recipe.merge_options(self.options(run), own)
        return [sys.executable, "-m", "fairseq_cli.train", os.path.abspath(data_bin)] + argv

    def budget(self) -> Optional[int]:
        """The --max-update every run trains to, None if they differ."""
        values = {dict(self.options(run)).get(BUDGET_FLAG) for run in self.runs()}
        return int(values.pop()) if len(values) == 1 and None not in values else None

    def record(self) -> dict:
        """grid.json: what the report of this grid reads."""
        return {
            "preset": self.preset.name,
            "protocol": str(self.protocol),
            "rows": list(self.rows),
            "seeds": list(self.seeds),
            "sweeps": [
                dict(option=s.option, values=list(s.values), optimizers=SWEEP_TAKERS.get(s.option))
                for s in self.sweeps
            ],
            "max_update": self.budget(),
            "sharpness_rho": self.sharpness_rho,
            "runs": [run.name for run in self.runs()],
        }

    def check(self) -> None:
        """The checks that need no work: a bad flag fails before anything starts."""
        if self.max_update is not None and self.max_update < 1:
            raise SettingError(f"--max-update must be >= 1, got {self.max_update}")
        if self.sharpness_rho is not None and not self.sharpness_rho > 0:
            raise SettingError(f"--sharpness-rho must be a number > 0, got {self.sharpness_rho}")
        options = [s.option for s in self.sweeps]
        if len(set(options)) != len(options):
            raise SettingError(f"--sweep: an option is swept twice ({', '.join(options)})")
        for sweep in self.sweeps:
            if not any(self.takes(row, sweep) for row in self.rows):
                takers = " and ".join(SWEEP_TAKERS[sweep.option])
                raise SettingError(
                    f"--sweep {sweep.option}: no row of --optimizers ({','.join(self.rows)}) "
                    f"takes it; it applies to --optimizer {takers}"
                )
        protocol = self.protocol  # average:N: the rows must keep N epoch checkpoints
        for row in self.rows if protocol.kind == "average" else ():
            options = dict(self.row_options(row))
            kept = "0" if "--no-epoch-checkpoints" in options else options.get("--keep-last-epochs")
            if (kept or "").isdigit() and int(kept) < protocol.num_epochs:
                raise SettingError(
                    f"--checkpoint {protocol} averages the last {protocol.num_epochs} epoch "
                    f"checkpoints, and row {row}'s argument files keep {kept} "
                    "(--keep-last-epochs, --no-epoch-checkpoints)"
                )


def check_options_known(grid: Grid, data_bin: str) -> None:
    """Parses each row's command with fairseq-train's own parser (imports fairseq), so that a
    misspelt swept option fails in one line before any run starts."""
    from fairseq import options as fairseq_options

    import fairseq_asam  # noqa: F401  (registers --optimizer asam/sam and their options)

    for run in {run.label: run for run in grid.runs()}.values():
        parser = fairseq_options.get_training_parser()
        argv = grid.command(run, data_bin)[3:]
        try:
            _, unknown = fairseq_options.parse_args_and_arch(parser, argv, parse_known=True)
        except SystemExit:  # argparse printed why
            raise SettingError(f"fairseq-train refuses the options of {run.label}") from None
        if unknown:
            raise SettingError(
                f"fairseq-train does not know {' '.join(unknown)} (row {run.label}); "
                "check the --sweep option's name"
            )
