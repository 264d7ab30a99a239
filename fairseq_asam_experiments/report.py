"""Table 4 (table4.md, .csv) and its plots from each folder's grid.json and its runs'
results.json (scores and settings, never a folder's name), failure.json and train.log.  A table
row: the mean ± sample std over its seeds, pooled over folders whose settings agree."""

import argparse
import glob
import json
import os
import re
from typing import Dict, List, Optional, Sequence

import pandas as pd
from matplotlib.figure import Figure  # no pyplot: no backend, no figure to close

from .cli import run_command
from .errors import ExperimentError, SettingError
from .files import atomic_output, read_json_object, write_text
from .grid import GRID_RECORD, RUNS_FOLDER
from .launch import FAILURE_RECORD, RESULTS, TRAIN_LOG, lock_holder

PROGRAM, REPORT_FOLDER = "fairseq-asam-report", "report"
NONE = "–"  # an empty cell; also the value of a setting a run does not record
SWEEP = "sweep:"  # the prefix of a swept option's column
# The paper preset's budget: configs/iwslt14_de_en/common.args' --max-update (tested).
PAPER_PRESET, PAPER_MAX_UPDATE = "paper", "50000"
# Kwon et al., "ASAM", ICML 2021, Table 4 (IWSLT'14 De→En): label, valid and test BLEU, and the
# row's hyperparameters (a swept row with other values is not the paper's).
PAPER = {
    "adam": ("Adam", 35.34, 34.86, {}),
    "sam": ("Adam+SAM", 35.52, 34.78, {"rho": 0.1}),
    "asam": ("Adam+ASAM", 35.66, 35.02, {"rho": 0.2, "eta": 0.01}),
}
SYMBOLS = {"rho": "ρ", "eta": "η"}
IN_TRAINING = "Valid BLEU (in-training)"
SCORES = (("bleu", "BLEU"), ("sacrebleu", "sacreBLEU"))
METRICS = {f"{s}_{m}": f"{s.title()} {n}" for m, n in SCORES for s in ("valid", "test")}
METRICS.update(in_training_bleu=IN_TRAINING, sharpness="Adaptive sharpness")
SETTINGS = ["preset", "protocol", "max_update"]  # with the row and its swept values: a table row
RUN_COLUMNS = ["folder", "run", "status", "row", "seed", *SETTINGS, "updates", *METRICS]
RUN_COLUMNS += ["signatures", "sharpness_rho", "log"]
CAPTIONS = [
    "Valid BLEU, Test BLEU: fairseq-generate's tokenized BLEU-4 (beam 5, BPE removed, on the "
    "Moses-tokenized lowercased text), assumed to be Table 4's metric: the paper does not name "
    "it (configs/README.md). Mean ± sample std over seeds; (n = k): of k runs. best-bleu selects "
    "by validation BLEU: its valid scores are optimistic.",
    "Valid sacreBLEU, Test sacreBLEU: that output detokenized by the kit, case-insensitive "
    "sacreBLEU against the untokenized references.",
    f"{IN_TRAINING}: fairseq-train's logged `valid_bleu` (--eval-bleu, what best-bleu selects by) "
    "at the evaluated checkpoint's epoch, – if not logged: sacreBLEU of fairseq's own validation "
    "pass (its batching, --eval-bleu-args, Moses detokenizer, detokenized targets as references), "
    "not of fairseq-generate's output.",
]
SHARPNESS_CAPTION = (
    "Adaptive sharpness: max L(w+ε) − L(w) over the ball ‖T⁻¹ε‖₂ ≤ ρ (T = |w| + η) around the "
    "evaluated checkpoint, measured after training by fairseq-asam-sharpness at ρ = {}."
)
PAPER_LINE = (
    "The paper's numbers (Kwon et al., 2021, Table 4) stand only beside its rows (adam, sam, "
    f"asam) of `--preset {PAPER_PRESET}` at its `--max-update {PAPER_MAX_UPDATE}`"
)
LOGGED = (
    "the plugin's L(w+ε) − L(w) on each update's batches: `sharpness` (solid) under dropout, "
    "`sharpness_eval` (dashed, --sharpness-eval-interval) without. SAM's ε lies in ‖ε‖₂ ≤ ρ, "
    "ASAM's in ‖T⁻¹ε‖₂ ≤ ρ: comparable along one run, not across optimizers."
)
# file: (train.log tag, logged values (solid, dashed), y label, caption)
LOG_PLOTS = {
    "valid_loss.png": ("valid", ["valid_loss"], "validation loss (base 2)", "each run's, logged."),
    "valid_bleu.png": ("valid", ["valid_bleu"], "valid BLEU (in-training)", "each run's, logged."),
    "sharpness.png": ("train_inner", ["sharpness", "sharpness_eval"], "L(w+ε) − L(w)", LOGGED),
}
# fairseq's json log line (`... | valid | {...}`), and hydra's (`[...][valid][INFO] - {...}`).
LOG_LINE = re.compile(
    r"(?:\| |\]\[)(?P<tag>train_inner|valid|train)(?: \| |\]\[\w+\] - )(?P<record>\{.*\})\s*$"
)
UPDATE_KEYS = ["num_updates", "valid_num_updates", "train_num_updates"]  # by tag


def read_train_log(path: str) -> pd.DataFrame:
    """A row per json record of a fairseq-train log: its `tag`, `updates` and logged numbers;
    of one tag and update count (logged again after a resume) the last record."""
    records, path = [], path if os.path.isfile(path) else os.devnull  # no log (yet)
    with open(path, encoding="utf-8", errors="replace") as f:
        for match in filter(None, map(LOG_LINE.search, f)):
            try:
                records.append({**json.loads(match["record"]), "tag": match["tag"]})
            except json.JSONDecodeError:
                continue  # a line cut by a crash
    log = pd.DataFrame(records or {"tag": []})
    log = log.apply(lambda c: c if c.name == "tag" else pd.to_numeric(c, errors="coerce"))
    log["updates"] = log.reindex(columns=UPDATE_KEYS).bfill(axis=1).iloc[:, 0]
    log = log.drop_duplicates(["tag", "updates"], keep="last")
    return log.sort_values("updates", kind="stable").reset_index(drop=True)


def in_training_bleu(log: pd.DataFrame, checkpoint: dict) -> Optional[float]:
    """The valid BLEU logged at the checkpoint's epoch (and updates); none for an average."""
    epoch, updates = checkpoint.get("epoch"), checkpoint.get("num_updates")
    if epoch is None or len(checkpoint.get("sources") or ()) > 1 or "valid_bleu" not in log:
        return None
    at = (log.tag == "valid") & (log.epoch == epoch)
    bleu = log[at & ((log.updates == updates) | (updates is None))].valid_bleu.dropna()
    return float(bleu.iloc[-1]) if len(bleu) else None


def run_status(run_dir: str) -> str:
    if holder := lock_holder(run_dir):
        return f"running ({holder})"
    failure = read_json_object(os.path.join(run_dir, FAILURE_RECORD))
    if failure is not None:
        error = " ".join(str(failure.get("error", "?")).split()).replace("|", "/")
        return f"failed in {failure.get('stage', '?')}: {error}"
    files = {RESULTS: "done", "train.done.json": "trained, not evaluated"}
    files[TRAIN_LOG] = "not finished (resumable)"
    found = (status for name, status in files.items() if os.path.isfile(f"{run_dir}/{name}"))
    return next(found, "not started")


def read_run(folder: str, run_dir: str) -> dict:
    log = read_train_log(os.path.join(run_dir, TRAIN_LOG))
    run = {"folder": folder, "run": os.path.basename(run_dir), "log": log}
    run["status"] = run_status(run_dir)
    results = read_json_object(os.path.join(run_dir, RESULTS))
    if results is None:
        return run
    checkpoint = results.get("checkpoint") or {}
    settings = {k: results.get(k) for k in SETTINGS}
    settings.update({SWEEP + k: v for k, v in (results.get("sweep") or {}).items()})
    settings["row"] = results.get("row") or run["run"]
    run.update({k: NONE if v is None else str(v) for k, v in settings.items()})  # 200 = "200"
    run.update(seed=results.get("seed"), updates=checkpoint.get("num_updates"))
    run["signatures"] = {results[s].get("sacrebleu_signature") for s in ("valid", "test")}
    estimates = (results.get("sharpness") or {}).get("estimates", [])  # fairseq-asam-sharpness's
    adaptive = [e for e in estimates if e.get("measure") == "adaptive"] + [{}]
    run["sharpness"], run["sharpness_rho"] = adaptive[0].get("sharpness"), adaptive[0].get("rho")
    run.update({f"{s}_{m}": results[s].get(m) for m, _ in SCORES for s in ("valid", "test")})
    return {**run, "in_training_bleu": in_training_bleu(log, checkpoint)}


def read_folder(folder: str) -> tuple:
    """grid.json with its folder (or None), and a record per run: the grid's, then the others."""
    grid = read_json_object(os.path.join(folder, GRID_RECORD))
    found = sorted(glob.glob(os.path.join(folder, RUNS_FOLDER, "*", "")))  # folders, not .*
    if grid is None and not found:  # also a missing folder
        raise ExperimentError(f"no {GRID_RECORD} nor {RUNS_FOLDER}/* in {folder}")
    names = [*(grid or {}).get("runs", []), *(os.path.basename(p[:-1]) for p in found)]
    runs = [read_run(folder, os.path.join(folder, RUNS_FOLDER, n)) for n in dict.fromkeys(names)]
    return grid and {**grid, "folder": folder}, runs


def _order(column: pd.Series) -> pd.Series:
    """Sort key: the paper's rows first, numbers as numbers."""
    if column.name == "row":
        return column.map(lambda r: f"{list(PAPER).index(r)}" if r in PAPER else f"9{r}")
    numbers = pd.to_numeric(column, errors="coerce")
    return numbers if numbers[column != NONE].notna().all() else column  # NaN: last


def summarize(done: pd.DataFrame, keys: List[str]) -> pd.DataFrame:
    groups = done.groupby(keys, sort=False)
    summary = groups[list(METRICS)].agg(["mean", "std", "count"])
    summary.columns = [f"{metric}_{stat}" for metric, stat in summary.columns]
    summary["seeds"] = groups.seed.agg(lambda s: ",".join(str(int(x)) for x in sorted(s.dropna())))
    summary["n"] = groups.size()
    summary["folders"] = groups.folder.agg(lambda s: " ".join(dict.fromkeys(s)))
    summary = summary.reset_index().sort_values(keys, key=_order, kind="stable", ignore_index=True)
    summary.insert(1, "label", [label(r) for _, r in summary.iterrows()])
    summary["why_not_paper"] = [why_not_paper(r) for _, r in summary.iterrows()]
    why_not = summary.why_not_paper.notna()
    papers = [(None, None) if w else PAPER[r][1:3] for r, w in zip(summary.row, why_not)]
    return summary.join(pd.DataFrame(papers, columns=["paper_valid_bleu", "paper_test_bleu"]))


def number(value: float, metric: str = "") -> str:
    return NONE if pd.isna(value) else f"{value:.{4 if metric == 'sharpness' else 2}f}"


def cell(row, metric: str) -> str:
    """`mean ± std` (a mean alone of one value; `(n = k)` when fewer runs than the row's)."""
    count = row[f"{metric}_count"]
    text = number(row[f"{metric}_mean"], metric)
    text += f" ± {number(row[f'{metric}_std'], metric)}" if count > 1 else ""
    return text + (f" (n = {count})" if 0 < count < row["n"] else "")


def swept(row) -> Dict[str, str]:
    return {k[len(SWEEP) :]: v for k, v in row.items() if k.startswith(SWEEP) and v != NONE}


def label(row) -> str:
    """`Adam+ASAM (ρ = 0.1, lr = 0.001)`: the row's name and its swept values."""
    name = PAPER[row["row"]][0] if row["row"] in PAPER else row["row"]
    values = ", ".join(f"{SYMBOLS.get(k, k)} = {v}" for k, v in swept(row).items())
    return f"{name} ({values})" if values else name


def why_not_paper(row) -> Optional[str]:
    if row.preset != PAPER_PRESET:
        return f"`--preset {row.preset}`" if row.preset != NONE else "no preset"
    if row.max_update != PAPER_MAX_UPDATE:
        return f"`--preset paper` at `--max-update {row.max_update}`"
    paper = PAPER.get(row["row"], (0, 0, 0, {}))[3]
    other = any(k not in paper or float(v) != paper[k] for k, v in swept(row).items())
    return "rows other than the paper's" if row["row"] not in PAPER or other else None


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(map(str, cells)) + " |" for cells in rows]


def sweep_section(summary: pd.DataFrame, option: str, report_dir: str) -> List[str]:
    """BLEU against one swept option's value, a curve per row (all else equal); ✓ on the
    value with the highest mean valid BLEU (the first on a tie); writes its csv and png."""
    column, name = SWEEP + option, SYMBOLS.get(option, option)
    points = summary[summary[column] != NONE].copy()
    context = [k for k in SETTINGS if points[k].nunique() > 1]  # named where they differ
    points["curve"] = [
        label(r.drop(column)) + "".join(f" [{r[k]}]" for k in context) for _, r in points.iterrows()
    ]
    scored = points.dropna(subset=["valid_bleu_mean"]).groupby("curve", sort=False)
    points["picked"] = points.index.isin(scored.valid_bleu_mean.idxmax())
    stats = [f"{m}_{s}" for m in ("valid_bleu", "test_bleu") for s in ("mean", "std")]
    table = points[["curve", column, "seeds", "n", *stats, "picked"]]
    path = os.path.join(report_dir, f"bleu_vs_{option}")
    write_text(path + ".csv", table.rename(columns={column: option}).round(4).to_csv(index=False))
    plot_sweep(points, column, name, path + ".png")
    rows = [
        [r.curve, r[column], r.seeds, cell(r, "valid_bleu"), cell(r, "test_bleu"), "✓" * r.picked]
        for _, r in points.iterrows()
    ]
    text = f"✓: the highest mean valid BLEU (a grid search's pick). Plot: bleu_vs_{option}.png."
    header = ["Row", name, "Seeds", "Valid BLEU", "Test BLEU", "Picked by valid BLEU"]
    return ["", f"## BLEU against {name}", "", text, "", *markdown_table(header, rows)]


def _save(axes, path: str, xlabel: str, ylabel: str) -> None:
    axes.set(xlabel=xlabel, ylabel=ylabel)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    axes.figure.tight_layout()
    with atomic_output(path) as temporary:
        axes.figure.savefig(temporary, format="png", dpi=120)


def plot_sweep(points: pd.DataFrame, column: str, name: str, path: str) -> None:
    """Valid (solid), test (dashed) BLEU against the value ± sample std, ★ on the pick."""
    axes = Figure(figsize=(7, 4.5)).subplots()
    numbers = pd.to_numeric(points[column], errors="coerce")
    x = numbers if numbers.notna().all() else points[column]  # words: a category axis
    for index, (curve, group) in enumerate(points.groupby("curve", sort=False)):
        style = dict(color=f"C{index}", marker="o", capsize=3)
        for split, line in (("valid", "-"), ("test", "--")):
            y, error = group[f"{split}_bleu_mean"], group[f"{split}_bleu_std"].fillna(0)
            axes.errorbar(x[group.index], y, error, ls=line, label=f"{curve} — {split}", **style)
        pick = group.index[group.picked]
        axes.plot(x[pick], points.valid_bleu_mean[pick], "*", ms=14, color=f"C{index}")
    if x is numbers and (numbers > 0).all():
        axes.set_xscale("log")
        axes.set_xticks(sorted(set(numbers)), [f"{v:g}" for v in sorted(set(numbers))])
        axes.minorticks_off()
    _save(axes, path, name, "BLEU")


def plot_logs(logs: Dict[str, pd.DataFrame], tag, values, ylabel, path: str) -> bool:
    """A line per run and logged value (solid, then dashed) against updates; False if none."""
    axes = Figure(figsize=(7, 4.5)).subplots()
    for index, (name, log) in enumerate(logs.items()):
        for value, line in zip(values, ("-", "--")):
            points = log[log.tag == tag].reindex(columns=["updates", value]).dropna()
            style = dict(color=f"C{index % 10}", marker="." if len(points) < 30 else None)
            if len(points):
                axes.plot(points.updates, points[value], line, label=f"{name} — {value}", **style)
    if axes.lines:
        _save(axes, path, "updates", ylabel)
    return bool(axes.lines)


def preamble(grids: List[dict], done: pd.DataFrame, summary: pd.DataFrame) -> List[str]:
    found = {k: [*done[k], *(g[k] for g in grids if g.get(k))] for k in ("protocol", "preset")}
    protocols, presets = (", ".join(dict.fromkeys(v)) for v in found.values())
    title = f"# Table 4: IWSLT'14 De→En, Transformer — --checkpoint {protocols}"
    budgets = [f"{g['max_update']} (grid.json of {g['folder']})" for g in grids]
    paragraphs = [title + f" (--preset {presets})" * bool(presets)]
    paragraphs.append(f"Budget: --max-update {', '.join(budgets) or NONE}; per row in Budget.")
    reasons = ", ".join(dict.fromkeys(summary.why_not_paper.dropna()))
    why_not = f"; not beside {reasons}: not comparable." if reasons else "."
    paragraphs += [*CAPTIONS, PAPER_LINE + why_not]
    rhos = ", ".join(map(str, sorted(set(done.sharpness_rho.dropna()))))
    paragraphs += [SHARPNESS_CAPTION.format(rhos)] * bool(rhos)
    return [line for paragraph in paragraphs for line in (paragraph, "")]


def write_report(out_dirs: Sequence[str], report_dir: str) -> str:
    """Writes the report of the runs of `out_dirs` into `report_dir`; returns table4.md's path."""
    out_dirs = list({os.path.realpath(d): d for d in out_dirs}.values())
    read = [read_folder(folder) for folder in out_dirs]
    grids, records = [g for g, _ in read if g], [r for _, found in read for r in found]
    sweeps = sorted({k for r in records for k in r if k.startswith(SWEEP)})
    runs = pd.DataFrame(records, columns=RUN_COLUMNS + sweeps)
    runs[list(METRICS)] = runs[list(METRICS)].astype(float)
    done = runs[runs.row.notna()].fillna({k: NONE for k in sweeps})
    summary, several = summarize(done, ["row", *sweeps, *SETTINGS]), len(out_dirs) > 1
    metrics = [m for m in METRICS if m != "sharpness" or runs.sharpness.notna().any()]
    paper = bool(summary.paper_valid_bleu.notna().any())
    header = ["Row", "Seeds", "Checkpoint", "Preset", "Budget (--max-update)"]
    header += ["Paper valid", "Paper test"] * paper + [METRICS[m] for m in metrics]
    rows = [
        [r.label, r.seeds or NONE, r.protocol, r.preset, r.max_update]
        + [number(r.paper_valid_bleu), number(r.paper_test_bleu)] * paper
        + [cell(r, m) for m in metrics]
        + [r.folders] * several
        for _, r in summary.iterrows()
    ]
    lines = preamble(grids, done, summary) + markdown_table(header + ["Folders"] * several, rows)
    missing = ", ".join(runs.run[runs.row.isna()])  # failed, running, not started...: see Runs
    lines += ["", f"No result for {missing}: see their status under Runs."] * bool(missing)
    for option in (k[len(SWEEP) :] for k in sweeps):
        if summary[SWEEP + option].replace(NONE, pd.NA).nunique() > 1:
            lines += sweep_section(summary, option, report_dir)
    header = ["Run", "Status", "Updates", *[METRICS[m] for m in metrics], *["Folder"] * several]
    rows = [
        [r.run, r.status, NONE if pd.isna(r.updates) else int(r.updates)]
        + [number(r[m], m) for m in metrics]
        + [r.folder] * several
        for _, r in runs.iterrows()
    ]
    lines += ["", "## Runs", "", *markdown_table(header, rows)]
    signatures = "; ".join(sorted({f"`{s}`" for r in done.signatures for s in r if s}))
    lines += ["", f"sacreBLEU signature: {signatures}"] * bool(signatures)
    logs = dict(zip(runs.run + (" [" + runs.folder + "]" if several else ""), runs.log))
    captions = [
        f"- {file}: {caption}"
        for file, (tag, values, ylabel, caption) in LOG_PLOTS.items()
        if plot_logs(logs, tag, values, ylabel, os.path.join(report_dir, file))
    ]
    lines += ["", "## Figures", "", *captions] * bool(captions)
    table = summary.drop(columns=[c for c in summary if c.endswith("_count")] + ["why_not_paper"])
    write_text(os.path.join(report_dir, "table4.csv"), table.round(4).to_csv(index=False))
    write_text(os.path.join(report_dir, "table4.md"), "\n".join(lines) + "\n")
    return os.path.join(report_dir, "table4.md")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog=PROGRAM, description=__doc__)
    parser.add_argument("folders", nargs="+", metavar="FOLDER", help="fairseq-asam-table4 --out")
    parser.add_argument("--out", help="where to write (default FOLDER/report; needed with two)")
    args = parser.parse_args(argv)

    def work() -> int:
        if args.out is None and len({os.path.realpath(f) for f in args.folders}) > 1:
            raise SettingError("--out is required with several folders")
        path = write_report(args.folders, args.out or os.path.join(args.folders[0], REPORT_FOLDER))
        with open(path, encoding="utf-8") as f:
            print(f.read())
        return 0

    return run_command(PROGRAM, work)
