"""The Table 4 grid's runs as submitit jobs (experiments.cluster): --launcher slurm and
submitit-local.

Slurm is not here, so the Slurm tests put stand-ins for its commands on PATH (`sbatch` keeps the
script submitit wrote and answers with a job id, `sacct` answers the states a test sets, `srun`
and `scancel` do nothing): submitit's real SlurmExecutor writes the sbatch scripts these tests
read.  The run's work is runner_stubs' trainer and evaluation (seconds), except in the slow
end-to-end test, which runs fairseq through submitit's local executor.
"""

import json
import os
import subprocess
import sys
import threading
import time

import pytest
import runner_stubs
from harness import independent_scores

from fairseq_asam_experiments import cluster, evaluation, runner, synthetic_data
from fairseq_asam_experiments.cli import table4_main
from fairseq_asam_experiments.errors import SettingError
from fairseq_asam_experiments.layout import lock_holder, run_lock

TESTS = os.path.dirname(os.path.abspath(__file__))
TRAIN_COMMAND, EVALUATE = runner.train_command, evaluation.evaluate_checkpoint
REPO = os.path.dirname(TESTS)

FAKE_SBATCH = """#!/bin/bash
n=$(( $(cat "$FAKE_SLURM/counter" 2>/dev/null || echo 4100) + 1 ))
echo $n > "$FAKE_SLURM/counter"
cp "$1" "$FAKE_SLURM/sbatch-$n.sh"
echo "Submitted batch job $n"
"""
FAKE_SACCT = """#!/bin/bash
echo "JobID|State|NodeList"
cat "$FAKE_SLURM/sacct.txt" 2>/dev/null
true
"""


@pytest.fixture
def stubbed(monkeypatch):
    """conftest's, but the trainer is StubGridConfig's own (its command), here and in a job."""
    runner_stubs.install(runner, monkeypatch.setattr, train=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    # submitit's jobs unpickle runner_stubs.StubGridConfig: they import this folder's modules.
    monkeypatch.setenv("PYTHONPATH", TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return runner


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    import submitit

    folder = tmp_path / "fake-slurm"
    folder.mkdir()
    for name, text in (
        ("sbatch", FAKE_SBATCH),
        ("sacct", FAKE_SACCT),
        ("srun", "#!/bin/bash\ntrue\n"),
        ("scancel", "#!/bin/bash\ntrue\n"),
    ):
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM", str(folder))
    submitit.SlurmJob.watcher.clear()
    yield folder
    submitit.SlurmJob.watcher.clear()


def scripts(folder):
    """{job id: sbatch script} of everything submitted to the fake Slurm."""
    return {
        int(p.stem.split("-")[1]): p.read_text()
        for p in folder.glob("sbatch-*.sh")  # sbatch-<id>.sh
    }


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def set_mode(config, run_name, mode):
    folder = os.path.join(config.out_dir, "runs", run_name)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, runner_stubs.MODE_FILE), "w") as f:
        f.write(mode)


SLURM_OPTIONS = cluster.JobOptions(
    partition="gpu",
    time_min=600,
    cpus_per_job=6,
    mem_gb=32,
    max_concurrent=2,
    sbatch={"account": "nlp", "qos": "high"},
    setup=["module load cuda"],
)


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------


def test_sbatch_options_parse_and_bad_job_flags_fail_in_one_line(tmp_path, capsys):
    assert cluster.parse_sbatch(["account=nlp", "--qos=high"]) == {"account": "nlp", "qos": "high"}
    with pytest.raises(SettingError, match="--sbatch takes KEY=VALUE"):
        cluster.parse_sbatch(["account"])
    out = tmp_path / "out"
    for argv, message in (
        (["--partition", "gpu"], "--partition is a job option: it needs --launcher slurm"),
        (["--wait"], "--wait is a job option: it needs --launcher slurm"),
        (
            ["--launcher", "submitit-local", "--sbatch", "account=x"],
            "--sbatch is a job option: it needs --launcher slurm",
        ),
        (
            ["--launcher", "submitit-local", "--gpus-per-job", "1"],
            "--gpus-per-job: submitit-local gives its jobs no GPU",
        ),
        (["--launcher", "slurm", "--time-min", "0"], "--time-min must be >= 1, got 0"),
        (
            ["--launcher", "slurm", "--gpus-per-job", "0", "--amp"],
            "--amp needs a GPU, and the jobs",
        ),
    ):
        assert table4_main(["--preset", "tiny", "--out", str(out)] + argv) == 1, argv
        stderr = capsys.readouterr().err
        assert stderr.count("\n") == 1 and message in stderr, (argv, stderr)
        assert not out.exists()


def test_slurm_parameters_reach_the_sbatch_script(tmp_path, fake_slurm):
    """What submitit's real SlurmExecutor writes from our parameters."""
    import submitit

    executor = cluster.make_executor(str(tmp_path), "slurm", SLURM_OPTIONS)
    executor.update_parameters(**cluster.executor_parameters("slurm", SLURM_OPTIONS, "table4-x"))
    assert executor._executor.max_num_timeout == 3
    jobs = []
    with executor.batch():
        for _ in range(3):
            jobs.append(executor.submit(print, "hello"))
    (script,) = scripts(fake_slurm).values()
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --time=600",
        "#SBATCH --gpus-per-node=1",  # one GPU per run by default: the paper's single-GPU recipe
        "#SBATCH --cpus-per-task=6",
        "#SBATCH --mem=32GB",
        "#SBATCH --account=nlp",
        "#SBATCH --qos=high",
        "#SBATCH --array=0-2%2",  # --max-concurrent 2
        "#SBATCH --signal=USR2@90",  # submitit's requeue signal, before the time limit
        "#SBATCH --job-name=table4-x",
        "module load cuda",
    ):
        assert line in script.splitlines(), (line, script)
    assert [j.job_id for j in jobs] == ["4101_0", "4101_1", "4101_2"]
    assert isinstance(jobs[0], submitit.SlurmJob)


# --------------------------------------------------------------------------------------------
# --launcher slurm: submission, re-runs, the report job
# --------------------------------------------------------------------------------------------


def test_slurm_submits_each_run_once_and_a_report_job_after_them(stubbed, tmp_path, fake_slurm):
    config = runner_stubs.stub_grid(tmp_path / "out", optimizers=("adam", "asam"), seeds=(1, 2))
    assert cluster.submit_grid(config, "slurm", SLURM_OPTIONS) == {}  # submitted, not waited
    submitted = scripts(fake_slurm)
    assert sorted(submitted) == [4101, 4102]
    assert "#SBATCH --array=0-3%2" in submitted[4101]
    report_script = submitted[4102]
    assert "#SBATCH --dependency=afterany:4101" in report_script
    assert "--gpus-per-node" not in report_script and "#SBATCH --cpus-per-task=1" in report_script
    assert "#SBATCH --account=nlp" in report_script and "#SBATCH --time=30" in report_script
    names = [run.name for run in config.runs]
    for index, name in enumerate(names):
        record = read_json(tmp_path / "out" / "runs" / name / cluster.JOB_RECORD)
        assert record["job_id"] == f"4101_{index}" and record["launcher"] == "slurm"
        # Nothing ran here: the jobs train (and take the lock) on their nodes.
        assert not (tmp_path / "out" / "runs" / name / "training.json").exists()
    assert (tmp_path / "out" / "submitit").is_dir()
    assert read_json(tmp_path / "out" / "grid.json")["rows"] == ["adam", "asam"]

    # Again while the jobs are queued or running: nothing is submitted twice.
    lines = [f"4101_{i}|{'RUNNING' if i < 2 else 'PENDING'}|node" for i in range(4)]
    (fake_slurm / "sacct.txt").write_text("\n".join(lines) + "\n")
    outputs = cluster.submit_grid(config, "slurm", SLURM_OPTIONS)  # only the report of now
    assert sorted(scripts(fake_slurm)) == [4101, 4102]
    table = open(outputs["table4.md"]).read()
    assert "| asam-seed2 | best-bleu | submitted as slurm job 4101_3, not started |" in table

    # The jobs run (here, the pickled functions submitit would run on the nodes): adam-seed2
    # is killed by the cluster before it finishes; the others finish.
    import cloudpickle

    folder = tmp_path / "out" / "submitit"
    for index, name in enumerate(names):
        pickled = folder / f"4101_{index}_submitted.pkl"
        delayed = cloudpickle.loads(pickled.read_bytes())
        assert isinstance(delayed.function, cluster.RunJob) and delayed.function.run.name == name
        if name != "adam-seed2":
            assert delayed.result()["status"] == "done"
    # Unpickled here, the stub config patched nothing of this process (later tests run fairseq).
    assert runner.train_command is TRAIN_COMMAND
    lines[2] = "4101_2|NODE_FAIL|node"
    lines = [line.replace("RUNNING", "COMPLETED").replace("PENDING", "COMPLETED") for line in lines]
    (fake_slurm / "sacct.txt").write_text("\n".join(lines) + "\n")

    # Again: only the run that did not finish is submitted (a single job, no array).
    assert cluster.submit_grid(config, "slurm", SLURM_OPTIONS) == {}
    submitted = scripts(fake_slurm)
    assert sorted(submitted) == [4101, 4102, 4103, 4104]
    assert "--array" not in submitted[4103]
    assert "#SBATCH --dependency=afterany:4103" in submitted[4104]
    assert read_json(tmp_path / "out" / "runs" / "adam-seed2" / cluster.JOB_RECORD)["job_id"] == (
        "4103"
    )
    delayed = cloudpickle.loads((folder / "4103_submitted.pkl").read_bytes())
    assert delayed.result()["status"] == "done"

    # The report job's function writes the report; on a finished grid the launcher only writes
    # the report and submits nothing.
    report_job = cloudpickle.loads((folder / "4104_submitted.pkl").read_bytes())
    assert "table4.md" in report_job.result()
    outputs = cluster.submit_grid(config, "slurm", SLURM_OPTIONS)
    assert set(outputs) >= {"table4.md", "table4.csv"}
    assert sorted(scripts(fake_slurm)) == [4101, 4102, 4103, 4104]
    table = (tmp_path / "out" / "report" / "table4.md").read_text()
    assert "| Adam | 1,2 | best-bleu | 20.00 ± 0.00 |" in table


def test_a_run_locked_elsewhere_is_not_submitted(stubbed, tmp_path, fake_slurm):
    config = runner_stubs.stub_grid(tmp_path / "out", optimizers=("adam", "asam"))
    with run_lock(str(tmp_path / "out" / "runs" / "adam-seed1")):
        cluster.submit_grid(config, "slurm", SLURM_OPTIONS)
    (script,) = [s for s in scripts(fake_slurm).values() if "--dependency" not in s]
    assert "--array" not in script  # one run: asam-seed1
    assert not (tmp_path / "out" / "runs" / "adam-seed1" / cluster.JOB_RECORD).exists()
    assert (tmp_path / "out" / "runs" / "asam-seed1" / cluster.JOB_RECORD).exists()


def test_a_corrupt_job_record_is_submitted_again_not_a_failed_submission(
    stubbed, tmp_path, fake_slurm
):
    config = runner_stubs.stub_grid(tmp_path / "out", optimizers=("adam",))
    run_dir = tmp_path / "out" / "runs" / "adam-seed1"
    run_dir.mkdir(parents=True)
    (run_dir / cluster.JOB_RECORD).write_text('{"launcher": "slurm", ')  # truncated
    cluster.submit_grid(config, "slurm", SLURM_OPTIONS)
    assert read_json(run_dir / cluster.JOB_RECORD)["launcher"] == "slurm"  # the new job's


# --------------------------------------------------------------------------------------------
# The job on its node: the lock, requeueing
# --------------------------------------------------------------------------------------------


def test_the_job_takes_the_runs_lock_itself(stubbed, tmp_path):
    config = runner_stubs.stub_grid(tmp_path / "out", optimizers=("adam",))
    run = config.runs[0]
    job = cluster.RunJob(config, run, config.data_bin_path, {})
    with run_lock(config.run_dir(run)):  # e.g. a local launcher, or a job of another launcher
        assert job()["status"] == "locked"
        assert not os.path.exists(os.path.join(config.run_dir(run), "training.json"))
    set_mode(config, run.name, "sleep")
    thread = threading.Thread(target=job)
    thread.start()
    try:
        wait_for(os.path.join(config.run_dir(run), runner_stubs.STARTED_FILE))
        holder = lock_holder(config.run_dir(run))
        assert holder and f"pid {os.getpid()} " in holder  # held by the job's process
    finally:
        job.checkpoint()  # stops the trainer
        thread.join(timeout=60)
    assert lock_holder(config.run_dir(run)) is None


def wait_for(path, seconds=60):
    deadline = time.monotonic() + seconds
    while not (os.path.exists(path) and open(path).read().endswith("\n")):
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)
    return [int(line) for line in open(path).read().split()]


def test_a_requeued_job_resumes_from_checkpoint_last(stubbed, tmp_path):
    """Timeout or preemption: submitit calls checkpoint(); the trainer stops, the lock is free,
    and the requeued function (pickled as submitit does) continues the run where it stopped."""
    import cloudpickle
    import submitit

    config = runner_stubs.stub_grid(tmp_path / "out", optimizers=("asam",), max_update=60)
    run = config.runs[0]
    run_dir = config.run_dir(run)
    set_mode(config, run.name, "slow")
    job = cluster.RunJob(config, run, config.data_bin_path, {})
    results = []
    thread = threading.Thread(target=lambda: results.append(job()))
    thread.start()
    (trainer,) = wait_for(os.path.join(run_dir, runner_stubs.STARTED_FILE))
    last = os.path.join(run_dir, "checkpoints", "checkpoint_last.pt")
    deadline = time.monotonic() + 60
    while not os.path.exists(last) or read_json(last)["updates"] < 3:
        assert time.monotonic() < deadline
        time.sleep(0.05)

    delayed = job.checkpoint()  # what submitit's signal handler calls
    thread.join(timeout=60)
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    assert results[0]["status"] == "interrupted"
    stopped_at = read_json(last)["updates"]
    assert 3 <= stopped_at < 60
    assert not os.path.exists(f"/proc/{trainer}")  # stopped and reaped
    assert lock_holder(run_dir) is None  # the requeued job can take it
    assert read_json(os.path.join(run_dir, "training.json"))["status"] == "running"
    assert not os.path.exists(os.path.join(run_dir, "failure.json"))

    requeued = cloudpickle.loads(cloudpickle.dumps(delayed))  # as submitit dumps and loads it
    assert isinstance(requeued.function, cluster.RunJob) and requeued.function is not job
    os.unlink(os.path.join(run_dir, runner_stubs.MODE_FILE))  # the rest at the usual speed
    assert requeued.result()["status"] == "done"
    state = read_json(last)
    assert state == {"updates": 60, "seed": 1, "resumed_from": stopped_at}  # resumed, not anew
    log = open(os.path.join(run_dir, "train.log")).read()
    assert f"Loaded checkpoint {last} (epoch 1 @ {stopped_at} updates)" in log
    assert read_json(os.path.join(run_dir, "results.json"))["valid"]["bleu"] == 60.0


# --------------------------------------------------------------------------------------------
# submitit's local executor: real jobs, real processes
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_submitit_local_runs_the_grid_as_jobs_and_writes_the_report(stubbed, tmp_path):
    config = runner_stubs.stub_grid(tmp_path / "out", optimizers=("adam", "asam"))
    set_mode(config, "asam-seed1", "fail")
    options = cluster.JobOptions(time_min=10, max_concurrent=1)
    with pytest.raises(runner.GridFailed, match=r"1 run\(s\) failed: asam-seed1: train: "):
        cluster.submit_grid(config, "submitit-local", options)
    out = tmp_path / "out"
    assert read_json(out / "runs" / "adam-seed1" / "results.json")["valid"]["bleu"] == 20.0
    assert read_json(out / "runs" / "asam-seed1" / "failure.json")["stage"] == "train"
    job_id = read_json(out / "runs" / "adam-seed1" / cluster.JOB_RECORD)["job_id"]
    logs = (out / "submitit" / f"{job_id}_0_log.out").read_text()
    assert "adam-seed1: job on " in logs and "adam-seed1: done" in logs  # the job's own log
    assert (out / "report" / "table4.md").exists()

    os.unlink(out / "runs" / "asam-seed1" / runner_stubs.MODE_FILE)
    outputs = cluster.submit_grid(config, "submitit-local", options)
    assert "table4.md" in outputs
    assert read_json(out / "runs" / "asam-seed1" / "results.json")["valid"]["bleu"] == 20.0
    assert not (out / "runs" / "asam-seed1" / "failure.json").exists()


@pytest.mark.slow
def test_ctrl_c_cancels_the_local_jobs_and_leaves_runs_resumable(tmp_path):
    import signal

    out = tmp_path / "out"
    config = runner_stubs.stub_grid(out, optimizers=("adam", "asam"))
    set_mode(config, "adam-seed1", "sleep")
    env = {**os.environ, "PYTHONPATH": TESTS + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    launcher = subprocess.Popen(
        [sys.executable, runner_stubs.STUB, "launch-jobs", str(out), "adam,asam"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    (trainer,) = wait_for(out / "runs" / "adam-seed1" / runner_stubs.STARTED_FILE)
    launcher.send_signal(signal.SIGINT)  # Ctrl-C to the launcher only
    try:
        stdout, stderr = launcher.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        launcher.kill()
        raise
    assert launcher.returncode == 130, stdout[-3000:] + stderr[-3000:]
    assert "jobs cancelled; every run is resumable" in stderr
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{trainer}"):  # the job stopped its trainer
        assert time.monotonic() < deadline, "the trainer outlived its cancelled job"
        time.sleep(0.1)
    assert read_json(out / "runs" / "adam-seed1" / "training.json")["status"] == "running"
    assert not (out / "runs" / "adam-seed1" / "failure.json").exists()
    assert not (out / "runs" / "asam-seed1" / cluster.JOB_RECORD).exists()  # never submitted
    assert lock_holder(str(out / "runs" / "adam-seed1")) is None
    table = (out / "report" / "table4.md").read_text()
    assert "| adam-seed1 | best-bleu | interrupted in training (resumable) |" in table


@pytest.mark.slow
def test_tiny_preset_through_submitit_local_end_to_end(tmp_path):
    """The Done-when command, shortened: fairseq-train, -generate and the report, as a job."""
    archive = synthetic_data.build_sample_archive(str(tmp_path / "de-en.tgz"), n_train=300, n_dev=4)
    out = tmp_path / "out"
    argv = ["--preset", "tiny", "--optimizers", "adam", "--launcher", "submitit-local"]
    argv += ["--max-update", "12", "--archive", archive, "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "reproduce_table4.py")] + argv,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    run = out / "runs" / "adam-seed1"
    results = read_json(run / "results.json")
    assert results["checkpoint"]["num_updates"] <= 12
    # The job's evaluation scored the job's own fairseq-generate output (BLEU rounded to 4
    # decimals in results.json): recomputed here by sacreBLEU alone.
    bleu, _, sentences = independent_scores(run / "generate-test.txt", None)
    assert results["test"]["bleu"] == pytest.approx(bleu, abs=1e-4)
    assert results["test"]["sentences"] == sentences > 0
    job_id = read_json(run / cluster.JOB_RECORD)["job_id"]
    submitit_files = {p.name for p in (out / "submitit").iterdir()}
    assert {f"{job_id}_submitted.pkl", f"{job_id}_0_log.out", f"{job_id}_0_result.pkl"} <= (
        submitit_files
    )
    table = (out / "report" / "table4.md").read_text()
    assert "| Adam | 1 | best-bleu |" in table and table.strip() in proc.stdout
