"""Table 4 from the runs of experiments.runner: BLEU per optimizer next to the paper's, and plots.

Reads `<out>/runs/<optimizer>-seed<k>/results.json` (experiments.evaluation) and `train.log`
(fairseq-train with --log-format json; fairseq's `... | valid | {...}` lines or hydra's
`[...][valid][INFO] - {...}` lines) and writes into the report folder:

* `table4.md`, `table4.csv`: valid and test BLEU (tokenized, the paper's metric) mean ± sample
  standard deviation over seeds per optimizer, the paper's numbers, detokenized sacreBLEU, and
  the adaptive sharpness of the evaluated checkpoints where a results.json has a `sharpness`
  entry (experiments.sharpness's report, or a number);
* `valid_loss.png`, `valid_bleu.png` (runs trained with --eval-bleu), `sharpness.png` (the
  `sharpness` logged by SAM/ASAM on train_inner lines): one line per run against updates.
"""

import csv
import io
import json
import logging
import os
import re
import statistics
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

from ..errors import FairseqAsamError
from .evaluation import RESULTS_NAME
from .files import atomic_output, write_text

logger = logging.getLogger(__name__)

RUNS_FOLDER, REPORT_FOLDER = "runs", "report"
TRAIN_LOG = "train.log"
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

# fairseq's simple/json log line, and the same record as logged under fairseq-hydra-train.
LOG_RECORD = re.compile(
    r"(?:\| (?P<tag>train_inner|valid|train) \| "
    r"|\]\[(?P<hydra_tag>train_inner|valid|train)\]\[\w+\] - )(?P<record>\{.*\})\s*$"
)
# (record tag, key of the x axis, key of the y axis, file, y label) of each plot.
PLOTS = (
    ("valid", "valid_num_updates", "valid_loss", "valid_loss.png", "validation loss (base 2)"),
    ("valid", "valid_num_updates", "valid_bleu", "valid_bleu.png", "validation BLEU (--eval-bleu)"),
    (
        "train_inner",
        "num_updates",
        "sharpness",
        "sharpness.png",
        "sharpness L(w+ε) − L(w) (base 2)",
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


def run_directories(out_dir: str) -> List[str]:
    runs_dir = os.path.join(out_dir, RUNS_FOLDER)
    if not os.path.isdir(runs_dir):
        raise FairseqAsamError(f"no runs folder: {runs_dir}")
    return sorted(os.path.join(runs_dir, n) for n in os.listdir(runs_dir) if RUN_NAME.match(n))


def load_results(out_dir: str) -> List[dict]:
    """Every results.json under <out>/runs, each with its `run_dir`."""
    results = []
    for run_dir in run_directories(out_dir):
        path = os.path.join(run_dir, RESULTS_NAME)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                results.append({**json.load(f), "run_dir": run_dir})
        except json.JSONDecodeError as error:
            raise FairseqAsamError(f"{path} is not valid JSON: {error}") from error
    return results


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
    "adaptive_sharpness": adaptive_sharpness,
}


@dataclass
class OptimizerSummary:
    optimizer: str
    seeds: List[int]
    stats: Dict[str, Optional[Stat]]  # by METRICS key

    @property
    def label(self) -> str:
        row = PAPER_TABLE4.get(self.optimizer)
        return row.label if row else self.optimizer


def optimizer_order(name: str):
    known = list(PAPER_TABLE4)
    return (known.index(name), "") if name in known else (len(known), name)


def summarize_runs(results: Sequence[dict]) -> List[OptimizerSummary]:
    """Per optimizer (in the paper's row order): its seeds and the Stat of every metric."""
    by_optimizer: Dict[str, List[dict]] = {}
    for r in results:
        by_optimizer.setdefault(r["optimizer"], []).append(r)
    return [
        OptimizerSummary(
            optimizer,
            sorted(r["seed"] for r in runs),
            {key: Stat.of([metric(r) for r in runs]) for key, metric in METRICS.items()},
        )
        for optimizer, runs in sorted(
            by_optimizer.items(), key=lambda item: optimizer_order(item[0])
        )
    ]


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _cell(stat: Optional[Stat], digits: int = 2) -> str:
    return stat.format(digits) if stat else "–"


def _value(value: Optional[float], digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown_table(results: Sequence[dict]) -> str:
    summaries = summarize_runs(results)
    with_sharpness = any(s.stats["adaptive_sharpness"] for s in summaries)
    header = [
        "Optimizer",
        "Seeds",
        "Valid BLEU",
        "Test BLEU",
        "Paper valid",
        "Paper test",
        "Valid sacreBLEU",
        "Test sacreBLEU",
    ] + (["Adaptive sharpness"] if with_sharpness else [])
    lines = [
        "# Table 4: IWSLT'14 De→En, Transformer",
        "",
        "BLEU: tokenized BLEU-4 of fairseq-generate (beam 5, subword units removed), the paper's "
        "metric; mean ± sample standard deviation over seeds. sacreBLEU: detokenized.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for s in summaries:
        paper = PAPER_TABLE4.get(s.optimizer)
        cells = [
            s.label,
            ",".join(map(str, s.seeds)),
            _cell(s.stats["valid_bleu"]),
            _cell(s.stats["test_bleu"]),
            _value(paper.valid_bleu if paper else None),
            _value(paper.test_bleu if paper else None),
            _cell(s.stats["valid_sacrebleu"]),
            _cell(s.stats["test_sacrebleu"]),
        ] + ([_cell(s.stats["adaptive_sharpness"], 4)] if with_sharpness else [])
        lines.append("| " + " | ".join(cells) + " |")

    run_header = [
        "Run",
        "Checkpoint",
        "Valid BLEU",
        "Test BLEU",
        "Valid sacreBLEU",
        "Test sacreBLEU",
    ]
    run_header += ["Adaptive sharpness"] if with_sharpness else []
    lines += [
        "",
        "## Runs",
        "",
        "| " + " | ".join(run_header) + " |",
        "|" + "---|" * len(run_header),
    ]
    for r in sorted(results, key=lambda r: (optimizer_order(r["optimizer"]), r["seed"])):
        cells = [
            os.path.basename(r["run_dir"]),
            r.get("checkpoint", {}).get("choice", "–"),
            _value(METRICS["valid_bleu"](r)),
            _value(METRICS["test_bleu"](r)),
            _value(METRICS["valid_sacrebleu"](r)),
            _value(METRICS["test_sacrebleu"](r)),
        ] + ([_value(adaptive_sharpness(r), 4)] if with_sharpness else [])
        lines.append("| " + " | ".join(cells) + " |")
    signatures = sorted(
        {r[s]["sacrebleu_signature"] for r in results for s in ("valid", "test") if s in r}
    )
    if signatures:
        lines += ["", "sacreBLEU signature: " + "; ".join(f"`{sig}`" for sig in signatures)]
    return "\n".join(lines) + "\n"


def csv_table(results: Sequence[dict]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        ["optimizer", "label", "seeds", "paper_valid_bleu", "paper_test_bleu"]
        + [f"{key}_{part}" for key in METRICS for part in ("mean", "std")]
    )
    for s in summarize_runs(results):
        paper = PAPER_TABLE4.get(s.optimizer)
        row = [
            s.optimizer,
            s.label,
            " ".join(map(str, s.seeds)),
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
        writer.writerow(row)
    return out.getvalue()


def plot_curves(
    logs: Dict[str, Dict[str, List[dict]]], tag: str, x_key: str, y_key: str, ylabel: str, path: str
) -> bool:
    """One line per run (colour per optimizer) of `y_key` against `x_key`; False if none did."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    for run_name, log in logs.items():
        points = [
            (r[x_key], r[y_key]) for r in log[tag] if isinstance(r.get(y_key), float) and x_key in r
        ]
        if points:
            series[run_name] = points
    if not series:
        return False
    optimizers = sorted(
        {RUN_NAME.match(n).group("optimizer") for n in series} | set(PAPER_TABLE4),
        key=optimizer_order,
    )
    colours = {o: f"C{i}" for i, o in enumerate(optimizers)}  # the same in every plot
    figure, axes = plt.subplots(figsize=(7, 4.5))
    labelled = set()

    def run_order(item):
        match = RUN_NAME.match(item[0])
        return optimizer_order(match.group("optimizer")), int(match.group("seed"))

    for run_name, points in sorted(series.items(), key=run_order):
        optimizer = RUN_NAME.match(run_name).group("optimizer")
        label = (
            None
            if optimizer in labelled
            else (PAPER_TABLE4[optimizer].label if optimizer in PAPER_TABLE4 else optimizer)
        )
        labelled.add(optimizer)
        xs, ys = zip(*points)
        axes.plot(
            xs,
            ys,
            color=colours[optimizer],
            alpha=0.8,
            label=label,
            marker="." if len(xs) < 30 else None,
        )
    axes.set_xlabel("updates")
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    try:
        with atomic_output(path) as temporary:
            figure.savefig(temporary, format="png", dpi=120)
    finally:
        plt.close(figure)
    return True


def write_report(out_dir: str, report_dir: Optional[str] = None) -> Dict[str, str]:
    """Writes the tables and plots for the runs under `out_dir`; returns {name: path}."""
    report_dir = report_dir or os.path.join(out_dir, REPORT_FOLDER)
    results = load_results(out_dir)
    logs = {
        os.path.basename(d): parse_train_log(os.path.join(d, TRAIN_LOG))
        for d in run_directories(out_dir)
        if os.path.isfile(os.path.join(d, TRAIN_LOG))
    }
    os.makedirs(report_dir, exist_ok=True)
    written = {}
    if results:
        for name, text in (
            (TABLE_MARKDOWN, markdown_table(results)),
            (TABLE_CSV, csv_table(results)),
        ):
            written[name] = os.path.join(report_dir, name)
            write_text(written[name], text)
    else:
        logger.warning(f"no {RESULTS_NAME} under {os.path.join(out_dir, RUNS_FOLDER)}: no table")
    for tag, x_key, y_key, file_name, ylabel in PLOTS:
        path = os.path.join(report_dir, file_name)
        if plot_curves(logs, tag, x_key, y_key, ylabel, path):
            written[file_name] = path
        else:
            logger.info(f"no run logged {y_key}: no {file_name}")
    logger.info(f"report: {', '.join(written.values()) or 'nothing to report'}")
    return written
