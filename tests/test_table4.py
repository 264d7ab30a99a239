"""fairseq-asam-table4 on fairseq itself: the session's ONE tiny-preset grid (conftest's
`tiny_grid`: run by this checkout's wheel outside the checkout, on the session's prepared sample
through --data-bin, asam over two learning rates, a few updates, --sharpness-rho, each run a
submitit-local job, the report; the README's `make tiny` prepares the preset's archive and runs
all three rows locally) that the tests read; the tests that change outputs work on a copy, and
run here, locally.  Then bad flags (one line, before any work) and --help without torch."""

import os
import shutil
import subprocess
import sys

import pytest
from harness import TINY_GRID_ARGV as ARGV
from harness import TINY_GRID_LEARNING_RATES as LEARNING_RATES
from harness import TINY_GRID_RUNS as RUNS
from harness import TINY_GRID_UPDATES as UPDATES
from harness import TINY_GRID_WARMUP as WARMUP
from harness import read_json

from fairseq_asam_experiments import table4


@pytest.fixture(scope="session")
def tiny_out(tiny_grid):
    return tiny_grid.out


@pytest.fixture(scope="session")
def data_flags(tiny_grid):
    return ["--data-bin", tiny_grid.data_bin]


def copy_of(out, tmp_path):
    shutil.copytree(out, tmp_path / "out", symlinks=True)
    return tmp_path / "out"


def train_lines(path):
    """fairseq-train's end-of-epoch `train` records (json log format)."""
    import json

    text = path.read_text().splitlines()
    return [json.loads(line.split(" | ", 3)[3]) for line in text if " | INFO | train | " in line]


@pytest.mark.slow
def test_a_sweep_of_the_learning_rate_trains_each_run_with_its_own(tiny_out):
    """The issue's test: a grid sweeping a fairseq-train option other than ρ/η."""
    grid = read_json(tiny_out / "grid.json")
    assert grid["runs"] == RUNS and grid["max_update"] == UPDATES
    assert grid["sweeps"] == [{"option": "lr", "values": list(LEARNING_RATES), "optimizers": None}]
    for name in RUNS:
        row, lr = name.split("-")[0], name.split("-")[1][2:]
        run = tiny_out / "runs" / name
        assert f" --lr {lr} " in (run / "command.txt").read_text()
        last = train_lines(run / "train.log")[-1]  # the sample's epoch is shorter than UPDATES
        # inverse_sqrt warms up linearly from 0: after k updates, lr × k / warmup.
        assert float(last["train_lr"]) == pytest.approx(float(lr) * UPDATES / WARMUP, rel=1e-9)
        assert last["train_num_updates"] == str(UPDATES)
        results = read_json(run / "results.json")
        assert results["sweep"] == {"lr": lr} and (results["row"], results["seed"]) == (row, 1)
        assert results["optimizer"] == row and results["max_update"] == UPDATES
        assert results["preset"] == "tiny" and results["protocol"] == "best-bleu"
        assert f"--lr {lr}" in results["train_command"]
        assert results["checkpoint"]["num_updates"] <= UPDATES
        assert os.path.isfile(results["checkpoint"]["path"])
        assert results["valid"]["sentences"] > 0 and results["test"]["sentences"] > 0
        (estimate,) = results["sharpness"]["estimates"]
        assert estimate["measure"] == "adaptive" and estimate["rho"] == 0.05
        assert not (run / "failure.json").exists()
    table = (tiny_out / "report" / "table4.md").read_text()
    assert all(name in table for name in RUNS)
    assert (tiny_out / "report" / "table4.csv").is_file()


@pytest.mark.slow
def test_the_same_command_again_skips_every_finished_run(tiny_out, data_flags, capsys):
    run = tiny_out / "runs" / RUNS[0]
    before = {p: p.stat().st_mtime_ns for p in run.iterdir() if p.is_file() and p.suffix != ".lock"}
    assert table4.main(ARGV + data_flags + ["--out", str(tiny_out)]) == 0
    after = {p: p.stat().st_mtime_ns for p in before}
    assert after == before  # not trained, evaluated nor measured again
    assert f"{RUNS[0]}: trained" in capsys.readouterr().out


@pytest.mark.slow
def test_a_changed_setting_is_refused_in_one_line_naming_it(tiny_out, data_flags, tmp_path, capsys):
    out = copy_of(tiny_out, tmp_path)
    log = (out / "runs" / RUNS[0] / "train.log").read_text()
    argv = ARGV + data_flags + ["--out", str(out), "--checkpoint", "best-loss"]
    assert table4.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{RUNS[0]} was trained with other settings (" in err
    assert "--best-checkpoint-metric bleu → loss" in err  # the setting named
    assert (out / "runs" / RUNS[0] / "train.log").read_text() == log  # nothing ran


@pytest.mark.slow
def test_a_raised_max_update_continues_from_checkpoint_last(tiny_out, data_flags, tmp_path):
    out = copy_of(tiny_out, tmp_path)
    argv = ["--preset", "tiny", "--optimizers", "asam", "--sweep", "lr=0.004", "--out", str(out)]
    argv += data_flags
    assert table4.main(argv + ["--max-update", str(UPDATES + 2)]) == 0
    run = out / "runs" / RUNS[0]
    text = (run / "train.log").read_text()
    before = train_lines(tiny_out / "runs" / RUNS[0] / "train.log")  # the grid's training
    assert text.startswith((tiny_out / "runs" / RUNS[0] / "train.log").read_text())  # appended
    loaded = f"(epoch {before[-1]['epoch']} @ {UPDATES} updates)"  # fairseq's checkpoint_last.pt
    assert loaded in text
    updates = [line["train_num_updates"] for line in train_lines(run / "train.log")]
    assert updates == [line["train_num_updates"] for line in before] + [str(UPDATES + 2)]
    assert read_json(run / "results.json")["max_update"] == UPDATES + 2
    assert (out / "runs" / RUNS[1] / "train.log").read_text() == (
        tiny_out / "runs" / RUNS[1] / "train.log"
    ).read_text()  # the grid's other runs untouched


@pytest.mark.slow
def test_submitit_local_ran_each_run_as_a_job(tiny_out):
    records = [read_json(tiny_out / "runs" / name / "job.json") for name in RUNS]
    assert [record["launcher"] for record in records] == ["submitit-local"] * len(RUNS)
    jobs = {record["job_id"] for record in records}
    assert len(jobs) == len(RUNS)
    for job in jobs:  # each job's own log, where the run's stages are logged
        (log,) = (tiny_out / "submitit").glob(f"{job}_*log.out")
        assert "evaluating --checkpoint best-bleu" in log.read_text()


def test_ctrl_c_during_the_preparation_is_one_line_and_130(tmp_path, monkeypatch, capsys):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(table4, "prepare_data", interrupted)
    assert table4.main(["--preset", "tiny", "--out", str(tmp_path / "out")]) == 130
    err = capsys.readouterr().err
    assert err == "fairseq-asam-table4: interrupted (Ctrl-C)\n"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--optimizers", "adam,adamw"], "--optimizers: got 'adam,adamw'; choose from adam,sam"),
        (["--seeds", "2,2"], "--seeds: '2,2' names a seed twice"),
        (["--max-update", "0"], "--max-update must be >= 1, got 0"),
        (["--checkpoint", "newest"], "--checkpoint"),
        (
            ["--checkpoint", "average:6"],
            "average:6 averages the last 6 epoch checkpoints, and row adam's argument files keep 5",
        ),
        (["--sweep", "lr"], "--sweep takes OPTION=V1,V2,... (e.g. lr=5e-4,1e-3), got 'lr'"),
        (["--sweep", "seed=1,2"], "--sweep seed: set it with --seeds"),
        (["--sweep", "lr=1e-3", "--sweep", "lr=2e-3"], "--sweep: an option is swept twice"),
        (["--rho", "0.1", "--optimizers", "adam"], "--sweep rho: no row of --optimizers (adam)"),
        (["--sweep", "lrr=0.1"], "fairseq-train does not know --lrr 0.1"),
        (["--amp"], "--amp needs a GPU, and none is visible"),
        (["--partition", "gpu"], "--partition is a job option: it needs --launcher slurm"),
        (["--launcher", "slurm"], "--launcher slurm needs Slurm's sbatch and srun on PATH"),
        (["--archive", "{tmp}/missing.tgz"], "--archive: file not found: {tmp}/missing.tgz"),
        (["--data-bin", "{tmp}/missing"], "--data-bin: folder not found: {tmp}/missing"),
        (["--preset", "paper"], "--preset paper needs --archive (the IWSLT'14 de-en.tgz)"),
    ],
)
def test_a_bad_flag_fails_in_one_line_before_any_work(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    argv = [a.format(tmp=tmp_path) for a in argv]
    preset = [] if "--preset" in argv else ["--preset", "tiny"]
    assert table4.main(preset + argv + ["--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fairseq-asam-table4: error: ")
    assert message.format(tmp=tmp_path) in err
    assert not out.exists()


def test_help_imports_no_torch():
    code = (
        "import sys\nfrom fairseq_asam_experiments import table4\ntry:\n"
        "    table4.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "--sweep OPTION=V1,V2" in done.stdout and "--launcher" in done.stdout
