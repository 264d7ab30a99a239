"""ρ/η sweeps of the Table 4 runner: parsing, one row per value with its own folder and training
settings, never a run of one value reused for another, and the report's BLEU against ρ.

fairseq is replaced by runner_stubs (seconds); the slow test sweeps two ρ on the tiny preset.
"""

import json
import os
import subprocess
import sys

import pytest
import runner_stubs

from fairseq_asam_experiments import runner, synthetic_data
from fairseq_asam_experiments.cli import table4_main
from fairseq_asam_experiments.errors import SettingError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def test_sweep_values_parse_to_one_spelling():
    assert runner.parse_sweep("rho", "0.05, 0.1,0.2,.5") == ("0.05", "0.1", "0.2", "0.5")
    assert runner.parse_sweep("rho", "5e-2,1e-5,2") == ("0.05", "0.00001", "2")  # no '-' in names
    assert runner.parse_sweep("eta", "0,0.01") == ("0", "0.01")
    for name, text, message in (
        ("rho", "0.1,abc", "--rho must be a comma-separated list of numbers, got '0.1,abc'"),
        ("rho", "0.1,0", "--rho: every value must be a finite number > 0, got '0'"),
        ("rho", "nan", "--rho: every value must be a finite number > 0"),
        ("eta", "-0.01", "--eta: every value must be a finite number >= 0, got '-0.01'"),
        ("rho", "0.1,0.10,1e-1", "--rho: '0.1,0.10,1e-1' names 0.1 twice"),
    ):
        with pytest.raises(SettingError) as error:
            runner.parse_sweep(name, text)
        assert message in str(error.value)


def test_each_value_is_a_row_with_its_own_folder_and_settings(tmp_path):
    config = runner_stubs.tiny_grid(
        runner,
        tmp_path,
        optimizers=("adam", "sam", "asam", "asam_interval5"),
        seeds=(1, 2),
        sweep={"rho": ("0.05", "0.1"), "eta": ("0.01", "0.1")},
    )
    names = [run.name for run in config.runs]
    assert names[:4] == ["adam-seed1", "adam-seed2", "sam-rho0.05-seed1", "sam-rho0.05-seed2"]
    assert "sam-rho0.1-seed2" in names and "sam-rho0.1-eta0.01-seed1" not in names  # SAM: no η
    assert "asam-rho0.05-eta0.1-seed1" in names and "asam_interval5-rho0.1-eta0.01-seed2" in names
    assert len(names) == 2 * (1 + 2 + 4 + 4)
    fingerprints = {}
    for run in config.runs:
        settings = config.training_settings(run)
        values = dict(run.hparams)
        assert settings.get("--rho") == values.get("rho", settings.get("--rho"))
        if "eta" in values:
            assert settings["--eta"] == values["eta"]
        if run.optimizer == "asam_interval5":
            assert settings["--sam-interval"] == "5"  # the schedule row keeps its schedule
        command = config.command(run)
        assert command[command.index("--save-dir") + 1].endswith(f"runs/{run.name}/checkpoints")
        fingerprints.setdefault(run.row, set()).add(runner.recipe_fingerprint(settings))
    assert all(len(f) == 1 for f in fingerprints.values())  # the seeds of a row: one recipe
    assert len({f.pop() for f in fingerprints.values()}) == len(fingerprints)  # rows: distinct


def test_a_sweep_name_no_row_takes_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    for argv, message in (
        (["--optimizers", "adam", "--rho", "0.1"], "--rho: no row of --optimizers (adam) takes it"),
        (["--optimizers", "adam,sam", "--eta", "0.1"], "--eta: no row of --optimizers (adam,sam)"),
        (["--rho", "0.1,-1"], "--rho: every value must be a finite number > 0, got '-1'"),
    ):
        assert table4_main(["--preset", "tiny", "--out", str(out)] + argv) == 1
        stderr = capsys.readouterr().err
        assert stderr.count("\n") == 1 and message in stderr, stderr
        assert not out.exists()


def test_rows_of_two_values_never_reuse_each_other(stubbed, tmp_path):
    out = tmp_path / "out"
    grid = runner_stubs.tiny_grid
    runner.run_grid(grid(runner, out, optimizers=("asam",), sweep={"rho": ("0.1",)}))
    first = out / "runs" / "asam-rho0.1-seed1"
    log = (first / "train.log").read_text()
    assert read_json(first / "training.json")["settings"]["--rho"] == "0.1"
    assert read_json(first / "results.json")["row"] == "asam-rho0.1"

    # Another value trains its own run; the first is not touched.
    runner.run_grid(grid(runner, out, optimizers=("asam",), sweep={"rho": ("0.1", "0.2")}))
    assert (first / "train.log").read_text() == log
    second = read_json(out / "runs" / "asam-rho0.2-seed1" / "training.json")
    assert second["settings"]["--rho"] == "0.2" and second["status"] == "finished"
    assert second["fingerprint"] != read_json(first / "training.json")["fingerprint"]

    # A folder whose name says one ρ and whose record another is refused, not reused.
    record = read_json(first / "training.json")
    record["settings"]["--rho"] = "0.3"
    (first / "training.json").write_text(json.dumps(record))
    with pytest.raises(SettingError, match=r"asam-rho0.1-seed1 trained with other settings: --rho"):
        runner.run_grid(grid(runner, out, optimizers=("asam",), sweep={"rho": ("0.1",)}))


def test_the_report_of_a_later_sweep_keeps_the_earlier_values_each_at_its_budget(stubbed, tmp_path):
    out = tmp_path / "out"
    grid = runner_stubs.tiny_grid
    runner.run_grid(grid(runner, out, optimizers=("asam",), sweep={"rho": ("0.05",)}))
    runner.run_grid(grid(runner, out, optimizers=("asam",), sweep={"rho": ("0.1",)}, max_update=12))
    runner.run_grid(grid(runner, out, optimizers=("adam", "asam"), sweep={"rho": ("0.2",)}))
    text = (out / "report" / "table4.md").read_text()
    assert "| Adam+ASAM (ρ = 0.05) | 1 | best-bleu |" in text  # same recipe, another ρ: kept
    assert "| Adam+ASAM (ρ = 0.2) | 1 | best-bleu |" in text
    # 12 updates: a row of its own, its budget on it (results.json's max_update)
    assert "| Adam+ASAM (ρ = 0.1) | 1 | best-bleu | tiny | 12 |" in text


def test_report_writes_the_rho_files_for_a_sweep_grid(stubbed, tmp_path):
    out = tmp_path / "out"
    config = runner_stubs.tiny_grid(
        runner, out, optimizers=("asam",), seeds=(1, 2), sweep={"rho": ("0.1", "0.2")}
    )
    runner.run_grid(config)
    assert (out / "report" / "bleu_vs_rho.png").read_bytes().startswith(b"\x89PNG")
    assert (out / "report" / "bleu_vs_rho.csv").is_file()
    text = (out / "report" / "table4.md").read_text()
    assert "| Adam+ASAM | 0.1 | 1,2 |" in text and text.count("| ✓ |") == 1  # a tie: the first
    grid = read_json(out / "grid.json")
    assert grid["rows"] == ["asam-rho0.1", "asam-rho0.2"] and grid["sweep"] == {
        "rho": ["0.1", "0.2"]
    }


@pytest.mark.slow
def test_tiny_preset_sweeps_two_rho_values_to_the_table_and_plot(tmp_path):
    archive = synthetic_data.build_sample_archive(str(tmp_path / "de-en.tgz"), n_train=300, n_dev=4)
    out = tmp_path / "out"
    argv = ["--preset", "tiny", "--optimizers", "asam", "--rho", "0.05,0.2", "--max-update", "12"]
    argv += ["--checkpoint", "best-loss", "--archive", archive, "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "reproduce_table4.py")] + argv,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for rho in ("0.05", "0.2"):
        command = (out / "runs" / f"asam-rho{rho}-seed1" / "command.txt").read_text()
        assert f"--rho {rho} " in command and "--eta 0.01 " in command
    text = (out / "report" / "table4.md").read_text()
    assert "## BLEU against ρ" in text and text.count("| ✓ |") == 1
    assert (out / "report" / "bleu_vs_rho.png").read_bytes().startswith(b"\x89PNG")
    assert len((out / "report" / "bleu_vs_rho.csv").read_text().splitlines()) == 3
