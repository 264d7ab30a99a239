"""One run of a grid (`run_one`: lock, train, evaluate, sharpness, results.json) and its
launchers: here, one run per GPU (`launch_local`), or a submitit job per run (`launch_jobs`).
A failure goes to failure.json and the grid goes on; Ctrl-C leaves every run resumable.
"""

import collections
import concurrent.futures
import contextlib
import json
import logging
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional, Tuple

import filelock
import submitit

from . import evaluation, files
from .errors import ExperimentError
from .grid import BUDGET_FLAG, CHECKPOINTS_FOLDER, Grid, Run
from .logs import log_to_stdout
from .recipe import plugin_dir

logger = logging.getLogger(__name__)

TRAIN, EVALUATE, SHARPNESS = ("train", "evaluate", "sharpness")  # the stages, and their stamps
COMMAND_FILE, TRAIN_LOG, FAILURE_RECORD = "command.txt", "train.log", "failure.json"
STARTED_RECORD = "train.started.json"  # the settings of a training begun, maybe unfinished
JOB_RECORD, LOCK_FILE, RESULTS = "job.json", "run.lock", "results.json"
SHARPNESS_COMMAND = (sys.executable, "-m", "fairseq_asam_experiments", "sharpness")
STOP_GRACE_SECONDS = 60.0  # Ctrl-C: how long children get after SIGINT before SIGKILL
Outcome = Tuple[str, str]  # (done | failed | locked | interrupted, message)


class RunLocked(ExperimentError):
    """Another launcher (or job) holds the run's lock."""


class Interrupted(ExperimentError):
    """Ctrl-C or a job's timeout: the run stopped where it was, resumable."""

    exit_status = 130  # the shell's status for a program ended by SIGINT


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if isinstance(error, ExperimentError) else f"{type(error).__name__}: {text}"


class Children:
    """A launcher's child processes: stop() starts no more, SIGINTs the running, then SIGKILLs."""

    def __init__(self):
        self._lock, self._started, self.stopping = (threading.Lock(), [], threading.Event())

    def call(self, command, stdout, env=None) -> int:
        with self._lock:
            if self.stopping.is_set():
                raise Interrupted("not started: stopping")
            child = subprocess.Popen(command, stdout=stdout, stderr=subprocess.STDOUT, env=env)
            self._started.append(child)
        return child.wait()

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        with self._lock:
            self.stopping.set()
            children = [child for child in self._started if child.poll() is None]
        for child in children:
            child.send_signal(signal.SIGINT)
        deadline = time.monotonic() + grace
        with contextlib.suppress(subprocess.TimeoutExpired, KeyboardInterrupt):  # 2nd Ctrl-C
            for child in children:
                child.wait(max(0.0, deadline - time.monotonic()))
        for child in children:
            child.kill()  # a no-op on one that ended


CHILDREN = Children()  # a submitit job's (one run per process)


def lock_holder(run_dir: str) -> Optional[str]:
    """'a launcher' if one holds the run's lock now, else None; creates nothing."""
    path = os.path.join(run_dir, LOCK_FILE)
    try:
        if os.path.isfile(path):
            with filelock.FileLock(path).acquire(timeout=0):
                pass
    except filelock.Timeout:
        return "a launcher"
    return None


def train_plan(grid: Grid, run: Run, data_bin: str) -> Optional[str]:
    """What training the run needs (None: done); refuses any change but a raised --max-update."""
    run_dir, settings = grid.run_dir(run), grid.settings(run, data_bin)
    finished = files.read_stamp(run_dir, TRAIN)
    old = finished or files.read_json_object(os.path.join(run_dir, STARTED_RECORD))
    if old is None:
        return "training"
    changes = files.changed_inputs(old, settings)
    if not changes:
        return None if finished is not None else "resuming from checkpoint_last.pt"
    before, after = old.get(BUDGET_FLAG) or "0", settings.get(BUDGET_FLAG) or "0"
    if all(c.startswith(BUDGET_FLAG + " ") for c in changes) and int(after) > int(before):
        return f"{BUDGET_FLAG} {before} → {after}: continuing from checkpoint_last.pt"
    raise ExperimentError(
        f"{run.name} was trained with other settings ({'; '.join(changes)}): run with those, "
        f"delete {run_dir}, or give another --out"
    )


def check_runs(grid: Grid, data_bin: str) -> Dict[str, Optional[str]]:
    """Every run's train_plan before any run starts ({run: plan}): the first refusal raises."""
    return {run.name: train_plan(grid, run, data_bin) for run in grid.runs()}


def call(children: Children, what: str, command: List[str], log: str, env: Dict, mode="a"):
    """`command` with its output to `log`; ExperimentError if it fails or a signal kills it."""
    with open(log, mode, encoding="utf-8") as out:
        returncode = children.call(command, stdout=out, env={**os.environ, **env})
    if returncode != 0:
        names = {s.value: s.name for s in signal.Signals}
        killed = f"was killed by signal {-returncode} ({names.get(-returncode, '?')})"
        how = killed if returncode < 0 else f"failed with exit code {returncode}"
        raise ExperimentError(f"{what} {how}; see {log}")


def train(grid: Grid, run: Run, data_bin: str, env: Dict[str, str], children: Children) -> str:
    """The train stage; returns the command line it trains with (written to command.txt)."""
    run_dir, command = grid.run_dir(run), grid.command(run, data_bin)
    line = " ".join([f"{k}={shlex.quote(v)}" for k, v in env.items()] + [shlex.join(command)])
    plan, settings = train_plan(grid, run, data_bin), grid.settings(run, data_bin)
    logger.info(f"{run.name}: {plan or 'trained'}")
    if plan is not None:
        for stage in (TRAIN, EVALUATE, SHARPNESS):  # a failed redo leaves no stale mark
            files.clear_stamp(run_dir, stage)
        pathlib.Path(run_dir, RESULTS).unlink(missing_ok=True)  # its checkpoint is to change
        files.write_text(os.path.join(run_dir, COMMAND_FILE), line + "\n")
        files.write_json(os.path.join(run_dir, STARTED_RECORD), settings)
        call(children, "fairseq-train", command, os.path.join(run_dir, TRAIN_LOG), env)
        files.write_stamp(run_dir, TRAIN, settings)
    return line


def stage_done(run_dir: str, stage: str, inputs: dict) -> bool:
    """Whether `stage` finished with `inputs`; if not, its stamp is cleared for the redo."""
    if files.read_stamp(run_dir, stage) == json.loads(json.dumps(inputs)):
        return True
    files.clear_stamp(run_dir, stage)
    return False


def evaluate(grid, run, data_bin, references, env, children, command_line) -> dict:
    """results.json (design.md): the run's settings and scores, redone when their inputs change."""
    run_dir = grid.run_dir(run)
    save_dir = os.path.join(run_dir, CHECKPOINTS_FOLDER)
    inputs = evaluation.evaluation_inputs(data_bin, save_dir, grid.protocol, references)
    results = files.read_json_object(os.path.join(run_dir, RESULTS))
    if stage_done(run_dir, EVALUATE, inputs) and results is not None:
        return results
    logger.info(f"{run.name}: evaluating --checkpoint {grid.protocol}")
    options = dict(references=references, output_dir=run_dir, call=children.call)
    scores = evaluation.evaluate_checkpoint(
        data_bin, save_dir, plugin_dir(), grid.protocol, env={**os.environ, **env}, **options
    )
    files.write_stamp(run_dir, EVALUATE, inputs)
    budget = dict(grid.options(run)).get(BUDGET_FLAG)
    described = dict(run=run.name, row=run.row, optimizer=grid.optimizer_of(run.row))
    described.update(seed=run.seed, sweep=dict(run.swept), preset=grid.preset.name)
    described.update(max_update=int(budget) if budget else None, train_command=command_line)
    return {**described, "protocol": str(grid.protocol), **scores}


def sharpness(grid, run, data_bin, results, env, gpu, children) -> dict:
    """The sharpness stage, on the evaluated checkpoint: redone when ρ or the evaluation changes."""
    run_dir, checkpoint = grid.run_dir(run), results["checkpoint"]["path"]
    inputs = dict(rho=grid.sharpness_rho, evaluation=files.read_stamp(run_dir, EVALUATE))
    if stage_done(run_dir, SHARPNESS, inputs) and "sharpness" in results:
        return results["sharpness"]
    logger.info(f"{run.name}: measuring the adaptive sharpness at rho={grid.sharpness_rho}")
    json_path, device = os.path.join(run_dir, "sharpness.json"), "cpu" if gpu is None else "cuda:0"
    command = [*SHARPNESS_COMMAND, checkpoint, data_bin, "--rho", repr(grid.sharpness_rho)]
    command += ["--measures", "adaptive", "--device", device, "--json", json_path]
    log = os.path.join(run_dir, "sharpness.log")
    call(children, "fairseq-asam-sharpness", command, log, env, mode="w")
    files.write_stamp(run_dir, SHARPNESS, inputs)
    return files.read_json_object(json_path)


def run_one(grid: Grid, run: Run, data_bin: str, references: Dict, gpu=None, children=None) -> str:
    """One run's stages under its lock; returns its results.json.  RunLocked if another launcher
    holds it, Interrupted once `children` stop; any other failure goes to failure.json first."""
    children, run_dir = children or CHILDREN, grid.run_dir(run)
    os.makedirs(run_dir, exist_ok=True)
    try:
        lock = filelock.FileLock(os.path.join(run_dir, LOCK_FILE)).acquire(timeout=0)
    except filelock.Timeout as held:
        raise RunLocked(f"{run.name}: skipped, another launcher holds {held.lock_file}") from None
    env = {"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {}
    if gpu is None and grid.preset.cpu_threads and "OMP_NUM_THREADS" not in os.environ:
        env = {"OMP_NUM_THREADS": str(grid.preset.cpu_threads)}
    stage, path = TRAIN, os.path.join(run_dir, RESULTS)
    with lock:
        try:
            logger.info(f"{run.name}: on {'CPU' if gpu is None else 'GPU ' + gpu}")
            line = train(grid, run, data_bin, env, children)
            pathlib.Path(run_dir, FAILURE_RECORD).unlink(missing_ok=True)  # a later stage rewrites
            if references is None:  # train only (fairseq-asam-correlation measures the model)
                return run_dir
            stage = EVALUATE
            if children.stopping.is_set():  # no new stage (an average:N loads checkpoints)
                raise Interrupted("not started: stopping")
            results = evaluate(grid, run, data_bin, references, env, children, line)
            write_results(path, results)
            if grid.sharpness_rho is not None:
                stage = SHARPNESS
                results["sharpness"] = sharpness(grid, run, data_bin, results, env, gpu, children)
                write_results(path, results)
            logger.info(f"{run.name}: done, {path}")
            return path
        except BaseException as error:
            if isinstance(error, (Interrupted, KeyboardInterrupt)) or children.stopping.is_set():
                raise Interrupted(f"{run.name}: interrupted in {stage}, resumable") from error
            write_failure(run_dir, run.name, stage, one_line(error))
            raise


def write_failure(run_dir: str, name: str, stage: str, error: str) -> dict:
    failure = dict(run=name, stage=stage, error=error, time=time.strftime("%FT%T"))
    files.write_json(os.path.join(run_dir, FAILURE_RECORD), failure)
    return failure


def write_results(path: str, results: dict) -> None:
    if results != files.read_json_object(path):  # a skipped run's file stays as it is
        files.write_json(path, results)


def guarded(*arguments, in_job: bool = False):
    """The outcome of run_one(*arguments), what goes wrong kept to that run; in a job, a failure
    raises (a FAILED job)."""
    try:
        run_one(*arguments)
        return "done", ""
    except (RunLocked, Interrupted) as error:
        logger.warning(str(error))
        return ("locked" if isinstance(error, RunLocked) else "interrupted"), str(error)
    except Exception as error:
        logger.error(f"failed: {one_line(error)}")
        if in_job:
            raise
        return "failed", one_line(error)


def visible_gpus() -> List[str]:
    """CUDA_VISIBLE_DEVICES entries of the GPUs torch sees (indices if the variable is unset)."""
    import torch

    count = torch.cuda.device_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(count))))
    return [name.strip() for name in listed.split(",")][:count]


def launch_local(grid, runs, data_bin, references, gpus, children=None) -> Dict[str, Outcome]:
    """The runs here, one per GPU at a time (one after the other without GPUs); {run: outcome}.
    Ctrl-C: no new run or stage starts, the children are stopped (Children.stop)."""
    children, todo, outcomes = children or Children(), collections.deque(runs), {}

    def worker(gpu: Optional[str]) -> None:
        while not children.stopping.is_set():
            try:
                run = todo.popleft()  # thread-safe
            except IndexError:
                return
            outcomes[run.name] = guarded(grid, run, data_bin, references, gpu, children)

    with concurrent.futures.ThreadPoolExecutor(len(gpus) or 1) as pool:
        workers = [pool.submit(worker, gpu) for gpu in gpus or [None]]
        try:
            concurrent.futures.wait(workers)
        except KeyboardInterrupt:
            logger.warning("Ctrl-C: starting no new run; stopping the running ones (resumable)")
            children.stop()
    cancelled = ("interrupted", "not started (Ctrl-C)")
    return {run.name: outcomes.get(run.name, cancelled) for run in runs}


SUBMITIT_FOLDER, REPORT_JOB_MINUTES = "submitit", 30
# submitit's parameter for each job flag of fairseq-asam-table4 (slurm_*: ignored locally).
JOB_PARAMETERS = dict(time_min="timeout_min", gpus_per_job="gpus_per_node", mem_gb="mem_gb")
JOB_PARAMETERS.update(cpus_per_job="cpus_per_task", partition="slurm_partition")
JOB_PARAMETERS.update(max_concurrent="slurm_array_parallelism", job_setup="slurm_setup")
CHECKPOINT_GRACE_SECONDS = 30.0  # inside submitit's signal delay (90 s before the time limit)


def make_executor(out_dir: str, jobs, name: str, **parameters) -> submitit.AutoExecutor:
    """An executor for `jobs`, table4's job flags (argparse.Namespace)."""
    cluster = "slurm" if jobs.launcher == "slurm" else "local"
    timeouts = {f"{cluster}_max_num_timeout": jobs.max_requeue}
    executor = submitit.AutoExecutor(os.path.join(out_dir, SUBMITIT_FOLDER), cluster, **timeouts)
    given = {submitit_name: getattr(jobs, flag) for flag, submitit_name in JOB_PARAMETERS.items()}
    given.update(slurm_additional_parameters=dict(jobs.sbatch or []) or None, **parameters)
    if given["gpus_per_node"] is None:  # default: 1 on Slurm, 0 locally
        given["gpus_per_node"] = int(cluster == "slurm")
    executor.update_parameters(name=name, **given)
    return executor


class RunJob(submitit.helpers.Checkpointable):
    """run_one in a thread, so that submitit's signal handler (main thread) can stop its children
    on a timeout or a preemption (checkpoint(): the job requeues, resumes from checkpoint_last)."""

    def __init__(self, grid: Grid, run: Run, data_bin: str, references: Dict[str, str]):
        self.arguments = (grid, run, data_bin, references)

    def __call__(self) -> Outcome:
        log_to_stdout()
        gpu = os.environ.get("CUDA_VISIBLE_DEVICES") or None  # Slurm's, on a GPU job
        pool = concurrent.futures.ThreadPoolExecutor(1)
        outcome = pool.submit(guarded, *self.arguments, gpu, in_job=True)
        try:
            return outcome.result()
        except KeyboardInterrupt:  # cancelled (submitit-local sends SIGINT)
            CHILDREN.stop()
            return outcome.result()

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        logger.warning(f"{self.arguments[1].name}: timeout or preemption: stopping, requeueing")
        CHILDREN.stop(grace=CHECKPOINT_GRACE_SECONDS)
        return submitit.helpers.DelayedSubmission(RunJob(*self.arguments))


def launch_jobs(grid, runs, data_bin, references, jobs, final=None) -> Optional[Dict]:
    """A job per run; waits for them under submitit-local or --wait ({run: outcome}); else
    submits `final` (function, arguments: the report) to start after them, and returns None."""
    name = f"table4-{os.path.basename(grid.out_dir)}"
    executor = make_executor(grid.out_dir, jobs, name)
    with executor.batch():
        submitted = [(r, executor.submit(RunJob(grid, r, data_bin, references))) for r in runs]
    for run, job in submitted:
        record = dict(run=run.name, launcher=jobs.launcher, job_id=str(job.job_id))
        files.write_json(os.path.join(grid.run_dir(run), JOB_RECORD), record)
        logger.info(f"{run.name}: submitted as job {job.job_id}")
    if jobs.wait or jobs.launcher == "submitit-local":
        return wait_for_jobs(grid, submitted)
    if final is not None and not jobs.no_report_job:  # on Slurm (submitit-local waited)
        after = "afterany:" + ":".join(sorted({str(j.job_id).split("_")[0] for _, j in submitted}))
        report = dict(timeout_min=REPORT_JOB_MINUTES, gpus_per_node=0, cpus_per_task=1)
        last = make_executor(grid.out_dir, jobs, f"{name}-report", slurm_dependency=after, **report)
        logger.info(f"report: job {last.submit(*final).job_id}, once the run jobs have ended")
    return None


def wait_for_jobs(grid, submitted) -> Dict[str, Outcome]:
    """Each job's outcome once it ended, a failure recorded; Ctrl-C cancels the jobs."""
    outcomes = {}
    try:
        for run, job in submitted:
            try:
                outcomes[run.name] = tuple(job.result())
            except Exception as error:
                failure = files.read_json_object(os.path.join(grid.run_dir(run), FAILURE_RECORD))
                if failure is None:  # the job died without one (killed, out of memory)
                    failure = write_failure(grid.run_dir(run), run.name, "job", one_line(error))
                outcomes[run.name] = ("failed", f"{failure['stage']}: {failure['error']}")
    except KeyboardInterrupt:
        logger.warning("Ctrl-C: cancelling the jobs; their runs resume when the grid runs again")
        for run, job in submitted:
            if run.name not in outcomes:
                job.cancel(check=False)
                outcomes[run.name] = ("interrupted", f"job {job.job_id} cancelled (Ctrl-C)")
        deadline = time.monotonic() + STOP_GRACE_SECONDS + 30
        while any(not j.done() for _, j in submitted) and time.monotonic() < deadline:
            time.sleep(0.5)
    return outcomes
