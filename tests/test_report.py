"""What fairseq-asam-report says, read from its files: output folders written by hand in the
formats of design.md (grid.json, results.json, failure.json, fairseq-train's json log lines as
a real run logs them), every expected number computed by hand here.

* mean ± sample std over seeds; seeds of two folders pooled when their settings agree;
* the in-training BLEU of the evaluated checkpoint's epoch (issue 16);
* the --max-update budget stated; the paper's numbers beside the paper preset at its budget only;
* tokenized BLEU as Table 4's metric called an assumption;
* a failed or unfinished run shown with its status;
* BLEU against any swept option; the plots of what the runs logged.
"""

import csv
import io
import os

import filelock
import pytest
from harness import (
    markdown_rows,
    train_inner_log_line,
    valid_log_line,
    write_grid_record,
    write_run_folder,
)

from fairseq_asam_experiments import launch, report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IN_TRAINING = "Valid BLEU (in-training)"
BUDGET = "Budget (--max-update)"
# Three epochs of 4 updates, logged with --eval-bleu: the BLEU of epoch e is BLEU[e].
BLEU = {1: 1.0, 2: 2.5, 3: 3.7}
LOG = "".join(valid_log_line(e, 4 * e, 8 - e, BLEU[e]) for e in BLEU)


@pytest.fixture(autouse=True)
def _no_png(request, monkeypatch):
    """Rendering a PNG costs about 0.5 s: a test that reads no plot builds the figures and
    skips the rendering (those that read them ask for `rendered`)."""
    if "rendered" not in request.fixturenames:
        monkeypatch.setattr(report, "_save", lambda *args: None)


@pytest.fixture
def rendered():
    """The report's PNGs rendered (see _no_png)."""


def run_report(tmp_path, *folders):
    """fairseq-asam-report FOLDER... --out: table4.md's text, table4.csv's rows."""
    out = tmp_path / "report"
    assert report.main([str(f) for f in folders] + ["--out", str(out)]) == 0
    rows = list(csv.DictReader(io.StringIO((out / "table4.csv").read_text(encoding="utf-8"))))
    return (out / "table4.md").read_text(encoding="utf-8"), rows


def at_epoch(epoch, updates=None, sources=1):
    return {"checkpoint": {"epoch": epoch, "num_updates": updates, "sources": ["c"] * sources}}


# --------------------------------------------------------------------------------------------
# Means over seeds, and the in-training BLEU
# --------------------------------------------------------------------------------------------


def test_a_row_is_the_mean_and_sample_std_over_its_seeds(tmp_path):
    out = tmp_path / "out"
    write_grid_record(out, seeds=[1, 2], runs=["adam-seed1", "adam-seed2"])
    write_run_folder(out, "adam-seed1", (9.0, 8.5, 7.0, 6.5), LOG, **at_epoch(2, 8))
    write_run_folder(out, "adam-seed2", (11.0, 10.5, 9.5, 8.0), LOG, seed=2, **at_epoch(3, 12))
    text, (row,) = run_report(tmp_path, out)
    (adam,) = markdown_rows(text, "Row")
    # valid (9 + 11) / 2 = 10, sample std |11 - 9| / √2 = 1.414; sacreBLEU test 7.25 ± 1.06
    assert (adam["Seeds"], adam["Valid BLEU"], adam["Test BLEU"]) == (
        "1,2",
        "10.00 ± 1.41",
        "9.50 ± 1.41",
    )
    assert (adam["Valid sacreBLEU"], adam["Test sacreBLEU"]) == ("8.25 ± 1.77", "7.25 ± 1.06")
    # in-training: epoch 2's 2.5 and epoch 3's 3.7: mean 3.1, sample std 1.2 / √2 = 0.8485
    assert adam[IN_TRAINING] == "3.10 ± 0.85"
    assert float(row["in_training_bleu_mean"]) == pytest.approx(3.1, abs=1e-9)
    assert float(row["in_training_bleu_std"]) == pytest.approx(0.8485, abs=1e-4)
    assert float(row["valid_bleu_std"]) == pytest.approx(1.4142, abs=1e-4) and row["n"] == "2"
    runs = {r["Run"]: r for r in markdown_rows(text, "Run")}
    assert [runs[n][IN_TRAINING] for n in ("adam-seed1", "adam-seed2")] == ["2.50", "3.70"]
    assert [runs[n]["Updates"] for n in ("adam-seed1", "adam-seed2")] == ["8", "12"]
    (caption,) = [line for line in text.splitlines() if line.startswith(f"{IN_TRAINING}:")]
    for word in ("--eval-bleu", "fairseq-generate", "batching", "detokeniz", "epoch"):
        assert word in caption


@pytest.mark.parametrize(
    "checkpoint, shown",
    [
        (at_epoch(2, 8), "2.50"),
        (at_epoch(3, 12), "3.70"),  # the control: another epoch, another value
        (at_epoch(2), "2.50"),  # no update count recorded: the epoch alone
        (at_epoch(4, 16), "–"),  # an epoch the log has no validation of
        (at_epoch(3, 10), "–"),  # epoch 3 validated at 12 updates, not at the checkpoint's 10
        (at_epoch(3, 12, sources=2), "–"),  # an average of two checkpoints: no validation
    ],
)
def test_in_training_bleu_is_the_one_logged_at_the_checkpoints_epoch(tmp_path, checkpoint, shown):
    out = tmp_path / "out"
    write_grid_record(out, runs=["adam-seed1"])
    write_run_folder(out, "adam-seed1", (9.0, 8.5, 7.0, 6.5), LOG, **checkpoint)
    text, (row,) = run_report(tmp_path, out)
    assert markdown_rows(text, "Run")[0][IN_TRAINING] == shown
    assert markdown_rows(text, "Row")[0][IN_TRAINING] == shown
    assert row["in_training_bleu_mean"] == ("" if shown == "–" else str(float(shown)))


def test_a_run_trained_without_eval_bleu_has_no_in_training_bleu_and_the_mean_says_over_how_many(
    tmp_path,
):
    out = tmp_path / "out"
    write_grid_record(out, seeds=[1, 2], runs=["adam-seed1", "adam-seed2"])
    write_run_folder(out, "adam-seed1", (9.0, 8.5, 7.0, 6.5), LOG, **at_epoch(2, 8))
    no_bleu = "".join(valid_log_line(e, 4 * e, 8 - e) for e in BLEU)
    write_run_folder(out, "adam-seed2", (11.0, 10.5, 9.0, 8.5), no_bleu, seed=2, **at_epoch(2, 8))
    text, _ = run_report(tmp_path, out)
    (adam,) = markdown_rows(text, "Row")
    assert adam[IN_TRAINING] == "2.50 (n = 1)" and adam["Valid BLEU"] == "10.00 ± 1.41"


def test_seeds_of_two_folders_with_the_same_settings_are_pooled_and_another_budget_is_not(
    tmp_path,
):
    first, second, longer = tmp_path / "first", tmp_path / "second", tmp_path / "longer"
    write_grid_record(first, runs=["adam-seed1"])
    write_run_folder(first, "adam-seed1", (9.0, 8.0, 7.0, 6.0))
    write_grid_record(second, seeds=[2], runs=["adam-seed2"])
    write_run_folder(second, "adam-seed2", (12.0, 11.0, 10.0, 9.0), seed=2)
    write_grid_record(longer, max_update=400, runs=["adam-seed1"])
    write_run_folder(longer, "adam-seed1", (20.0, 19.0, 18.0, 17.0), max_update=400)
    text, rows = run_report(tmp_path, first, second, longer, first)  # `first` named twice
    pooled, alone = markdown_rows(text, "Row")
    assert (pooled["Seeds"], pooled[BUDGET], pooled["Valid BLEU"]) == ("1,2", "200", "10.50 ± 2.12")
    assert pooled["Folders"] == f"{first} {second}"
    assert (alone["Seeds"], alone[BUDGET], alone["Valid BLEU"]) == ("1", "400", "20.00")
    assert [r["max_update"] for r in rows] == ["200", "400"] and rows[0]["n"] == "2"
    assert len(markdown_rows(text, "Run")) == 3  # each run once, with its folder


# --------------------------------------------------------------------------------------------
# The budget, the paper's numbers, the assumed metric
# --------------------------------------------------------------------------------------------


def test_the_papers_numbers_stand_beside_the_paper_preset_at_its_budget_only(tmp_path):
    folders = []
    for name, preset, budget in (
        ("tiny", "tiny", 200),
        ("paper", "paper", 50000),
        ("cut", "paper", 40),
    ):
        out = tmp_path / name
        folders.append(out)
        runs = ["adam-seed1", "asam-rho0.2-seed1", "asam-rho0.5-seed1"]
        write_grid_record(out, preset=preset, max_update=budget, rows=["adam", "asam"], runs=runs)
        settings = dict(preset=preset, max_update=budget)
        write_run_folder(out, runs[0], (30.0, 29.0, 28.0, 27.0), **settings)
        for run, rho in zip(runs[1:], ("0.2", "0.5")):
            write_run_folder(
                out, run, (31.0, 30.0, 29.0, 28.0), row="asam", sweep={"rho": rho}, **settings
            )
    text, rows = run_report(tmp_path, *folders)
    table = {(r["Row"], r["Preset"], r[BUDGET]): r for r in markdown_rows(text, "Row")}
    assert len(table) == 9
    paper = {key: (r["Paper valid"], r["Paper test"]) for key, r in table.items()}
    assert paper.pop(("Adam", "paper", "50000")) == ("35.34", "34.86")
    assert paper.pop(("Adam+ASAM (ρ = 0.2)", "paper", "50000")) == ("35.66", "35.02")
    assert set(paper.values()) == {("–", "–")}  # tiny, 40 updates, ρ = 0.5: none
    assert sorted(
        (r["paper_valid_bleu"], r["paper_test_bleu"]) for r in rows if r["paper_valid_bleu"]
    ) == [
        ("35.34", "34.86"),
        ("35.66", "35.02"),
    ]
    (why,) = [line for line in text.splitlines() if "not comparable" in line]
    assert "`--preset tiny`" in why and "`--max-update 40`" in why and "50000" in why
    assert "rows other than the paper's" in why  # ρ = 0.5


def test_a_tiny_preset_report_shows_no_paper_number_says_why_and_states_its_budget(tmp_path):
    out = tmp_path / "out"
    write_grid_record(out, runs=["adam-seed1"])
    write_run_folder(out, "adam-seed1", (96.98, 97.06, 95.0, 94.0), **at_epoch(1, 4))
    text, (row,) = run_report(tmp_path, out)
    for number in ("35.34", "34.86", "35.66", "35.02", "35.52", "34.78", "Paper valid"):
        assert number not in text
    assert (row["paper_valid_bleu"], row["max_update"]) == ("", "200")
    (why,) = [line for line in text.splitlines() if "not comparable" in line]
    assert "`--preset tiny`" in why
    (budget,) = [line for line in text.splitlines() if line.startswith("Budget:")]
    assert budget.startswith(f"Budget: --max-update 200 (grid.json of {out});")
    assert markdown_rows(text, "Row")[0][BUDGET] == "200"
    assert markdown_rows(text, "Run")[0]["Updates"] == "4"


def test_the_paper_preset_budget_is_the_recipes():
    with open(os.path.join(REPO, "configs", "iwslt14_de_en", "common.args"), encoding="utf-8") as f:
        words = f.read().split()
    assert words[words.index("--max-update") + 1] == report.PAPER_MAX_UPDATE


def test_tokenized_bleu_as_table_4s_metric_is_called_an_assumption(tmp_path):
    out = tmp_path / "out"
    write_grid_record(out, preset="paper", max_update=50000, runs=["adam-seed1"])
    write_run_folder(out, "adam-seed1", (30.0, 29.0, 28.0, 27.0), preset="paper", max_update=50000)
    text, _ = run_report(tmp_path, out)
    claims = [
        line for line in text.splitlines() if "Table 4's metric" in line or "paper's metric" in line
    ]
    assert claims and all("assumed" in line for line in claims)


# --------------------------------------------------------------------------------------------
# Runs without a result, sharpness, sweeps, plots
# --------------------------------------------------------------------------------------------


def test_every_run_of_the_grid_is_listed_with_its_status(tmp_path):
    out = tmp_path / "out"
    names = ["adam-seed1", "adam-seed2", "adam-seed3", "adam-seed4", "adam-seed5", "adam-seed6"]
    write_grid_record(out, seeds=[1, 2, 3, 4, 5, 6], runs=names)
    write_run_folder(out, "adam-seed1", (9.0, 8.0, 7.0, 6.0))
    write_run_folder(out, "adam-seed2", None, LOG, failure=("train", "CUDA out of memory.\nTried"))
    write_run_folder(out, "adam-seed3", None, LOG)  # interrupted
    write_run_folder(out, "adam-seed4", None, LOG)
    (out / "runs" / "adam-seed4" / "train.done.json").write_text("{}")
    # sharpness failed after the evaluation: its scores count, its status says so
    write_run_folder(out, "adam-seed5", (11.0, 10.0, 9.0, 8.0), seed=5, failure=("sharpness", "x"))
    os.makedirs(out / "runs" / "adam-seed6", exist_ok=True)
    with filelock.FileLock(str(out / "runs" / "adam-seed6" / launch.LOCK_FILE)):
        text, (row,) = run_report(tmp_path, out)
    status = {r["Run"]: r["Status"] for r in markdown_rows(text, "Run")}
    assert status == {
        "adam-seed1": "done",
        "adam-seed2": "failed in train: CUDA out of memory. Tried",
        "adam-seed3": "not finished (resumable)",
        "adam-seed4": "trained, not evaluated",
        "adam-seed5": "failed in sharpness: x",
        "adam-seed6": status["adam-seed6"],
    }
    assert status["adam-seed6"] == "running (a launcher)"  # the lock is held: in progress
    (missing,) = [line for line in text.splitlines() if line.startswith("No result for ")]
    assert missing.startswith("No result for adam-seed2, adam-seed3, adam-seed4, adam-seed6: ")
    assert (row["seeds"], row["valid_bleu_mean"]) == ("1,5", "10.0")
    (out / "runs" / "adam-seed6" / "train.log").unlink(missing_ok=True)
    text, _ = run_report(tmp_path, out)
    assert {r["Run"]: r["Status"] for r in markdown_rows(text, "Run")}[
        "adam-seed6"
    ] == "not started"


def test_a_report_with_no_result_yet_lists_the_runs(tmp_path):
    out = tmp_path / "out"
    write_grid_record(out, runs=["adam-seed1"])
    text, rows = run_report(tmp_path, out)
    assert rows == [] and markdown_rows(text, "Run")[0]["Status"] == "not started"
    assert text.startswith(
        "# Table 4: IWSLT'14 De→En, Transformer — --checkpoint best-bleu (--preset tiny)"
    )


def test_the_adaptive_sharpness_column_and_its_rho(tmp_path):
    out = tmp_path / "out"
    write_grid_record(out, seeds=[1, 2], sharpness_rho=0.05, runs=["asam-seed1", "asam-seed2"])
    for seed, value in ((1, 0.1), (2, 0.4)):
        sharpness = {"estimates": [{"measure": "plain", "sharpness": 9.0, "rho": 0.05}]}
        sharpness["estimates"].append({"measure": "adaptive", "sharpness": value, "rho": 0.05})
        write_run_folder(
            out,
            f"asam-seed{seed}",
            (9.0, 8.0, 7.0, 6.0),
            row="asam",
            seed=seed,
            sharpness=sharpness,
        )
    text, _ = run_report(tmp_path, out)
    # (0.1 + 0.4) / 2 = 0.25, sample std 0.3 / √2 = 0.2121; the plain estimate is not taken
    assert markdown_rows(text, "Row")[0]["Adaptive sharpness"] == "0.2500 ± 0.2121"
    assert "fairseq-asam-sharpness at ρ = 0.05." in text


@pytest.mark.parametrize("option, name", [("rho", "ρ"), ("lr", "lr")])
def test_bleu_against_a_swept_options_value_with_the_value_valid_bleu_picks(
    tmp_path, option, name, rendered
):
    out = tmp_path / "out"
    values = {"0.05": (32.0, 31.0), "0.2": (34.0, 32.0), "0.5": (33.0, 33.5)}  # + seed
    runs = [f"asam-{option}{v}-seed{s}" for v in values for s in (1, 2)]
    write_grid_record(out, seeds=[1, 2], rows=["adam", "asam"], runs=["adam-seed1", *runs])
    write_run_folder(out, "adam-seed1", (30.0, 29.0, 28.0, 27.0))
    for value, (valid, test) in values.items():
        for seed in (1, 2):
            scores = (valid + seed, test + seed, valid, test)
            write_run_folder(
                out,
                f"asam-{option}{value}-seed{seed}",
                scores,
                row="asam",
                seed=seed,
                sweep={option: value},
            )
    text, _ = run_report(tmp_path, out)
    assert f"## BLEU against {name}" in text
    points = {r[name]: r for r in markdown_rows(text, f"Row | {name}")}
    # valid means 33.5, 35.5, 34.5 (± |1| · √2 / 2 = 0.71): 0.2 picked, though 0.5 tests higher
    assert [
        (p["Valid BLEU"], p["Test BLEU"], p["Picked by valid BLEU"]) for p in points.values()
    ] == [
        ("33.50 ± 0.71", "32.50 ± 0.71", ""),
        ("35.50 ± 0.71", "33.50 ± 0.71", "✓"),
        ("34.50 ± 0.71", "35.00 ± 0.71", ""),
    ]
    assert list(points) == ["0.05", "0.2", "0.5"] and points["0.2"]["Row"] == "Adam+ASAM"
    rows = list(
        csv.DictReader(io.StringIO((tmp_path / "report" / f"bleu_vs_{option}.csv").read_text()))
    )
    assert [(r[option], r["valid_bleu_mean"], r["picked"]) for r in rows] == [
        ("0.05", "33.5", "False"),
        ("0.2", "35.5", "True"),
        ("0.5", "34.5", "False"),
    ]
    assert (tmp_path / "report" / f"bleu_vs_{option}.png").read_bytes().startswith(b"\x89PNG")
    assert markdown_rows(text, "Row")[2]["Row"] == f"Adam+ASAM ({name} = 0.2)"


def test_a_sweep_of_words_is_a_table_and_a_category_plot_and_not_the_papers(tmp_path, rendered):
    out = tmp_path / "out"
    write_grid_record(out, preset="paper", max_update=50000, rows=["asam"])
    for value, valid in (("cosine", 31.0), ("inverse_sqrt", 30.0)):
        scores = (valid, 29.0, 28.0, 27.0)
        sweep = {"lr_scheduler": value}
        settings = dict(row="asam", preset="paper", max_update=50000, sweep=sweep)
        write_run_folder(out, f"asam-{value}-seed1", scores, **settings)
    text, rows = run_report(tmp_path, out)
    picked = {
        r["lr_scheduler"]: r["Picked by valid BLEU"]
        for r in markdown_rows(text, "Row | lr_scheduler")
    }
    assert picked == {"cosine": "✓", "inverse_sqrt": ""}
    assert (tmp_path / "report" / "bleu_vs_lr_scheduler.png").read_bytes().startswith(b"\x89PNG")
    assert [r["paper_valid_bleu"] for r in rows] == ["", ""]  # not the paper's scheduler


def test_one_swept_value_makes_no_sweep_section(tmp_path):
    out = tmp_path / "out"
    write_grid_record(out, rows=["asam"], runs=["asam-rho0.2-seed1"])
    write_run_folder(
        out, "asam-rho0.2-seed1", (9.0, 8.0, 7.0, 6.0), row="asam", sweep={"rho": "0.2"}
    )
    text, _ = run_report(tmp_path, out)
    assert "## BLEU against" not in text and not (tmp_path / "report" / "bleu_vs_rho.png").exists()


def test_the_plots_show_what_each_run_logged_against_updates(tmp_path, monkeypatch, rendered):
    out = tmp_path / "out"
    write_grid_record(out, rows=["adam", "asam"], runs=["adam-seed1", "asam-seed1"])
    adam = train_inner_log_line(1, 2, 7.5) + LOG
    asam = train_inner_log_line(1, 2, 7.4, 0.3) + train_inner_log_line(2, 6, 7.0, 0.2) + LOG
    asam = asam.replace('"sharpness": "0.2"', '"sharpness": "0.2", "sharpness_eval": "0.1"')
    write_run_folder(out, "adam-seed1", (9.0, 8.0, 7.0, 6.0), adam)
    write_run_folder(out, "asam-seed1", (9.0, 8.0, 7.0, 6.0), asam, row="asam")
    plotted = {}
    save = report._save

    def record(axes, path, xlabel, ylabel):
        plotted[os.path.basename(path)] = [
            (line.get_label(), line.get_linestyle(), list(line.get_xdata()), list(line.get_ydata()))
            for line in axes.get_lines()
        ]
        save(axes, path, xlabel, ylabel)

    monkeypatch.setattr(report, "_save", record)
    text, _ = run_report(tmp_path, out)
    assert plotted["sharpness.png"] == [
        ("asam-seed1 — sharpness", "-", [2.0, 6.0], [0.3, 0.2]),
        ("asam-seed1 — sharpness_eval", "--", [6.0], [0.1]),
    ]
    losses = [(name, x, y) for name, _, x, y in plotted["valid_loss.png"]]
    assert losses == [
        (f"{r}-seed1 — valid_loss", [4.0, 8.0, 12.0], [7.0, 6.0, 5.0]) for r in ("adam", "asam")
    ]
    assert plotted["valid_bleu.png"][0][3] == [1.0, 2.5, 3.7]
    for name in ("valid_loss.png", "valid_bleu.png", "sharpness.png"):
        assert (tmp_path / "report" / name).read_bytes().startswith(b"\x89PNG")
        assert f"- {name}: " in text
    assert "not across optimizers" in text


def test_read_train_log_reads_fairseq_and_hydra_lines_and_keeps_the_last_of_an_update(tmp_path):
    path = tmp_path / "train.log"
    hydra = "[2026-12-03 18:55:36,000][valid][INFO] - "
    hydra += '{"epoch": 2, "valid_loss": "6.5", "valid_num_updates": "8"}\n'
    path.write_text(
        "2026-12-03 18:55:30 | INFO | fairseq_cli.train | Namespace(...)\n"
        + train_inner_log_line(1, 2, 7.4, 0.3)
        + valid_log_line(1, 4, 7.0, 1.0)
        + valid_log_line(2, 8, 6.9, 2.0)
        + '2026-12-03 18:55:35 | INFO | valid | {"epoch": 3, "valid_lo\n'  # cut by a crash
        + hydra  # the resumed run validates update 8 again
    )
    log = report.read_train_log(str(path))
    valid = log[log.tag == "valid"]
    assert list(valid.updates) == [4, 8] and list(valid.valid_loss) == [7.0, 6.5]
    inner = log[log.tag == "train_inner"]
    assert list(inner.sharpness) == [0.3] and list(inner.updates) == [2]


def test_bad_folders_fail_in_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for argv, message in (
        ([str(tmp_path / "missing")], f"no grid.json nor runs/* in {tmp_path / 'missing'}"),
        ([str(tmp_path / "empty")], f"no grid.json nor runs/* in {tmp_path / 'empty'}"),
        ([str(tmp_path), str(tmp_path / "empty")], "--out is required with several folders"),
    ):
        assert report.main(argv) == 1
        error = capsys.readouterr().err
        assert error.startswith("fairseq-asam-report: error: ") and message in error
        assert error.count("\n") == 1


def test_one_folders_report_goes_into_it_and_is_printed(tmp_path, capsys):
    out = tmp_path / "out"
    write_grid_record(out, runs=["adam-seed1"])
    write_run_folder(out, "adam-seed1", (9.0, 8.0, 7.0, 6.0))
    assert report.main([str(out)]) == 0
    text = (out / "report" / "table4.md").read_text(encoding="utf-8")
    assert text.strip() in capsys.readouterr().out
    assert report.write_report([str(out)], str(tmp_path / "r")) == str(tmp_path / "r" / "table4.md")
