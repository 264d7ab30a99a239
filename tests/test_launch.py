"""The launcher's own logic on stub trainers (tests/launch_stubs.py), in seconds: a run's stamps
(skip, resume, continue, refuse), failures kept to their run, the run lock, Ctrl-C, and the
submitit jobs (submitit's local executor for real; Slurm through fake sbatch/sacct commands).
test_table4.py runs the same paths on fairseq itself."""

import os
import signal
import subprocess
import sys
import threading

import launch_stubs
import pytest
from harness import read_json, wait_for_file

from fairseq_asam_experiments import files, grid, launch, recipe, table4
from fairseq_asam_experiments.errors import ExperimentError

DATA_BIN = "/data-bin"  # the stubs never read it; the runs' settings name it


@pytest.fixture
def stubbed(monkeypatch):
    launch_stubs.install(monkeypatch.setattr)
    monkeypatch.setattr(launch, "CHILDREN", launch.Children())  # checkpoint() stops it
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def run(stub, name=None):
    runs = {r.name: r for r in stub.runs()}
    return launch.run_one(stub, runs[name or next(iter(runs))], DATA_BIN, {})


def run_dir(out, name="adam-seed1"):
    return out / "runs" / name


def set_mode(out, name, mode):
    os.makedirs(run_dir(out, name), exist_ok=True)
    (run_dir(out, name) / launch_stubs.MODE_FILE).write_text(mode)


def lines(path, prefix="stub: "):
    return [line for line in path.read_text().splitlines() if line.startswith(prefix)]


def test_a_runs_settings_are_its_command_but_where_it_writes(tmp_path):
    tiny = grid.Grid(str(tmp_path), grid.PRESETS["tiny"], sweeps=(grid.parse_sweep("lr=1e-3"),))
    for one in tiny.runs():
        settings, command = tiny.settings(one, "data"), tiny.command(one, "data")
        assert settings["data"] == os.path.abspath("data") == command[3]
        inside = tiny.settings(one, str(tmp_path / "data" / "bin"))["data"]
        assert inside == os.path.join("data", "bin")  # relative: a moved folder keeps its runs
        assert settings["--lr"] == "0.001" and "--save-dir" not in settings  # where, not what
        options = [(flag, value) for flag, value in settings.items() if flag != "data"]
        assert command[4:-4] == recipe.merge_options(options)
        assert command[-4::2] == ["--save-dir", "--user-dir"]


def test_a_finished_run_is_skipped_and_its_evaluation_kept(stubbed, tmp_path):
    stub = launch_stubs.stub_grid(tmp_path, max_update=4, sharpness_rho=0.05)
    results = read_json(run(stub))
    assert results["valid"]["bleu"] == 4.0 and results["max_update"] == 4
    assert results["sharpness"]["estimates"][0]["sharpness"] == 0.25
    assert results["sweep"] == {} and results["row"] == "adam" and results["seed"] == 1
    assert files.read_stamp(run_dir(tmp_path), "train") == stub.settings(stub.runs()[0], DATA_BIN)
    run(stub)
    assert len(lines(run_dir(tmp_path) / "train.log", "stub: resumed")) == 1  # trained once
    assert (run_dir(tmp_path) / launch_stubs.EVALUATIONS_FILE).read_text() == "4\n"


def test_an_interrupted_run_resumes_from_checkpoint_last(stubbed, tmp_path):
    stub = launch_stubs.stub_grid(tmp_path, max_update=4)
    set_mode(tmp_path, "adam-seed1", "sleep")
    children = launch.Children()

    def interrupt():
        wait_for_file(run_dir(tmp_path) / launch_stubs.STARTED_FILE)
        children.stop(grace=10)

    stopper = threading.Thread(target=interrupt)
    stopper.start()
    outcome = launch.launch_local(stub, stub.runs(), DATA_BIN, {}, [], children)
    stopper.join()
    assert outcome == {"adam-seed1": ("interrupted", "adam-seed1: interrupted in train, resumable")}
    assert lines(run_dir(tmp_path) / "train.log") == ["stub: interrupted"]
    assert not (run_dir(tmp_path) / "failure.json").exists()  # not a failure
    assert files.read_stamp(run_dir(tmp_path), "train") is None  # not finished
    with pytest.raises(ExperimentError, match="adam-seed1 was trained .*--max-update 4 → 3"):
        launch.check_runs(launch_stubs.stub_grid(tmp_path, max_update=3), DATA_BIN)  # started
    # The trainer had saved checkpoint_last.pt at update 2 (as fairseq does): resumed from it.
    (run_dir(tmp_path) / launch_stubs.MODE_FILE).unlink()
    (run_dir(tmp_path) / "checkpoints").mkdir()
    (run_dir(tmp_path) / "checkpoints" / "checkpoint_last.pt").write_text('{"updates": 2}')
    launch.check_runs(stub, DATA_BIN)  # the same settings: no refusal
    assert read_json(run(stub))["valid"]["bleu"] == 4.0
    assert lines(run_dir(tmp_path) / "train.log")[1:] == [
        "stub: resumed from 2",
        "stub: update 3 lr 5e-3",
        "stub: update 4 lr 5e-3",
    ]


def test_a_raised_max_update_continues_and_is_evaluated_again(stubbed, tmp_path):
    run(launch_stubs.stub_grid(tmp_path, max_update=4))
    longer = launch_stubs.stub_grid(tmp_path, max_update=6)
    launch.check_runs(longer, DATA_BIN)
    results = read_json(run(longer))
    assert results["valid"]["bleu"] == 6.0 and results["max_update"] == 6
    assert lines(run_dir(tmp_path) / "train.log", "stub: resumed") == [
        "stub: resumed from 0",
        "stub: resumed from 4",
    ]
    assert (run_dir(tmp_path) / launch_stubs.EVALUATIONS_FILE).read_text() == "4\n6\n"
    assert "--max-update 6" in (run_dir(tmp_path) / "command.txt").read_text()


@pytest.mark.parametrize(
    "changed, named",
    [
        ({"max_update": 3}, "--max-update 4 → 3"),  # lowered: not a continuation
        ({"sweeps": (grid.parse_sweep("dropout=0.3"),)}, None),  # another run, no conflict
        ({"config_dir": "edited"}, "--lr 5e-3 → 7e-3"),
    ],
)
def test_a_changed_setting_is_refused_naming_it_before_any_run(stubbed, tmp_path, changed, named):
    run(launch_stubs.stub_grid(tmp_path / "out", max_update=4))
    if changed.get("config_dir") == "edited":  # the recipe's argument file edited
        import shutil

        edited = tmp_path / "configs"
        shutil.copytree(recipe.config_dir(), edited)
        overrides = edited / "tiny" / "overrides.args"
        overrides.write_text(overrides.read_text().replace("--lr 5e-3", "--lr 7e-3"))
        changed = {"config_dir": str(edited)}
    other = launch_stubs.stub_grid(tmp_path / "out", **{"max_update": 4, **changed})
    log = run_dir(tmp_path / "out") / "train.log"
    before = log.read_text()
    if named is None:
        launch.check_runs(other, DATA_BIN)
        return
    with pytest.raises(ExperimentError) as refused:
        launch.check_runs(other, DATA_BIN)
    message = str(refused.value)
    assert message.startswith("adam-seed1 was trained with other settings (") and named in message
    assert "\n" not in message
    assert log.read_text() == before  # nothing ran


def test_every_kind_of_failure_is_recorded_and_the_grid_goes_on(stubbed, tmp_path, monkeypatch):
    stub = launch_stubs.stub_grid(tmp_path, rows=("adam", "sam", "asam"), sharpness_rho=0.05)
    set_mode(tmp_path, "adam-seed1", "fail")
    set_mode(tmp_path, "sam-seed1", "kill")
    outcomes = launch.launch_local(stub, stub.runs(), DATA_BIN, {}, [])
    assert outcomes["adam-seed1"][0] == "failed" and "exit code 1" in outcomes["adam-seed1"][1]
    assert "killed by signal 9 (SIGKILL)" in outcomes["sam-seed1"][1]
    assert outcomes["asam-seed1"] == ("done", "")  # the grid went on
    failure = read_json(run_dir(tmp_path, "sam-seed1") / "failure.json")
    assert failure["stage"] == "train" and "SIGKILL" in failure["error"] and failure["time"]
    assert not (run_dir(tmp_path, "sam-seed1") / "results.json").exists()
    # A failure after training: recorded with its stage; the run's success removes it.
    (run_dir(tmp_path, "adam-seed1") / launch_stubs.MODE_FILE).unlink()
    broken = ("-c", "import sys; sys.exit(3)")
    monkeypatch.setattr(launch, "SHARPNESS_COMMAND", (sys.executable, *broken))
    with pytest.raises(ExperimentError):
        run(stub, "adam-seed1")
    failure = read_json(run_dir(tmp_path, "adam-seed1") / "failure.json")
    assert failure["stage"] == "sharpness" and "exit code 3" in failure["error"]
    monkeypatch.setattr(launch, "SHARPNESS_COMMAND", launch_stubs.SHARPNESS_COMMAND)
    run(stub, "adam-seed1")
    assert not (run_dir(tmp_path, "adam-seed1") / "failure.json").exists()
    assert len(lines(run_dir(tmp_path, "adam-seed1") / "train.log", "stub: resumed")) == 1


def test_a_locked_run_is_skipped_and_said(stubbed, tmp_path, caplog):
    stub = launch_stubs.stub_grid(tmp_path)
    os.makedirs(run_dir(tmp_path))
    lock = str(run_dir(tmp_path) / "run.lock")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import filelock, time; held = filelock.FileLock({lock!r}); held.acquire(); "
            "print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        assert launch.lock_holder(str(run_dir(tmp_path))) == "a launcher"
        outcomes = launch.launch_local(stub, stub.runs(), DATA_BIN, {}, [])
        assert outcomes["adam-seed1"][0] == "locked"
        assert f"adam-seed1: skipped, another launcher holds {lock}" in caplog.text
        assert not (run_dir(tmp_path) / "train.log").exists()  # nothing done on it
    finally:
        holder.kill()
        holder.wait()
    assert launch.lock_holder(str(run_dir(tmp_path))) is None  # freed with its process
    assert read_json(run(stub))["valid"]["bleu"] == 4.0


def start_launcher(out, rows):
    tests = os.path.dirname(os.path.abspath(__file__))
    return subprocess.Popen(
        [sys.executable, os.path.join(tests, "launch_stubs.py"), "launch", str(out), "4", rows],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_ctrl_c_exits_130_stops_the_children_and_leaves_every_run_resumable(tmp_path):
    set_mode(tmp_path, "adam-seed1", "sleep")
    launcher = start_launcher(tmp_path, "adam,sam,asam")
    (trainer,) = map(int, wait_for_file(run_dir(tmp_path) / launch_stubs.STARTED_FILE).split())
    launcher.send_signal(signal.SIGINT)  # Ctrl-C to the launcher only
    stdout, stderr = launcher.communicate(timeout=60)
    assert launcher.returncode == 130, stderr[-2000:]
    assert "interrupted (Ctrl-C): adam-seed1, sam-seed1, asam-seed1 stopped" in stderr
    assert "resumable" in stderr and len(stderr.strip().splitlines()) == 1
    with pytest.raises(ProcessLookupError):  # stopped and waited for
        os.kill(trainer, 0)
    assert lines(run_dir(tmp_path) / "train.log") == ["stub: interrupted"]
    assert not (run_dir(tmp_path) / "failure.json").exists()
    for name in ("sam-seed1", "asam-seed1"):  # queued: never started
        assert not run_dir(tmp_path, name).exists()
    (run_dir(tmp_path) / launch_stubs.MODE_FILE).unlink()
    again = start_launcher(tmp_path, "adam,sam,asam")
    stdout, stderr = again.communicate(timeout=120)
    assert again.returncode == 0, stderr[-2000:]
    assert "adam-seed1: resuming from checkpoint_last.pt" in stdout
    for name in ("adam-seed1", "sam-seed1", "asam-seed1"):
        assert read_json(run_dir(tmp_path, name) / "results.json")["valid"]["bleu"] == 4.0


def job_flags(*argv):
    return table4.parser().parse_args(["--time-min", "5", *argv])


@pytest.mark.slow
def test_submitit_local_runs_each_run_as_a_job_and_records_failures(stubbed, tmp_path, monkeypatch):
    tests = os.path.dirname(os.path.abspath(__file__))
    monkeypatch.setenv("PYTHONPATH", tests + os.pathsep + os.environ.get("PYTHONPATH", ""))
    stub = launch_stubs.stub_grid(tmp_path, rows=("adam", "asam"))
    set_mode(tmp_path, "asam-seed1", "fail")
    outcomes = launch.launch_jobs(
        stub, stub.runs(), DATA_BIN, {}, job_flags("--launcher", "submitit-local")
    )
    assert outcomes["adam-seed1"] == ("done", "")
    assert (
        outcomes["asam-seed1"][0] == "failed"
        and "train: fairseq-train failed" in outcomes["asam-seed1"][1]
    )
    assert read_json(run_dir(tmp_path) / "results.json")["valid"]["bleu"] == 4.0
    job = read_json(run_dir(tmp_path) / "job.json")
    assert job["launcher"] == "submitit-local" and job["job_id"]
    assert read_json(run_dir(tmp_path, "asam-seed1") / "failure.json")["stage"] == "train"


def test_a_requeued_job_resumes_from_checkpoint_last(stubbed, tmp_path):
    stub = launch_stubs.stub_grid(tmp_path, max_update=4)
    job = launch.RunJob(stub, stub.runs()[0], DATA_BIN, {})
    os.makedirs(run_dir(tmp_path) / "checkpoints")
    (run_dir(tmp_path) / "checkpoints" / "checkpoint_last.pt").write_text('{"updates": 3}')
    requeued = job.checkpoint()  # submitit's call on a timeout: stops the children, requeues
    assert launch.CHILDREN.stopping.is_set()
    assert isinstance(requeued.function, launch.RunJob) and requeued.function is not job
    launch.CHILDREN = launch.Children()  # the requeued job runs in a fresh process
    assert requeued.function() == ("done", "")
    assert lines(run_dir(tmp_path) / "train.log", "stub: resumed") == ["stub: resumed from 3"]


FAKE_SLURM = {
    "srun": "exit 0",  # submitit looks for it
    "sbatch": 'n=$(ls "$FAKE_SLURM" | wc -l); cp "${@: -1}" "$FAKE_SLURM/script-$n"; '
    'echo "Submitted batch job $((100 + n))"',
}


def test_slurm_submits_the_runs_as_an_array_and_the_report_after_them(
    stubbed, tmp_path, monkeypatch
):
    bin_dir, record = tmp_path / "bin", tmp_path / "sbatch"
    bin_dir.mkdir()
    record.mkdir()
    for name, body in FAKE_SLURM.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM", str(record))
    out = tmp_path / "out"
    stub = launch_stubs.stub_grid(out, rows=("adam", "asam"))
    flags = job_flags("--launcher", "slurm", "--partition", "gpu", "--sbatch", "account=nlp")
    assert launch.launch_jobs(stub, stub.runs(), DATA_BIN, {}, flags, (print, "report")) is None
    scripts = sorted(record.iterdir())
    assert len(scripts) == 2  # the runs' job array, then the report's job
    run_script, report_script = (s.read_text() for s in scripts)
    assert "#SBATCH --array=0-1" in run_script
    assert "#SBATCH --partition=gpu" in run_script and "#SBATCH --account=nlp" in run_script
    assert "#SBATCH --time=5" in run_script and "#SBATCH --gpus-per-node=1" in run_script
    assert "#SBATCH --dependency=afterany:100" in report_script
    assert "#SBATCH --gpus-per-node=0" in report_script  # the report needs no GPU
    assert read_json(run_dir(out) / "job.json")["job_id"] == "100_0"
    assert read_json(run_dir(out, "asam-seed1") / "job.json")["job_id"] == "100_1"
