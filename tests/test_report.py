"""What fairseq-asam-report says (issue 16), read from its output files: table4.md and
table4.csv of output folders written by hand here (grid.json as the runner writes it,
results.json and a fairseq-train json log per run), so that these tests hold for any report that
writes the same tables.

* the in-training validation BLEU (fairseq-train --eval-bleu) of the evaluated checkpoint, found
  by the update count the checkpoint was saved at;
* the grid's --max-update budget;
* the paper's numbers beside the paper preset only, and a line saying why not elsewhere;
* tokenized BLEU as Table 4's metric called an assumption.
"""

import csv
import io
import json

import pytest
import runner_stubs

from fairseq_asam_experiments import runner
from fairseq_asam_experiments.cli import report_main

SIGNATURE = "nrefs:1|case:lc|eff:no|tok:13a|smooth:exp|version:2.6.0"
IN_TRAINING = "Valid BLEU (in-training)"


def write_grid(out, preset="tiny", max_update=None, rows=("adam",), seeds=(1,), **kwargs):
    """grid.json as the runner writes it for this grid; returns it."""
    config = runner_stubs.tiny_grid(runner, out, max_update, rows, seeds, **kwargs)
    config.preset = runner.TABLE4_PRESETS[preset]
    record = runner.grid_record(config)
    (out / "grid.json").write_text(json.dumps(record))
    return record


def valid_line(epoch, updates, bleu=None):
    """A `valid` line of fairseq-train --log-format json (with --eval-bleu: `valid_bleu`)."""
    record = {"epoch": epoch, "valid_loss": f"{9 - epoch:.3f}"}
    if bleu is not None:
        record["valid_bleu"] = str(bleu)
    record["valid_num_updates"] = str(updates)
    return f"2026-01-01 00:00:0{epoch} | INFO | valid | {json.dumps(record)}\n"


def write_run(out, grid, row, seed, checkpoint, scores, log=""):
    """runs/<row>-seed<seed>/results.json of the grid's preset and protocol, and its train.log.
    `checkpoint`: results.json's entry (num_updates, epoch, sources); `scores`: (valid BLEU,
    test BLEU, valid sacreBLEU, test sacreBLEU) of fairseq-generate's output."""
    run = out / "runs" / f"{row}-seed{seed}"
    run.mkdir(parents=True)
    valid, test, valid_sacre, test_sacre = scores
    results = {
        "optimizer": row,
        "row": row,
        "seed": seed,
        "preset": grid["preset"],
        "protocol": grid["protocol"],
        "checkpoint": {"choice": grid["protocol"], **checkpoint},
        "valid": {"bleu": valid, "sacrebleu": valid_sacre, "sacrebleu_signature": SIGNATURE},
        "test": {"bleu": test, "sacrebleu": test_sacre, "sacrebleu_signature": SIGNATURE},
        "training": {
            "recipe_fingerprint": grid["recipe_fingerprints"][row],
            "settings": {**grid["row_settings"][row], "--seed": str(seed)},
        },
    }
    (run / "results.json").write_text(json.dumps(results))
    (run / "train.log").write_text(log)


def table(lines, first_header):
    """The Markdown table whose header starts with `first_header`: [{header: cell}] per row."""
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    header = [c.strip() for c in lines[start].strip().strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, [c.strip() for c in line.strip().strip("|").split("|")])))
    return rows


def report(out_dirs, report_dir):
    """fairseq-asam-report's table4.md (lines) and table4.csv (rows as dicts)."""
    argv = [str(d) for d in out_dirs] + ["--report-dir", str(report_dir)]
    assert report_main(argv) == 0
    markdown = (report_dir / "table4.md").read_text(encoding="utf-8")
    rows = list(csv.DictReader(io.StringIO((report_dir / "table4.csv").read_text())))
    return markdown.splitlines(), rows


# --------------------------------------------------------------------------------------------
# In-training BLEU
# --------------------------------------------------------------------------------------------


def test_in_training_bleu_is_the_logged_value_at_the_evaluated_checkpoints_update(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    grid = write_grid(out, seeds=(1, 2))  # tiny, best-bleu: trained with --eval-bleu
    # Seed 1: the best epoch is the 2nd (8 updates); fairseq's checkpoint of an epoch's end
    # records the epoch its iterator resumes with (3), whose BLEU (2.0) is not the one to show.
    log = valid_line(1, 4, 1.0) + valid_line(2, 8, 2.5) + valid_line(3, 12, 2.0)
    write_run(out, grid, "adam", 1, {"num_updates": 8, "epoch": 3}, (9.0, 8.5, 7.0, 6.5), log)
    log = valid_line(1, 4, 1.5) + valid_line(2, 8, 3.0) + valid_line(3, 12, 3.7)
    write_run(out, grid, "adam", 2, {"num_updates": 12, "epoch": 4}, (11.0, 10.5, 9.0, 8.5), log)
    lines, rows = report([out], tmp_path / "report")

    runs = {r["Run"]: r for r in table(lines, "Run")}
    assert runs["adam-seed1"][IN_TRAINING] == "2.50" and runs["adam-seed2"][IN_TRAINING] == "3.70"
    assert runs["adam-seed1"]["Valid BLEU"] == "9.00"  # fairseq-generate's, another score
    (adam,) = table(lines, "Optimizer")
    # mean (2.5 + 3.7) / 2 = 3.1, sample std |3.7 - 2.5| / √2 = 0.8485
    assert adam[IN_TRAINING] == "3.10 ± 0.85" and adam["Valid BLEU"] == "10.00 ± 1.41"
    (row,) = rows
    assert float(row["in_training_valid_bleu_mean"]) == pytest.approx(3.1, abs=1e-9)
    assert float(row["in_training_valid_bleu_std"]) == pytest.approx(0.8485, abs=1e-9)
    # A caption says what the column is and how it differs from fairseq-generate's scores.
    (caption,) = [line for line in lines if line.startswith(f"{IN_TRAINING}:")]
    for word in ("--eval-bleu", "fairseq-generate", "batching", "detokeniz"):
        assert word in caption, caption


@pytest.mark.parametrize(
    "protocol, eval_bleu, sources, shown",
    [
        ("best-loss", False, 1, "–"),  # trained without --eval-bleu: nothing logged
        ("best-loss", True, 1, "3.70"),  # --eval-bleu without selecting by it
        ("last", True, 1, "3.70"),
        ("average:2", True, 2, "–"),  # no validation scored the average of two epochs
    ],
)
def test_in_training_bleu_only_where_fairseq_logged_it_for_that_checkpoint(
    tmp_path, protocol, eval_bleu, sources, shown
):
    out = tmp_path / "out"
    out.mkdir()
    grid = write_grid(out, checkpoint=protocol, eval_bleu=eval_bleu)
    bleu = (2.5, 3.7) if eval_bleu else (None, None)
    log = valid_line(1, 8, bleu[0]) + valid_line(2, 12, bleu[1])
    # an average names its newest source's updates (12, whose logged BLEU is 3.7)
    checkpoint = {"num_updates": 12, "sources": [f"checkpoint{e}.pt" for e in (2, 1)][:sources]}
    write_run(out, grid, "adam", 1, checkpoint, (9.0, 8.5, 7.0, 6.5), log)
    lines, (row,) = report([out], tmp_path / "report")
    (run,) = table(lines, "Run")
    (adam,) = table(lines, "Optimizer")
    assert run[IN_TRAINING] == shown and adam[IN_TRAINING] == shown
    assert row["in_training_valid_bleu_mean"] == ("" if shown == "–" else "3.7")


def test_a_mean_of_in_training_bleu_over_fewer_runs_says_over_how_many(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    grid = write_grid(out, seeds=(1, 2))
    log = valid_line(1, 8, 2.5)
    write_run(out, grid, "adam", 1, {"num_updates": 8}, (9.0, 8.5, 7.0, 6.5), log)
    write_run(out, grid, "adam", 2, {"num_updates": 8}, (11.0, 10.5, 9.0, 8.5), "")  # no log
    lines, (row,) = report([out], tmp_path / "report")
    (adam,) = table(lines, "Optimizer")
    assert adam[IN_TRAINING] == "2.50 (n = 1)" and adam["Valid BLEU"] == "10.00 ± 1.41"
    assert row["in_training_valid_bleu_mean"] == "2.5" and row["n"] == "2"


# --------------------------------------------------------------------------------------------
# The budget, and the paper's numbers beside the paper preset only
# --------------------------------------------------------------------------------------------


def test_the_papers_numbers_stand_beside_the_paper_preset_at_its_budget_only(tmp_path):
    folders = {}
    for name, preset, max_update in (
        ("tiny", "tiny", None),  # the preset's own 200 updates
        ("paper", "paper", None),  # the recipe's 50,000
        ("paper40", "paper", 40),  # the paper preset cut to 40 updates
    ):
        out = folders[name] = tmp_path / name
        out.mkdir()
        grid = write_grid(out, preset, max_update)
        write_run(out, grid, "adam", 1, {"num_updates": 8}, (30.0, 29.0, 28.0, 27.0))
    lines, rows = report(folders.values(), tmp_path / "report")

    by_folder = {r["Folder"]: r for r in table(lines, "Optimizer")}
    tiny, paper, paper40 = (by_folder[str(folders[n])] for n in ("tiny", "paper", "paper40"))
    assert (paper["Paper valid"], paper["Paper test"]) == ("35.34", "34.86")
    for row in (tiny, paper40):
        assert (row["Paper valid"], row["Paper test"]) == ("–", "–")
    budget = "Budget (--max-update)"
    assert (tiny[budget], paper[budget], paper40[budget]) == ("200", "50000", "40")
    by_folder = {r["folder"]: r for r in rows}
    assert [by_folder[str(folders[n])]["paper_valid_bleu"] for n in folders] == ["", "35.34", ""]
    assert [by_folder[str(folders[n])]["max_update"] for n in folders] == ["200", "50000", "40"]
    # A line says why the other rows have none.
    (why,) = [line for line in lines if "not comparable" in line]
    assert "--preset tiny" in why and "--max-update 40" in why and "50000" in why


def test_a_report_of_the_tiny_preset_shows_no_paper_numbers_and_says_why(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    grid = write_grid(out, "tiny")
    write_run(out, grid, "adam", 1, {"num_updates": 8}, (96.98, 97.06, 95.0, 94.0))
    lines, (row,) = report([out], tmp_path / "report")
    text = "\n".join(lines)
    assert "35.34" not in text and "34.86" not in text and "Paper valid" not in text
    assert (row["paper_valid_bleu"], row["paper_test_bleu"], row["max_update"]) == ("", "", "200")
    (adam,) = table(lines, "Optimizer")
    assert adam["Budget (--max-update)"] == "200"
    (why,) = [line for line in lines if "not comparable" in line]
    assert "--preset tiny" in why


def test_a_folder_without_grid_json_states_each_runs_budget_and_no_paper_numbers(tmp_path):
    """A folder made by hand (e.g. the hydra route): no preset is known, so no comparison; the
    budget is the runs' own (training.json or command.txt)."""
    out = tmp_path / "out"
    grid = write_grid(tmp_path, "paper")  # for the shape of a run only; not in `out`
    write_run(out, {**grid, "preset": None}, "adam", 1, {"num_updates": 8}, (30, 29, 28, 27))
    run = out / "runs" / "adam-seed1"
    results = json.loads((run / "results.json").read_text())
    del results["training"]
    (run / "results.json").write_text(json.dumps(results))
    (run / "command.txt").write_text("fairseq-train data --optimizer adam --max-update 300\n")
    lines, (row,) = report([out], tmp_path / "report")
    (adam,) = table(lines, "Optimizer")
    assert adam["Budget (--max-update)"] == "300" and row["max_update"] == "300"
    assert "Paper valid" not in "\n".join(lines) and row["paper_valid_bleu"] == ""
    (why,) = [line for line in lines if "not comparable" in line]
    assert "no preset" in why


# --------------------------------------------------------------------------------------------
# Assumptions said to be assumptions
# --------------------------------------------------------------------------------------------


def test_tokenized_bleu_as_table_4s_metric_is_called_an_assumption(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    grid = write_grid(out, "paper")
    write_run(out, grid, "adam", 1, {"num_updates": 8}, (30.0, 29.0, 28.0, 27.0))
    lines, _ = report([out], tmp_path / "report")
    claims = [
        line
        for line in lines
        if any(s in line for s in ("Table 4's metric", "paper's metric", "metric of Table 4"))
    ]
    assert claims and all("assumed" in line for line in claims), claims
