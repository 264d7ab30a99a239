"""Table 4 from the runs of experiments.runner: BLEU per optimizer, the paper's beside the paper
preset's, and plots.

Reads, for one or more output folders of the runner, `<out>/grid.json` (what the grid is: preset,
checkpoint protocol, optimizers, seeds, each row's training settings),
`<out>/runs/<optimizer>-seed<k>/results.json` (experiments.evaluation), `failure.json`,
`training.json` and `train.log` (fairseq-train with --log-format json; fairseq's
`... | valid | {...}` lines or hydra's `[...][valid][INFO] - {...}` lines), and writes into the
report folder:

* `table4.md`, `table4.csv`: per optimizer and protocol (`--checkpoint`, named in the title
  and on every row), mean ± sample standard deviation over seeds of: valid and test BLEU as
  fairseq-generate prints it (tokenized; assumed to be the paper's metric), detokenized
  sacreBLEU of the same output, the validation BLEU fairseq-train logged for the evaluated
  checkpoint (--eval-bleu, "in-training"), and the adaptive sharpness of the evaluated
  checkpoints where a results.json has a `sharpness` entry; each row's --max-update budget; the
  paper's numbers beside rows of the paper preset at its budget only (a line says why not for
  the others).  A mean over fewer seeds than the grid has says so (`n = 2 of 3`), and every run
  of the grid that has no result is listed with why (failed, and where; running elsewhere;
  interrupted; not started);
* `valid_loss.png`, `valid_bleu.png` (runs trained with --eval-bleu or --checkpoint best-bleu),
  `sharpness.png` (the `sharpness` SAM/ASAM log on their train_inner lines, and
  `sharpness_eval` where logged): one line per run against updates; the sharpness plot names
  each optimizer's ρ and neighbourhood, and the report says what the logged values are;
* for a ρ sweep (rows named `asam-rho0.1`, ...): `## BLEU against ρ` in table4.md,
  `bleu_vs_rho.csv` and `bleu_vs_rho.png` (mean ± sample std over seeds against ρ, and the ρ
  with the highest mean validation BLEU).

A table row is a grid row: an optimizer's row (adam, asam, asam_interval5, ...) and, in a sweep,
its swept values (results.json's `row`; the run folder's name without `-seed<k>`).  Of several
output folders, each folder's rows are its own (with its preset and folder named on the row, and
the folder on each run of the Runs table): two grids are never averaged into one row.

Only results that match their folder's grid are taken: the same preset and protocol, and
training settings equal to the ones the grid gives that row now (a run trained with another
--max-update is left out and listed).  Without grid.json (a folder made by hand) every complete
results.json is taken.
"""

import csv
import io
import json
import logging
import os
import re
import shlex
import statistics
import textwrap
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from . import recipe
from .errors import ExperimentError
from .evaluation import EVALUATED_SPLITS, RESULTS_NAME, evaluation_out_of_date
from .files import atomic_output, read_json_object, write_text
from .grid import CHECKPOINTS_FOLDER, GRID_RECORD, RUNS_FOLDER
from .launch import COMMAND_FILE, FAILURE_RECORD, JOB_RECORD, TRAIN_LOG, lock_holder

# TEMPORARY (branch launch, until the report helper's report.py is merged): layout.py is gone.
REPORT_FOLDER, TRAINING_RECORD = "report", "train.done.json"

logger = logging.getLogger(__name__)

RUN_NAME = re.compile(r"^(?P<optimizer>.+)-seed(?P<seed>\d+)$")
TABLE_MARKDOWN, TABLE_CSV = "table4.md", "table4.csv"


@dataclass(frozen=True)
class PaperRow:
    label: str
    valid_bleu: float
    test_bleu: float


# Kwon et al., "ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant Learning of
# Deep Neural Networks", ICML 2021, Table 4: IWSLT'14 De->En BLEU, Transformer, 3 runs.
PAPER_TABLE4 = {
    "adam": PaperRow("Adam", valid_bleu=35.34, test_bleu=34.86),
    "sam": PaperRow("Adam+SAM", valid_bleu=35.52, test_bleu=34.78),
    "asam": PaperRow("Adam+ASAM", valid_bleu=35.66, test_bleu=35.02),
}
# The paper's hyperparameters of those rows: a sweep row with these values is the paper's row.
PAPER_HPARAMS = {"adam": {}, "sam": {"rho": 0.1}, "asam": {"rho": 0.2, "eta": 0.01}}
SWEPT_NAMES = {"rho": "ρ", "eta": "η"}
# The preset of the paper's settings (experiments.runner.TABLE4_PRESETS): the only one whose
# rows are shown beside the paper's numbers, and only at the recipe's budget (paper_budget).
PAPER_PRESET = "paper"
BUDGET_FLAG = "--max-update"
# A row's swept values in its name (experiments.runner.Run.row): asam-rho0.1-eta0.01.
SWEPT_VALUE = re.compile(r"-(?P<name>rho|eta)(?P<value>\d[\d.]*(?:e[-+]?\d+)?)")
ROW_NAME = re.compile(r"^(?P<base>.+?)(?P<swept>(?:-(?:rho|eta)\d[\d.]*(?:e[-+]?\d+)?)*)$")
RHO_SWEEP_PNG, RHO_SWEEP_CSV = "bleu_vs_rho.png", "bleu_vs_rho.csv"


def parse_row(row: str) -> Tuple[str, Dict[str, str]]:
    """`asam-rho0.1-eta0.01` -> ("asam", {"rho": "0.1", "eta": "0.01"}); `adam` -> ("adam", {})."""
    match = ROW_NAME.match(row)
    if not match:
        return row, {}
    found = SWEPT_VALUE.findall(match.group("swept"))
    return match.group("base"), {name: value for name, value in found}


def paper_row(row: str) -> Optional[PaperRow]:
    """The paper's numbers for a row: its own, or a sweep row with the paper's values."""
    base, swept = parse_row(row)
    paper = PAPER_TABLE4.get(base)
    if paper is None:
        return None
    wanted = PAPER_HPARAMS.get(base, {})
    if all(name in wanted and float(value) == wanted[name] for name, value in swept.items()):
        return paper
    return None


def paper_budget() -> Optional[str]:
    """The paper preset's --max-update: the recipe's stopping rule (configs/README.md)."""
    options = recipe.read_args_file(os.path.join(recipe.config_dir(), recipe.RECIPE_ARGS))
    return dict(options).get(BUDGET_FLAG)


def protocol_description(protocol: str) -> str:
    """What a --checkpoint value evaluates, in one sentence."""
    if protocol == "best-bleu":
        return (
            "checkpoint_best.pt, the epoch with the highest validation BLEU during training "
            "(fairseq-train --eval-bleu: beam 5, BPE removed, Moses-detokenized sacreBLEU on "
            "valid; --best-checkpoint-metric bleu --maximize-best-checkpoint-metric), as "
            "fairseq's IWSLT'14 example trains; the valid column is then the score of a "
            "checkpoint chosen on valid itself"
        )
    if protocol == "best-loss":
        return (
            "checkpoint_best.pt, the epoch with the lowest validation loss "
            "(--best-checkpoint-metric loss, fairseq's default)"
        )
    if protocol == "last":
        return "checkpoint_last.pt, the end of training"
    if protocol.startswith("average:"):
        return (
            f"the parameter average of the last {protocol.split(':', 1)[1]} epoch checkpoints "
            "(fairseq's scripts/average_checkpoints.py)"
        )
    return protocol


# fairseq's simple/json log line, and the same record as logged under fairseq-hydra-train.
LOG_RECORD = re.compile(
    r"(?:\| (?P<tag>train_inner|valid|train) \| "
    r"|\]\[(?P<hydra_tag>train_inner|valid|train)\]\[\w+\] - )(?P<record>\{.*\})\s*$"
)
SHARPNESS_KEY, SHARPNESS_EVAL_KEY = "sharpness", "sharpness_eval"
SHARPNESS_PNG = "sharpness.png"
# (record tag, key of the x axis, key of the y axis, file, y label) of the validation plots.
PLOTS = (
    ("valid", "valid_num_updates", "valid_loss", "valid_loss.png", "validation loss (base 2)"),
    (
        "valid",
        "valid_num_updates",
        "valid_bleu",
        "valid_bleu.png",
        "validation BLEU (fairseq-train --eval-bleu, detokenized)",
    ),
)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def parse_train_log(path: str) -> Dict[str, List[dict]]:
    """The json records of a fairseq-train log by tag (train_inner, valid, train), values as floats.

    A resumed run logs some updates twice: the last record of an update number wins.
    """
    records: Dict[str, Dict[float, dict]] = {"train_inner": {}, "valid": {}, "train": {}}
    update_key = {
        "train_inner": "num_updates",
        "valid": "valid_num_updates",
        "train": "train_num_updates",
    }
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            match = LOG_RECORD.search(line)
            if not match:
                continue
            tag = match.group("tag") or match.group("hydra_tag")
            try:
                record = {k: _number(v) for k, v in json.loads(match.group("record")).items()}
            except json.JSONDecodeError:
                continue
            records[tag][record.get(update_key[tag], len(records[tag]))] = record
    return {tag: [by_update[u] for u in sorted(by_update)] for tag, by_update in records.items()}


def _read_record(path: str) -> Optional[dict]:
    """A run's record (training.json, failure.json, job.json) for its status: None if absent;
    an unreadable one as {"unreadable": why}, so that one broken file never stops a report."""
    try:
        return read_json_object(path)
    except ExperimentError as error:
        return {UNREADABLE: str(error)}


UNREADABLE = "unreadable"  # the entry of a record that could not be read (_read_record)


def run_directories(out_dir: str) -> List[str]:
    """The run folders under <out>/runs (none yet, e.g. interrupted in the data preparation:
    an empty list); an output folder that does not exist is an error."""
    if not os.path.isdir(out_dir):
        raise ExperimentError(f"output folder not found: {out_dir}")
    runs_dir = os.path.join(out_dir, RUNS_FOLDER)
    if not os.path.isdir(runs_dir):
        return []
    return sorted(os.path.join(runs_dir, n) for n in os.listdir(runs_dir) if RUN_NAME.match(n))


IN_TRAINING_BLEU = "in_training_valid_bleu"  # put on each loaded result (load_results)


def logged_valid_bleu(results: dict, log: Dict[str, List[dict]]) -> Optional[float]:
    """The validation BLEU fairseq-train logged (--eval-bleu) for the checkpoint `results`
    evaluated: the `valid` record at the update count it was saved at.  Not by its `epoch`: a
    checkpoint saved at an epoch's end records the epoch its iterator resumes with, the next
    one.  None where the run logged none, and for an average of several checkpoints (no
    validation scored it)."""
    checkpoint = results.get("checkpoint") or {}
    updates = checkpoint.get("num_updates")
    if updates is None or len(checkpoint.get("sources") or ()) > 1:
        return None
    for record in log["valid"]:
        if record.get("valid_num_updates") == updates:
            bleu = record.get("valid_bleu")
            return bleu if isinstance(bleu, float) else None
    return None


def load_results(out_dir: str) -> List[dict]:
    """Every results.json under <out>/runs, each with its `run_dir` and IN_TRAINING_BLEU."""
    results = []
    for run_dir in run_directories(out_dir):
        loaded = _read_record(os.path.join(run_dir, RESULTS_NAME))
        if loaded is not None:
            match = RUN_NAME.match(os.path.basename(run_dir))
            loaded.setdefault("optimizer", match.group("optimizer"))
            loaded.setdefault("row", loaded["optimizer"])
            loaded.setdefault("seed", int(match.group("seed")))
            log_path = os.path.join(run_dir, TRAIN_LOG)
            if UNREADABLE not in loaded and os.path.isfile(log_path):
                loaded[IN_TRAINING_BLEU] = logged_valid_bleu(loaded, parse_train_log(log_path))
            results.append({**loaded, "run_dir": run_dir})
    return results


def run_settings(run_dir: str) -> Dict[str, Optional[str]]:
    """The fairseq-train options a run was trained with: its training.json, else command.txt."""
    record = _read_record(os.path.join(run_dir, TRAINING_RECORD))
    if record and isinstance(record.get("settings"), dict):
        return record["settings"]
    path = os.path.join(run_dir, COMMAND_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        words = shlex.split(f.read())
    settings: Dict[str, Optional[str]] = {}
    for index, word in enumerate(words):
        if word.startswith("--"):
            following = words[index + 1] if index + 1 < len(words) else None
            settings[word] = None if following is None or following.startswith("--") else following
    return settings


def run_budget(results: dict) -> Optional[str]:
    """The --max-update a run trained with: its results.json's training settings, else its
    training.json or command.txt (run_settings)."""
    settings = (results.get("training") or {}).get("settings")
    if not isinstance(settings, dict) and "run_dir" in results:
        settings = run_settings(results["run_dir"])
    return (settings or {}).get(BUDGET_FLAG)


def adaptive_sharpness(results: dict) -> Optional[float]:
    """The run's measured adaptive sharpness: a number, or experiments.sharpness's report."""
    entry = results.get("sharpness")
    if isinstance(entry, (int, float)):
        return float(entry)
    if isinstance(entry, dict):
        for estimate in entry.get("estimates", []):
            if estimate.get("measure") == "adaptive":
                return float(estimate["sharpness"])
    return None


def is_complete(results: dict) -> bool:
    """Every split of Table 4 scored (a one-split results.json is not a result)."""
    return all(isinstance(results.get(s), dict) and "bleu" in results[s] for s in EVALUATED_SPLITS)


def results_protocol(results: dict) -> str:
    return results.get("protocol") or results.get("checkpoint", {}).get("choice", "–")


# --------------------------------------------------------------------------------------------
# What a grid's report takes
# --------------------------------------------------------------------------------------------


@dataclass
class RunStatus:
    """A run of a grid that has no result in the table, and why."""

    name: str
    protocol: str
    status: str
    out_dir: Optional[str] = None  # the output folder of its grid


@dataclass
class Selection:
    results: List[dict] = field(default_factory=list)  # taken into the table
    statuses: List[RunStatus] = field(default_factory=list)  # grid runs without a result
    left_out: List[Tuple[str, str]] = field(default_factory=list)  # (run, why) not of this grid
    grids: List[dict] = field(default_factory=list)
    run_dirs: List[str] = field(default_factory=list)  # runs whose logs are plotted


def _mismatch(results: dict, grid: dict) -> Optional[str]:
    """Why `results` is not a result of `grid` (None if it is)."""
    if UNREADABLE in results:
        return results[UNREADABLE]
    if not is_complete(results):
        missing = [s for s in EVALUATED_SPLITS if not isinstance(results.get(s), dict)]
        return f"results.json lacks {', '.join(missing)}"
    if "run_dir" in results and isinstance(results.get("evaluation"), dict):
        why = evaluation_out_of_date(results, os.path.join(results["run_dir"], CHECKPOINTS_FOLDER))
        if why:
            return f"evaluation out of date: {why}"
    if results.get("preset") != grid.get("preset"):
        return f"preset {results.get('preset')}, the grid's is {grid.get('preset')}"
    if results_protocol(results) != grid.get("protocol"):
        return f"--checkpoint {results_protocol(results)}, the grid's is {grid.get('protocol')}"
    if results.get("training", {}).get("recipe_fingerprint") != expected_fingerprint(
        grid, row_of(results)
    ):
        return "trained with other settings than the grid's (e.g. another --max-update)"
    return None


def _sharpness_of_grid(results: dict, grid: dict) -> bool:
    """Whether the sharpness in `results` was measured at the grid's ρ (--sharpness-rho) on
    the evaluation it holds now (a results.json without one: trivially)."""
    if "sharpness" not in results:
        return True
    settings = results.get("sharpness_settings") or {}
    rho = grid.get("sharpness_rho")
    return (
        rho is not None
        and settings.get("rho") == rho
        and settings.get("evaluation") == results.get("evaluation", {}).get("fingerprint")
    )


def row_of(results: dict) -> str:
    return results.get("row") or results["optimizer"]


def expected_fingerprint(grid: dict, row: str) -> Optional[str]:
    """The recipe fingerprint the grid gives `row` now: recorded for its rows and the config
    folder's; for a sweep row of another grid, its row's settings with the swept values."""
    from .evaluation import fingerprint

    recorded = grid.get("recipe_fingerprints", {}).get(row)
    if recorded is not None:
        return recorded
    base, swept = parse_row(row)
    settings = grid.get("row_settings", {}).get(base)
    if settings is None or not swept:
        return None
    return fingerprint({**settings, **{f"--{name}": value for name, value in swept.items()}})


def grid_budget(grid: dict, row: str) -> Optional[str]:
    """The --max-update the grid trains `row` with: its row's settings (an older grid.json:
    the grid's --max-update, None unless given)."""
    settings = grid.get("row_settings", {}).get(parse_row(row)[0]) or {}
    budget = settings.get(BUDGET_FLAG, grid.get("max_update"))
    return None if budget is None else str(budget)


def grid_rows(grid: dict) -> List[str]:
    """The rows of a grid."""
    return list(grid.get("rows", []))


def _status_of(run_dir: str, results: Optional[dict], why: Optional[str]) -> str:
    holder = lock_holder(run_dir) if os.path.isdir(run_dir) else None
    if holder:
        return f"in progress ({holder})"
    failure = _read_record(os.path.join(run_dir, FAILURE_RECORD))
    if failure and UNREADABLE in failure:
        return f"failed: {failure[UNREADABLE]}"
    if failure:
        return f"failed in {failure.get('stage', '?')}: {failure.get('error', '?')}"
    if results is not None and UNREADABLE in results:
        return f"failed: {results[UNREADABLE]}"
    training = _read_record(os.path.join(run_dir, TRAINING_RECORD))
    if training and UNREADABLE in training:
        return f"failed: {training[UNREADABLE]}"
    if results is not None and why:
        return f"not current: {why}"
    if training and training.get("status") != "finished":
        return "interrupted in training (resumable)"
    if training:
        return "trained, not evaluated"
    job = _read_record(os.path.join(run_dir, JOB_RECORD))  # experiments.cluster's
    if job and UNREADABLE not in job:
        return f"submitted as {job.get('launcher')} job {job.get('job_id')}, not started"
    return "not started"


def select_results(out_dir: str) -> Selection:
    """The results that belong to `out_dir`'s grid, and the state of its other runs."""
    grid = read_json_object(os.path.join(out_dir, GRID_RECORD))
    if grid is not None:
        grid = {**grid, "out_dir": out_dir}
    selection = Selection(grids=[grid] if grid else [])
    by_name = {
        os.path.basename(r["run_dir"]): {**r, "out_dir": out_dir} for r in load_results(out_dir)
    }
    if grid is None:
        selection.results = [r for r in by_name.values() if is_complete(r)]
        selection.left_out = [
            (n, r.get(UNREADABLE, "results.json lacks a split"))
            for n, r in by_name.items()
            if not is_complete(r)
        ]
        selection.run_dirs = run_directories(out_dir)
        return selection
    grid_runs = [f"{row}-seed{s}" for row in grid_rows(grid) for s in grid.get("seeds", [])]
    for name, results in sorted(by_name.items()):
        if not _sharpness_of_grid(results, grid):
            for key in ("sharpness", "sharpness_settings"):
                results.pop(key, None)
        why = _mismatch(results, grid)
        if why is None:
            selection.results.append(results)
            selection.run_dirs.append(results["run_dir"])
        elif name not in grid_runs:
            selection.left_out.append((name, why))
    for name in grid_runs:
        results = by_name.get(name)
        if results is not None and _mismatch(results, grid) is None:
            continue
        run_dir = os.path.join(out_dir, RUNS_FOLDER, name)
        why = _mismatch(results, grid) if results is not None else None
        selection.statuses.append(
            RunStatus(name, grid.get("protocol", "–"), _status_of(run_dir, results, why), out_dir)
        )
        if os.path.isfile(os.path.join(run_dir, TRAIN_LOG)):
            selection.run_dirs.append(run_dir)
    return selection


def combine(selections: Sequence[Selection]) -> Selection:
    combined = Selection()
    for s in selections:
        combined.results += s.results
        combined.statuses += s.statuses
        combined.left_out += s.left_out
        combined.grids += s.grids
        combined.run_dirs += s.run_dirs
    return combined


# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stat:
    mean: float
    std: Optional[float]  # sample standard deviation; None for a single value
    count: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Optional["Stat"]:
        values = [v for v in values if v is not None]
        if not values:
            return None
        std = statistics.stdev(values) if len(values) > 1 else None
        return cls(statistics.fmean(values), std, len(values))

    def format(self, digits: int = 2) -> str:
        if self.std is None:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


METRICS: Dict[str, Callable[[dict], Optional[float]]] = {
    "valid_bleu": lambda r: r.get("valid", {}).get("bleu"),
    "test_bleu": lambda r: r.get("test", {}).get("bleu"),
    "valid_sacrebleu": lambda r: r.get("valid", {}).get("sacrebleu"),
    "test_sacrebleu": lambda r: r.get("test", {}).get("sacrebleu"),
    IN_TRAINING_BLEU: lambda r: r.get(IN_TRAINING_BLEU),
    "adaptive_sharpness": adaptive_sharpness,
}


@dataclass
class OptimizerSummary:
    optimizer: str
    seeds: List[int]
    stats: Dict[str, Optional[Stat]]  # by METRICS key
    protocol: str = "–"
    grid_seeds: Optional[List[int]] = None  # the grid's --seeds for this row
    out_dir: Optional[str] = None  # the output folder (grid) of the row's runs
    preset: Optional[str] = None
    budget: Optional[str] = None  # --max-update: the grid's, else its runs' ("200, 300")

    @property
    def paper(self) -> Optional[PaperRow]:
        """The paper's numbers, for a row of the paper preset at the recipe's budget only."""
        if self.preset != PAPER_PRESET or self.budget != paper_budget():
            return None
        return paper_row(self.optimizer)

    @property
    def label(self) -> str:
        return optimizer_label(self.optimizer)

    @property
    def expected_seeds(self) -> Optional[int]:
        return None if self.grid_seeds is None else len(self.grid_seeds)

    @property
    def seeds_cell(self) -> str:
        """The seeds averaged; says which of the grid's seeds have no result, also when a seed
        trained earlier into the folder (outside --seeds) makes the count look complete."""
        seeds = ",".join(map(str, self.seeds)) or "–"
        missing = [s for s in self.grid_seeds or () if s not in self.seeds]
        if not missing:
            return seeds
        if set(self.seeds) <= set(self.grid_seeds):
            return f"{seeds} (n = {len(self.seeds)} of {self.expected_seeds})"
        return (
            f"{seeds} (n = {len(self.seeds)}; no result for seed {','.join(map(str, missing))} "
            f"of the grid's {','.join(map(str, self.grid_seeds))})"
        )


def optimizer_label(name: str) -> str:
    """`Adam+ASAM`, or for a sweep row `Adam+ASAM (ρ = 0.1, η = 0.01)`."""
    base, swept = parse_row(name)
    row = PAPER_TABLE4.get(base)
    label = row.label if row else base
    if swept:
        label += " (" + ", ".join(f"{SWEPT_NAMES[n]} = {v}" for n, v in swept.items()) + ")"
    return label


def optimizer_order(name: str):
    """The paper's rows first, then the others; a sweep's rows by their values."""
    base, swept = parse_row(name)
    known = list(PAPER_TABLE4)
    values = tuple((n, float(v)) for n, v in sorted(swept.items()))
    return (known.index(base), "", values) if base in known else (len(known), base, values)


def _grid_of(grids: Sequence[dict], out_dir: Optional[str]) -> Optional[dict]:
    return next((g for g in grids if g.get("out_dir") == out_dir), None)


def _grid_seeds(
    grids: Sequence[dict], protocol: str, optimizer: str, out_dir: Optional[str] = None
) -> Optional[List[int]]:
    for grid in grids:
        if (
            grid.get("out_dir") == out_dir
            and grid.get("protocol") == protocol
            and optimizer in grid_rows(grid)
        ):
            return list(grid.get("seeds", []))
    return None


def summarize_runs(results: Sequence[dict], grids: Sequence[dict] = ()) -> List[OptimizerSummary]:
    """Per output folder (grid), optimizer (in the paper's row order) and protocol: its seeds
    and the Stat of every metric; a row of a grid with no finished seed is there too (n = 0 of
    3).  Two folders are two grids (another preset, budget, data...): never one mean."""
    groups: Dict[Tuple[Optional[str], str, str], List[dict]] = {}
    for r in results:
        groups.setdefault((r.get("out_dir"), row_of(r), results_protocol(r)), []).append(r)
    for grid in grids:
        for optimizer in grid_rows(grid):
            groups.setdefault((grid.get("out_dir"), optimizer, grid.get("protocol", "–")), [])
    protocols, folders = [], []
    for folder, _, protocol in groups:
        if protocol not in protocols:
            protocols.append(protocol)
        if folder not in folders:
            folders.append(folder)

    def preset(folder: Optional[str], runs: List[dict]) -> Optional[str]:
        grid = _grid_of(grids, folder)
        if grid is not None:
            return grid.get("preset")
        return next((r.get("preset") for r in runs if r.get("preset")), None)

    def budget(folder: Optional[str], optimizer: str, runs: List[dict]) -> Optional[str]:
        grid = _grid_of(grids, folder)
        if grid is not None:
            return grid_budget(grid, optimizer)
        budgets = sorted({b for b in map(run_budget, runs) if b}, key=lambda b: (len(b), b))
        return ", ".join(budgets) or None

    return [
        OptimizerSummary(
            optimizer,
            sorted(r["seed"] for r in runs),
            {key: Stat.of([metric(r) for r in runs]) for key, metric in METRICS.items()},
            protocol,
            _grid_seeds(grids, protocol, optimizer, folder),
            folder,
            preset(folder, runs),
            budget(folder, optimizer, runs),
        )
        for (folder, optimizer, protocol), runs in sorted(
            groups.items(),
            key=lambda item: (
                optimizer_order(item[0][1]),
                protocols.index(item[0][2]),
                folders.index(item[0][0]),
            ),
        )
    ]


def _several_folders(results: Sequence[dict], grids: Sequence[dict], statuses=()) -> bool:
    folders = {r.get("out_dir") for r in results} | {g.get("out_dir") for g in grids}
    return len(folders | {s.out_dir for s in statuses}) > 1


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _cell(stat: Optional[Stat], digits: int = 2) -> str:
    return stat.format(digits) if stat else "–"


def _value(value: Optional[float], digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _updates(results: dict) -> str:
    """The update count of the evaluated checkpoint (an average: of its newest source)."""
    checkpoint = results.get("checkpoint", {})
    updates = checkpoint.get("num_updates")
    if updates is None:
        return "–"
    sources = checkpoint.get("sources") or []
    return f"≤ {updates} ({len(sources)} averaged)" if len(sources) > 1 else str(updates)


IN_TRAINING_COLUMN = "Valid BLEU (in-training)"
BUDGET_COLUMN = "Budget (--max-update)"


def score_captions() -> List[str]:
    """What each BLEU column is: three scores of two evaluations, named apart."""
    return [
        "Valid BLEU, Test BLEU: tokenized BLEU-4 as fairseq-generate prints it (beam 5, subword "
        "units removed, on the Moses-tokenized, lowercased text), assumed to be Table 4's metric "
        "(the paper does not name its BLEU that we know of; configs/README.md). Mean ± sample "
        "standard deviation over seeds; `n = k of m`: the mean is over the k seeds that finished "
        "(see Runs for the others).",
        "",
        "Valid sacreBLEU, Test sacreBLEU: the same fairseq-generate output, detokenized by this "
        "kit (sacremoses) and scored by case-insensitive sacreBLEU against the preparation's "
        "untokenized references.",
        "",
        f"{IN_TRAINING_COLUMN}: the `valid_bleu` fairseq-train logged (--eval-bleu) at the update "
        "the evaluated checkpoint was saved at, the score `--checkpoint best-bleu` selects by. "
        "Detokenized sacreBLEU too, but of fairseq's own validation pass, not of "
        "fairseq-generate's output: fairseq's batching, which leaves out N mod 8 of the N valid "
        "sentences; its maximum length (--eval-bleu-args, 1.2 × source + 10 in the recipe); "
        "fairseq's Moses detokenizer; and as references the tokenized targets detokenized "
        "back, an unknown word never matching. – where the run logged none (trained without "
        "--eval-bleu) or the checkpoint is an average of several.",
        "",
        f"{BUDGET_COLUMN}: the updates every run of the row trains for; Updates (Runs): where "
        "the evaluated checkpoint was saved.",
    ]


def paper_caption(summaries: Sequence[OptimizerSummary]) -> List[str]:
    """Where the paper's numbers stand, and why not beside the other rows the paper has."""
    reasons = []
    for s in summaries:
        if s.paper is not None or paper_row(s.optimizer) is None:
            continue
        if s.preset is None:
            reason = "rows with no preset recorded (a folder without grid.json)"
        elif s.preset != PAPER_PRESET:
            reason = f"`--preset {s.preset}` (not the paper's settings)"
        else:
            reason = f"`--preset {PAPER_PRESET}` trained for --max-update {s.budget or '?'}"
        if reason not in reasons:
            reasons.append(reason)
    shown = any(s.paper for s in summaries)
    if not reasons and not shown:
        return []
    text = "Paper valid, Paper test" if shown else "No paper columns"
    text += (
        ": the paper's numbers (Kwon et al., 2021, Table 4) stand only beside rows of "
        f"`--preset {PAPER_PRESET}` at the recipe's --max-update {paper_budget()}"
    )
    if reasons:
        text += (
            f"; not beside {' nor '.join(reasons)}: their BLEU is not comparable with the paper's"
        )
    return ["", text + "."]


def _protocols(results: Sequence[dict], grids: Sequence[dict]) -> List[str]:
    found = []
    for protocol in [g.get("protocol") for g in grids] + [results_protocol(r) for r in results]:
        if protocol and protocol not in found:
            found.append(protocol)
    return found


def markdown_table(
    results: Sequence[dict],
    grids: Sequence[dict] = (),
    statuses: Sequence[RunStatus] = (),
    left_out: Sequence[Tuple[str, str]] = (),
    figures: Sequence[str] = (),
) -> str:
    summaries = summarize_runs(results, grids)
    protocols = _protocols(results, grids)
    presets = sorted({g.get("preset") for g in grids if g.get("preset")})
    with_sharpness = any(s.stats["adaptive_sharpness"] for s in summaries)
    with_paper = any(s.paper for s in summaries)
    several = _several_folders(results, grids, statuses)
    header = ["Optimizer", "Seeds", "Checkpoint", "Valid BLEU", "Test BLEU"]
    header += ["Paper valid", "Paper test"] if with_paper else []
    header += ["Valid sacreBLEU", "Test sacreBLEU", IN_TRAINING_COLUMN]
    header += ["Adaptive sharpness"] if with_sharpness else []
    header += [BUDGET_COLUMN] + (["Preset", "Folder"] if several else [])
    title = "# Table 4: IWSLT'14 De→En, Transformer — --checkpoint " + ", ".join(protocols or ["–"])
    if presets:
        title += f" (--preset {', '.join(presets)})"
    lines = [title, ""]
    for protocol in protocols:
        lines.append(f"`--checkpoint {protocol}`: {protocol_description(protocol)}.")
    lines += [""] + score_captions() + paper_caption(summaries)
    lines += [
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for s in summaries:
        cells = [s.label, s.seeds_cell, s.protocol]
        cells += [_cell(s.stats["valid_bleu"]), _cell(s.stats["test_bleu"])]
        if with_paper:
            cells += [_value(s.paper and s.paper.valid_bleu), _value(s.paper and s.paper.test_bleu)]
        cells += [_cell(s.stats[key]) for key in ("valid_sacrebleu", "test_sacrebleu")]
        logged = s.stats[IN_TRAINING_BLEU]  # a run may have logged none: say over how many
        partial = logged is not None and logged.count < len(s.seeds)
        cells += [_cell(logged) + (f" (n = {logged.count})" if partial else "")]
        cells += [_cell(s.stats["adaptive_sharpness"], 4)] if with_sharpness else []
        cells += [s.budget or "–"] + ([s.preset or "–", s.out_dir or "–"] if several else [])
        lines.append("| " + " | ".join(cells) + " |")
    lines += rho_sweep_markdown(results)

    run_header = [
        "Run",
        "Checkpoint",
        "Status",
        "Updates",
        "Valid BLEU",
        "Test BLEU",
        "Valid sacreBLEU",
        "Test sacreBLEU",
        IN_TRAINING_COLUMN,
    ]
    run_header += ["Adaptive sharpness"] if with_sharpness else []
    run_header += ["Folder"] if several else []
    folders = []
    for folder in [g.get("out_dir") for g in grids] + [r.get("out_dir") for r in results]:
        if folder not in folders:
            folders.append(folder)

    def folder_order(folder: Optional[str]) -> int:
        return folders.index(folder) if folder in folders else len(folders)

    lines += [
        "",
        "## Runs",
        "",
        "| " + " | ".join(run_header) + " |",
        "|" + "---|" * len(run_header),
    ]

    def protocol_order(protocol: str) -> int:
        return protocols.index(protocol) if protocol in protocols else len(protocols)

    rows = [
        (
            (
                optimizer_order(row_of(r)),
                r["seed"],
                protocol_order(results_protocol(r)),
                folder_order(r.get("out_dir")),
            ),
            [
                os.path.basename(r["run_dir"]),
                results_protocol(r),
                "done",
                _updates(r),
                _value(METRICS["valid_bleu"](r)),
                _value(METRICS["test_bleu"](r)),
                _value(METRICS["valid_sacrebleu"](r)),
                _value(METRICS["test_sacrebleu"](r)),
                _value(METRICS[IN_TRAINING_BLEU](r)),
            ]
            + ([_value(adaptive_sharpness(r), 4)] if with_sharpness else [])
            + ([r.get("out_dir") or "–"] if several else []),
        )
        for r in results
    ]
    for status in statuses:
        match = RUN_NAME.match(status.name)
        key = (
            optimizer_order(match.group("optimizer")),
            int(match.group("seed")),
            protocol_order(status.protocol),
            folder_order(status.out_dir),
        )
        cells = [status.name, status.protocol, status.status.replace("|", "/")]
        width = len(run_header) - (1 if several else 0)
        cells += ["–"] * (width - len(cells)) + ([status.out_dir or "–"] if several else [])
        rows.append((key, cells))
    for _, cells in sorted(rows, key=lambda row: row[0]):
        lines.append("| " + " | ".join(cells) + " |")
    if left_out:
        lines += [
            "",
            "Not in this table (results of other settings): "
            + "; ".join(f"{name}: {why}" for name, why in left_out)
            + ".",
        ]
    signatures = sorted(
        {r[s]["sacrebleu_signature"] for r in results for s in ("valid", "test") if s in r}
    )
    if signatures:
        lines += ["", "sacreBLEU signature: " + "; ".join(f"`{sig}`" for sig in signatures)]
    if figures:
        lines += ["", "## Figures", ""] + [f"- {text}" for text in figures]
    return "\n".join(lines) + "\n"


def csv_table(results: Sequence[dict], grids: Sequence[dict] = ()) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        ["optimizer", "label", "checkpoint", "seeds", "n", "n_expected"]
        + ["paper_valid_bleu", "paper_test_bleu"]
        + [f"{key}_{part}" for key in METRICS for part in ("mean", "std")]
        + ["max_update", "preset", "folder"]
    )
    for s in summarize_runs(results, grids):
        paper = s.paper
        row = [
            s.optimizer,
            s.label,
            s.protocol,
            " ".join(map(str, s.seeds)),
            len(s.seeds),
            "" if s.expected_seeds is None else s.expected_seeds,
            paper.valid_bleu if paper else "",
            paper.test_bleu if paper else "",
        ]
        for key in METRICS:
            stat = s.stats[key]
            row += (
                ["", ""]
                if stat is None
                else [round(stat.mean, 4), "" if stat.std is None else round(stat.std, 4)]
            )
        writer.writerow(row + [s.budget or "", s.preset or "", s.out_dir or ""])
    return out.getvalue()


# --------------------------------------------------------------------------------------------
# Sweeps: BLEU against ρ
# --------------------------------------------------------------------------------------------


@dataclass
class SweepPoint:
    """One ρ of a sweep: the runs of one row (e.g. asam-rho0.1-eta0.01) and protocol."""

    row: str
    rho: str
    seeds: List[int]
    valid: Optional[Stat]
    test: Optional[Stat]
    picked: bool = False


@dataclass
class SweepCurve:
    """BLEU against ρ for one optimizer row, its other swept values and protocol."""

    base_row: str  # the row without its ρ: asam, asam-eta0.1, asam_interval5
    protocol: str
    points: List[SweepPoint]
    out_dir: Optional[str] = None  # its grid's folder: and, among several, named in the label
    several_folders: bool = False

    @property
    def label(self) -> str:
        label = optimizer_label(self.base_row)
        return f"{label} [{self.out_dir}]" if self.several_folders else label

    @property
    def pick(self) -> Optional[SweepPoint]:
        return next((p for p in self.points if p.picked), None)


def rho_sweeps(results: Sequence[dict]) -> List[SweepCurve]:
    """The rows that name their ρ (a `--rho` sweep), grouped by everything but ρ; in each group
    the ρ with the highest mean validation BLEU is picked (the smaller ρ on a tie)."""
    groups: Dict[Tuple[Optional[str], str, str], Dict[str, List[dict]]] = {}
    for r in results:
        row = row_of(r)
        base, swept = parse_row(row)
        if "rho" not in swept:
            continue
        rest = base + "".join(f"-{n}{v}" for n, v in swept.items() if n != "rho")
        key = (r.get("out_dir"), rest, results_protocol(r))
        groups.setdefault(key, {}).setdefault(swept["rho"], []).append(r)
    several = len({folder for folder, _, _ in groups}) > 1
    curves = []
    for (folder, base_row, protocol), by_rho in groups.items():
        points = [
            SweepPoint(
                row_of(runs[0]),
                rho,
                sorted(r["seed"] for r in runs),
                Stat.of([METRICS["valid_bleu"](r) for r in runs]),
                Stat.of([METRICS["test_bleu"](r) for r in runs]),
            )
            for rho, runs in sorted(by_rho.items(), key=lambda item: float(item[0]))
        ]
        scored = [p for p in points if p.valid is not None]
        if scored:
            best = max(p.valid.mean for p in scored)
            next(p for p in scored if p.valid.mean == best).picked = True
        curves.append(SweepCurve(base_row, protocol, points, folder, several))
    curves.sort(key=lambda c: (optimizer_order(c.base_row), c.protocol, c.out_dir or ""))
    return curves


def rho_sweep_markdown(results: Sequence[dict]) -> List[str]:
    curves = rho_sweeps(results)
    if not curves:
        return []
    lines = [
        "",
        "## BLEU against ρ",
        "",
        "Each ρ of the sweep (`--rho`), mean ± sample standard deviation over seeds; ✓ marks the "
        "ρ with the highest mean validation BLEU, the choice the paper made by grid search. Only "
        "validation BLEU chooses; test BLEU is the estimate of the chosen ρ. Under `--checkpoint "
        "best-bleu` validation BLEU also chose each run's checkpoint, so the valid column is "
        f"optimistic. Plot: {RHO_SWEEP_PNG}.",
        "",
        "| Optimizer | Checkpoint | ρ | Seeds | Valid BLEU | Test BLEU | Picked by valid BLEU |",
        "|---|---|---|---|---|---|---|",
    ]
    for curve in curves:
        for p in curve.points:
            cells = [
                curve.label,
                curve.protocol,
                p.rho,
                ",".join(map(str, p.seeds)),
                _cell(p.valid),
                _cell(p.test),
                "✓" if p.picked else "",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for curve in curves:
        pick = curve.pick
        if pick is None:
            lines.append(f"- {curve.label} ({curve.protocol}): no validation BLEU, no pick.")
            continue
        lines.append(
            f"- Validation BLEU picks ρ = {pick.rho} for {curve.label} (--checkpoint "
            f"{curve.protocol}): valid {_cell(pick.valid)}, test {_cell(pick.test)}, over "
            f"{len(pick.seeds)} seed(s)."
        )
    return lines


def rho_sweep_csv(results: Sequence[dict]) -> Optional[str]:
    curves = rho_sweeps(results)
    if not curves:
        return None
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        ["row", "label", "checkpoint", "rho", "seeds", "n"]
        + ["valid_bleu_mean", "valid_bleu_std", "test_bleu_mean", "test_bleu_std", "picked"]
    )
    for curve in curves:
        for p in curve.points:
            row = [curve.base_row, curve.label, curve.protocol, p.rho]
            row += [" ".join(map(str, p.seeds)), len(p.seeds)]
            for stat in (p.valid, p.test):
                row += (
                    ["", ""]
                    if stat is None
                    else [round(stat.mean, 4), "" if stat.std is None else round(stat.std, 4)]
                )
            writer.writerow(row + [int(p.picked)])
    return out.getvalue()


def rho_sweep_figure(results: Sequence[dict]):
    """Valid (solid) and test (dashed) BLEU against ρ with error bars (sample std over seeds),
    one colour per curve, a star on the picked ρ; Adam's BLEU as a dotted line when there."""
    curves = rho_sweeps(results)
    if not curves:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for index, curve in enumerate(curves):
        colour = f"C{index}"
        label = curve.label + (
            f" (--checkpoint {curve.protocol})" if len({c.protocol for c in curves}) > 1 else ""
        )
        for key, style, marker, part in (("valid", "-", "o", "valid"), ("test", "--", "s", "test")):
            points = [(float(p.rho), getattr(p, key)) for p in curve.points if getattr(p, key)]
            if not points:
                continue
            xs = [x for x, _ in points]
            ys = [stat.mean for _, stat in points]
            errors = [stat.std or 0.0 for _, stat in points]
            axes.errorbar(
                xs,
                ys,
                yerr=errors,
                color=colour,
                linestyle=style,
                marker=marker,
                capsize=3,
                label=f"{label} — {part}",
            )
        pick = curve.pick
        if pick is not None:
            axes.plot(
                [float(pick.rho)],
                [pick.valid.mean],
                marker="*",
                markersize=16,
                color=colour,
                linestyle="none",
                label=f"picked by valid BLEU: ρ = {pick.rho}",
            )
    protocols = {c.protocol for c in curves}
    adam = [r for r in results if row_of(r) == "adam" and results_protocol(r) in protocols]
    for key, style in (("valid_bleu", ":"), ("test_bleu", "-.")):
        stat = Stat.of([METRICS[key](r) for r in adam])
        if stat is not None:
            axes.axhline(
                stat.mean, color="grey", linestyle=style, label=f"Adam — {key.split('_')[0]}"
            )
    axes.set_xscale("log")
    rhos = sorted({p.rho for c in curves for p in c.points}, key=float)
    axes.set_xticks([float(r) for r in rhos])
    axes.set_xticklabels(rhos)
    axes.minorticks_off()
    axes.set_xlabel("ρ")
    axes.set_ylabel("BLEU (fairseq-generate, beam 5)")
    axes.set_title("BLEU against ρ: mean ± sample std over seeds")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    return figure


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


@dataclass
class PlottedRun:
    """One run's logs, as the plots need them."""

    name: str  # e.g. adam-seed1
    optimizer: str
    seed: int
    protocol: str
    log: Dict[str, List[dict]]
    settings: Dict[str, Optional[str]]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(run: PlottedRun, tag: str, x_key: str, y_key: str) -> List[Tuple[float, float]]:
    return [
        (r[x_key], r[y_key]) for r in run.log[tag] if isinstance(r.get(y_key), float) and x_key in r
    ]


def _colours(runs: Sequence[PlottedRun]) -> Dict[str, str]:
    optimizers = sorted({r.optimizer for r in runs} | set(PAPER_TABLE4), key=optimizer_order)
    return {o: f"C{i}" for i, o in enumerate(optimizers)}  # the same in every plot


def _run_order(run: PlottedRun):
    return optimizer_order(run.optimizer), run.seed, run.protocol


def _save(figure, path: str) -> None:
    plt = _pyplot()
    try:
        with atomic_output(path) as temporary:
            figure.savefig(temporary, format="png", dpi=120)
    finally:
        plt.close(figure)


def curves_figure(runs: Sequence[PlottedRun], tag: str, x_key: str, y_key: str, ylabel: str):
    """One line per run (colour per optimizer, line style per protocol); None if no run
    logged `y_key`."""
    plotted = [(r, _series(r, tag, x_key, y_key)) for r in sorted(runs, key=_run_order)]
    plotted = [(r, points) for r, points in plotted if points]
    if not plotted:
        return None
    plt = _pyplot()
    colours = _colours(runs)
    protocols = sorted({r.protocol for r, _ in plotted})
    styles = {p: ("-", "--", ":", "-.")[i % 4] for i, p in enumerate(protocols)}
    figure, axes = plt.subplots(figsize=(7, 4.5))
    labelled = set()
    for run, points in plotted:
        key = (run.optimizer, run.protocol)
        label = optimizer_label(run.optimizer)
        if len(protocols) > 1:
            label += f" (--checkpoint {run.protocol})"
        xs, ys = zip(*points)
        axes.plot(
            xs,
            ys,
            color=colours[run.optimizer],
            linestyle=styles[run.protocol],
            alpha=0.8,
            label=None if key in labelled else label,
            marker="." if len(xs) < 30 else None,
        )
        labelled.add(key)
    axes.set_xlabel("updates")
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    return figure


def neighbourhood(settings: Dict[str, Optional[str]]) -> Optional[str]:
    """ρ and kind of ball of a SAM/ASAM run, from its fairseq-train options (None for Adam)."""
    optimizer = settings.get("--optimizer")
    if optimizer not in ("sam", "asam"):
        return None
    rho = settings.get("--rho") or "the plugin's default"
    if optimizer == "sam":
        text = f"ρ = {rho}, plain ball ‖ε‖₂ ≤ ρ"
    else:
        eta = settings.get("--eta") or "the plugin's default"
        text = f"ρ = {rho}, η = {eta}, adaptive ball ‖T⁻¹ε‖₂ ≤ ρ, T = |w| + η"
    interval = settings.get("--sam-interval")
    if interval and interval != "1":
        text += f", every {interval}th update"
    start = settings.get("--sam-start-update")
    if start and start != "0":
        text += f", from update {start}"
    return text


def sharpness_caption(runs: Sequence[PlottedRun], with_eval: bool) -> str:
    """What the sharpness plot shows, as the plugin logs it (the report's text for it)."""
    dropouts = sorted({r.settings.get("--dropout") or "fairseq's default" for r in runs})
    text = (
        f"{SHARPNESS_PNG}: `sharpness` as fairseq-train logs it on its train_inner lines: "
        "L(w+ε) − L(w) on each update's own training batches, per target token in base 2, "
        "averaged over each --log-interval. "
        "SAM's ε lies in the plain ball ‖ε‖₂ ≤ ρ, ASAM's in the adaptive ball ‖T⁻¹ε‖₂ ≤ ρ "
        "(T = |w| + η on weights), with the ρ (and η) named in the legend: the two measure "
        "different neighbourhoods, so their values are not comparable across optimizers, "
        "only along one run. "
        f"The two passes draw their own dropout masks (--dropout {', '.join(dropouts)}), so "
        "under dropout the logged `sharpness` is a noisy estimate of the rise ε causes. "
    )
    if with_eval:
        text += (
            "Dashed: `sharpness_eval` (--sharpness-eval-interval N), the same difference with "
            "dropout off, free of that noise, on the updates it was measured on."
        )
    else:
        text += (
            "No run here logged `sharpness_eval`, the noise-free value with dropout off "
            "(fairseq-train --sharpness-eval-interval N logs it)."
        )
    return text


def sharpness_figure(runs: Sequence[PlottedRun]):
    """`sharpness` (solid) and `sharpness_eval` (dashed) of the SAM/ASAM runs, the legend naming
    each optimizer's ρ and ball, the caption below; (figure, caption) or (None, None)."""
    measured = [
        (
            r,
            _series(r, "train_inner", "num_updates", SHARPNESS_KEY),
            _series(r, "train_inner", "num_updates", SHARPNESS_EVAL_KEY),
        )
        for r in sorted(runs, key=_run_order)
    ]
    measured = [m for m in measured if m[1] or m[2]]
    if not measured:
        return None, None
    plt = _pyplot()
    colours = _colours(runs)
    with_eval = any(m[2] for m in measured)
    caption = sharpness_caption([m[0] for m in measured], with_eval)
    figure, axes = plt.subplots(figsize=(8, 6.2))
    labelled = set()
    for run, logged, evaluated in measured:
        ball = neighbourhood(run.settings)
        label = optimizer_label(run.optimizer) + (f": {ball}" if ball else "")
        for points, key, style in (
            (logged, SHARPNESS_KEY, "-"),
            (evaluated, SHARPNESS_EVAL_KEY, "--"),
        ):
            if not points:
                continue
            xs, ys = zip(*points)
            name = (run.optimizer, key)
            axes.plot(
                xs,
                ys,
                color=colours[run.optimizer],
                linestyle=style,
                alpha=0.8,
                label=None if name in labelled else f"{label} — {key}",
                marker="." if len(xs) < 30 else None,
            )
            labelled.add(name)
    axes.set_xlabel("updates")
    axes.set_ylabel("L(w+ε) − L(w) (base 2)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout(rect=(0, 0.2, 1, 1))
    figure.text(0.01, 0.01, textwrap.fill(caption, 125), fontsize=6.5, va="bottom", ha="left")
    return figure, caption


def plotted_runs(selection: Selection) -> List[PlottedRun]:
    runs = []
    for run_dir in selection.run_dirs:
        log_path = os.path.join(run_dir, TRAIN_LOG)
        if not os.path.isfile(log_path):
            continue
        name = os.path.basename(run_dir)
        match = RUN_NAME.match(name)
        results = _read_record(os.path.join(run_dir, RESULTS_NAME)) or {}
        grid = _read_record(os.path.join(os.path.dirname(os.path.dirname(run_dir)), GRID_RECORD))
        protocol = (grid or {}).get("protocol") or results_protocol(results)
        runs.append(
            PlottedRun(
                name,
                match.group("optimizer"),
                int(match.group("seed")),
                protocol,
                parse_train_log(log_path),
                run_settings(run_dir),
            )
        )
    return runs


def write_report(
    out_dirs: Union[str, Sequence[str]], report_dir: Optional[str] = None
) -> Dict[str, str]:
    """Writes the tables and plots of the grid(s) in `out_dirs`; returns {name: path}.

    One folder: its own report (default `<out>/report`).  Several (e.g. the same grid run with
    `--checkpoint best-loss` and with `best-bleu`): one table with a row per folder, optimizer
    and protocol (never one mean over two grids), the preset and folder on every row;
    `report_dir` is then required.
    """
    out_dirs = [out_dirs] if isinstance(out_dirs, str) else list(out_dirs)
    # One folder named twice (`runs/x` and `/abs/runs/x`) is one grid, not two rows.
    by_path: Dict[str, str] = {}
    for out_dir in out_dirs:
        by_path.setdefault(os.path.realpath(out_dir), out_dir)
    out_dirs = list(by_path.values())
    if report_dir is None:
        if len(out_dirs) > 1:
            raise ExperimentError("--report-dir is required with more than one output folder")
        report_dir = os.path.join(out_dirs[0], REPORT_FOLDER)
    selection = combine([select_results(out_dir) for out_dir in out_dirs])
    runs = plotted_runs(selection)
    os.makedirs(report_dir, exist_ok=True)
    written, figures = {}, []
    for tag, x_key, y_key, file_name, ylabel in PLOTS:
        figure = curves_figure(runs, tag, x_key, y_key, ylabel)
        if figure is None:
            logger.info(f"no run logged {y_key}: no {file_name}")
            continue
        written[file_name] = os.path.join(report_dir, file_name)
        _save(figure, written[file_name])
    figure = rho_sweep_figure(selection.results)
    if figure is not None:
        written[RHO_SWEEP_PNG] = os.path.join(report_dir, RHO_SWEEP_PNG)
        _save(figure, written[RHO_SWEEP_PNG])
    sweep_csv = rho_sweep_csv(selection.results)
    if sweep_csv is not None:
        written[RHO_SWEEP_CSV] = os.path.join(report_dir, RHO_SWEEP_CSV)
        write_text(written[RHO_SWEEP_CSV], sweep_csv)
    figure, caption = sharpness_figure(runs)
    if figure is None:
        logger.info(f"no run logged {SHARPNESS_KEY}: no {SHARPNESS_PNG}")
    else:
        written[SHARPNESS_PNG] = os.path.join(report_dir, SHARPNESS_PNG)
        _save(figure, written[SHARPNESS_PNG])
        figures.append(caption)
    if selection.results or selection.statuses:
        for name, text in (
            (
                TABLE_MARKDOWN,
                markdown_table(
                    selection.results,
                    selection.grids,
                    selection.statuses,
                    selection.left_out,
                    figures,
                ),
            ),
            (TABLE_CSV, csv_table(selection.results, selection.grids)),
        ):
            written[name] = os.path.join(report_dir, name)
            write_text(written[name], text)
    else:
        logger.warning(f"no {RESULTS_NAME} under {', '.join(out_dirs)}: no table")
    logger.info(f"report: {', '.join(written.values()) or 'nothing to report'}")
    return {**{k: written[k] for k in (TABLE_MARKDOWN, TABLE_CSV) if k in written}, **written}


# TEMPORARY (branch launch, until the report helper's report.py is merged): design.md's API,
# write_report(out_dirs, report_dir) -> table4.md's path, on the code above.
_write_report_files = write_report


def write_report(out_dirs, report_dir=None) -> str:  # noqa: F811
    return _write_report_files(out_dirs, report_dir)[TABLE_MARKDOWN]
