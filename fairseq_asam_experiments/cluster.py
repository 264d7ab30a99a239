"""The Table 4 grid's runs as jobs, through submitit: on Slurm, or with submitit's local executor.

`fairseq-asam-table4 --launcher slurm` (or `submitit-local`) does on the machine it is started on
what needs no GPU — the checks, grid.json, the data preparation, the planning of every run — and
submits each run that is not done as one job (a Slurm job array, at most `--max-concurrent` at
once).  A job runs the runner's own `execute_run` on its node: it holds the run's lock
(`run.lock`, experiments.layout) while it works, trains or resumes from `checkpoint_last.pt`,
evaluates and measures as the stage records say, and records a failure in the run's
`failure.json`.  So a job never trains a run another launcher or job is training, and a
requeued, preempted or resubmitted job continues the run where its checkpoints are.

* Timeout and preemption: Slurm signals the job (`--signal=USR2@90`, submitit's) before it ends;
  submitit calls `RunJob.checkpoint`, which stops the trainer (SIGINT, then SIGKILL), waits for
  the run to let go of its lock, and requeues the same run as a fresh `RunJob`: it resumes from
  `checkpoint_last.pt` (progress since the last checkpoint is lost).  At most
  `--max-requeue` timeouts; preemptions do not count.
* The report: `--launcher slurm` submits a last job, `afterany` the array, that writes it
  (`--no-report-job`: none); `--wait` (and `submitit-local`, always) waits for the jobs here and
  writes it.  On a grid with nothing left to do, the command only writes the report.
* A re-run does not submit a run again while the job it last submitted for it (`job.json` in the
  run folder) is still pending or running in Slurm, nor a run whose lock is held.

submitit's own files (pickled jobs, each job's stdout/stderr) are in `<out>/submitit/`.

The lock is filelock's `flock` on the run folder's `run.lock`; on a shared file system between
nodes it excludes two jobs only where the file system supports it across nodes (NFSv4, Lustre
and GPFS with their flock options; NFSv3 with a lock manager) — docs/clusters-and-sweeps.md.
"""

import datetime
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from . import report, runner
from .errors import ExperimentError, SettingError
from .files import read_json_object, write_json
from .layout import FAILURE_RECORD, GRID_RECORD, JOB_RECORD, lock_holder
from .logs import log_to_stdout

logger = logging.getLogger(__name__)

LAUNCHERS = ("local", "slurm", "submitit-local")
SUBMITIT_FOLDER = "submitit"
# The Slurm job states in which a job may still run the run (sacct's names).
QUEUED_STATES = {
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "CONFIGURING",
    "COMPLETING",
    "RESIZING",
    "SUSPENDED",
    "STAGE_OUT",
    "SIGNALING",
}
POLL_SECONDS = 2.0
# How long RunJob.checkpoint lets the trainer stop after SIGINT: well inside submitit's signal
# delay (90 s before Slurm's time limit), so that the requeue happens before the kill.
CHECKPOINT_GRACE_SECONDS = 30.0
REPORT_JOB_MINUTES = 30
# After Ctrl-C, how long the launcher waits for the cancelled jobs to end before the report.
CANCEL_WAIT_SECONDS = runner.STOP_GRACE_SECONDS + 30


@dataclass
class JobOptions:
    """The resources and behaviour of the jobs (`fairseq-asam-table4 --launcher ...` flags)."""

    partition: Optional[str] = None  # --partition
    time_min: int = 24 * 60  # --time-min: Slurm's time limit of one job
    gpus_per_job: Optional[int] = None  # --gpus-per-job (default: 1 on Slurm, 0 locally)
    cpus_per_job: int = 8  # --cpus-per-job
    mem_gb: Optional[int] = None  # --mem-gb
    max_concurrent: Optional[int] = None  # --max-concurrent: jobs running at once
    sbatch: Dict[str, str] = field(default_factory=dict)  # --sbatch KEY=VALUE
    setup: List[str] = field(default_factory=list)  # --job-setup 'module load cuda'
    max_requeue: int = 3  # --max-requeue: timeouts a job may be requeued after
    wait: bool = False  # --wait: wait here for the jobs, then write the report
    report_job: bool = True  # --no-report-job: no final dependent job that writes the report

    def gpus(self, launcher: str) -> int:
        if self.gpus_per_job is not None:
            return self.gpus_per_job
        return 1 if launcher == "slurm" else 0


def parse_sbatch(items: Sequence[str]) -> Dict[str, str]:
    """`--sbatch account=nlp --sbatch qos=high` -> {"account": "nlp", "qos": "high"}."""
    parsed = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key or not value.strip():
            raise SettingError(f"--sbatch takes KEY=VALUE (an sbatch option), got {item!r}")
        parsed[key] = value.strip()
    return parsed


def check_options(launcher: str, options: JobOptions) -> None:
    if launcher not in LAUNCHERS:
        raise SettingError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got {launcher!r}")
    for flag, value, least in (
        ("--time-min", options.time_min, 1),
        ("--gpus-per-job", options.gpus(launcher), 0),
        ("--cpus-per-job", options.cpus_per_job, 1),
        ("--max-requeue", options.max_requeue, 0),
        ("--max-concurrent", options.max_concurrent, 1),
        ("--mem-gb", options.mem_gb, 1),
    ):
        if value is not None and value < least:
            raise SettingError(f"{flag} must be >= {least}, got {value}")
    if launcher == "submitit-local" and options.gpus(launcher) > 0:
        raise SettingError(
            "--gpus-per-job: submitit-local gives its jobs no GPU of their own; use "
            "--launcher local (one run per GPU) on a GPU machine"
        )
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise SettingError(
            f"--launcher {launcher} needs submitit: pip install 'fairseq-asam[experiments]'"
        ) from None


def executor_parameters(launcher: str, options: JobOptions, name: str) -> Dict:
    """The parameters given to submitit's AutoExecutor.update_parameters for the run jobs."""
    parameters = {
        "name": name,
        "timeout_min": options.time_min,
        "nodes": 1,
        "tasks_per_node": 1,
        "gpus_per_node": options.gpus(launcher),
        "cpus_per_task": options.cpus_per_job,
    }
    if options.mem_gb is not None:
        parameters["mem_gb"] = options.mem_gb
    if launcher == "slurm":
        if options.partition:
            parameters["slurm_partition"] = options.partition
        if options.max_concurrent is not None:
            parameters["slurm_array_parallelism"] = options.max_concurrent
        if options.sbatch:
            parameters["slurm_additional_parameters"] = dict(options.sbatch)
        if options.setup:
            parameters["slurm_setup"] = list(options.setup)
    elif options.setup:
        parameters["local_setup"] = list(options.setup)
    return parameters


def make_executor(out_dir: str, launcher: str, options: JobOptions):
    import submitit

    cluster = "slurm" if launcher == "slurm" else "local"
    kwargs = {f"{cluster}_max_num_timeout": options.max_requeue}
    return submitit.AutoExecutor(
        folder=os.path.join(out_dir, SUBMITIT_FOLDER), cluster=cluster, **kwargs
    )


def job_gpus() -> Optional[str]:
    """The GPUs the job was given (CUDA_VISIBLE_DEVICES as Slurm set it), or None on a CPU."""
    gpus = runner.visible_gpus()
    return ",".join(gpus) if gpus else None


# --------------------------------------------------------------------------------------------
# The job: one run of the grid, on its node
# --------------------------------------------------------------------------------------------


class RunJob:
    """What a job runs: `runner.guarded_run` for one run, requeued on timeout or preemption.

    The run's work goes on in a thread, so that submitit's signal handler (which runs in the
    main thread) can stop the trainer and wait for it while that thread waits on the trainer.
    """

    def __init__(
        self,
        config: "runner.GridConfig",
        run: "runner.Run",
        data_bin: str,
        references: Dict[str, str],
    ):
        self.config = config
        self.run = run
        self.data_bin = data_bin
        self.references = references
        self._supervisor: Optional[runner.Supervisor] = None
        self._thread: Optional[threading.Thread] = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_supervisor"] = state["_thread"] = None
        return state

    def __call__(self) -> Dict[str, str]:
        _log_in_job()
        self._supervisor = runner.Supervisor()
        outcome: List[runner.RunOutcome] = []
        gpu = job_gpus()

        def work():
            outcome.append(
                runner.guarded_run(
                    self.config, self.run, self.data_bin, self.references, gpu, self._supervisor
                )
            )

        logger.info(f"{self.run.name}: job on {socket.gethostname()}, GPU(s) {gpu or 'none'}")
        self._thread = threading.Thread(target=work, name=self.run.name)
        self._thread.start()
        try:
            while self._thread.is_alive():
                self._thread.join(timeout=1.0)
        except KeyboardInterrupt:  # the job was cancelled (submitit-local sends SIGINT)
            logger.warning(f"{self.run.name}: job cancelled; stopping the run (resumable)")
            self._supervisor.stop()
            self._thread.join()
        done = outcome[0] if outcome else runner.RunOutcome(self.run, "interrupted", "stopped")
        return {"run": self.run.name, "status": done.status, "message": done.message}

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on timeout or preemption: stop the run, requeue a fresh job."""
        import submitit

        logger.warning(f"{self.run.name}: timeout or preemption; stopping, then requeueing")
        if self._supervisor is not None:
            self._supervisor.stop(grace=CHECKPOINT_GRACE_SECONDS)
        if self._thread is not None:
            self._thread.join(timeout=CHECKPOINT_GRACE_SECONDS)
        return submitit.helpers.DelayedSubmission(
            RunJob(self.config, self.run, self.data_bin, self.references)
        )


def _log_in_job() -> None:
    """Progress to the job's stdout (submitit's log file), in a submitit job only."""
    if os.environ.get("SUBMITIT_EXECUTOR"):
        log_to_stdout()


def write_report_job(out_dir: str) -> Dict[str, str]:
    """The final dependent job: the grid's report, from whatever the run jobs left."""
    _log_in_job()
    return report.write_report(out_dir)


# --------------------------------------------------------------------------------------------
# The launcher
# --------------------------------------------------------------------------------------------


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def recorded_job(run_dir: str) -> Optional[dict]:
    return read_json_object(os.path.join(run_dir, JOB_RECORD))


def slurm_state(record: dict) -> str:
    """The state sacct gives the recorded job ("UNKNOWN" if it cannot tell)."""
    import submitit

    try:
        job = submitit.SlurmJob(record["folder"], record["job_id"])
        return job.get_info(mode="force").get("State") or "UNKNOWN"
    except Exception as error:  # no sacct here, or an unreadable answer
        logger.warning(f"cannot tell the state of Slurm job {record.get('job_id')}: {error}")
        return "UNKNOWN"


def still_queued(run_dir: str) -> Optional[str]:
    """`Slurm job 123_4 (PENDING)` if the job last submitted for the run may still run it."""
    try:
        record = recorded_job(run_dir)
    except ExperimentError as error:  # unreadable: the new job's record replaces it
        logger.warning(f"{error}: taken as no queued job")
        return None
    if not record or record.get("launcher") != "slurm":
        return None
    state = slurm_state(record).split(" ")[0]
    if state in QUEUED_STATES:
        return f"Slurm job {record['job_id']} ({state})"
    return None


def plan_jobs(
    config: "runner.GridConfig", launcher: str, references: Dict[str, str]
) -> Tuple[List["runner.Run"], Dict[str, str]]:
    """The runs to submit, and {run: why not} for the others (done, locked, queued)."""
    pending, skipped = [], {}
    for run in config.runs:
        run_dir = config.run_dir(run)
        try:
            plan = runner.plan_run(config, run, references)
        except ExperimentError:  # e.g. a corrupt results.json: the job records the failure
            plan = runner.RunPlan(run, runner.EVALUATE, "to plan")
        if plan.action == runner.DONE:
            skipped[run.name] = plan.reason
            continue
        holder = lock_holder(run_dir) if os.path.isdir(run_dir) else None
        if holder:
            skipped[run.name] = f"locked by {holder}"
            continue
        queued = still_queued(run_dir) if launcher == "slurm" else None
        if queued:
            skipped[run.name] = f"already queued as {queued}"
            continue
        pending.append(run)
    return pending, skipped


def _record_job(config, run, launcher: str, job, folder: str) -> None:
    write_json(
        os.path.join(config.run_dir(run), JOB_RECORD),
        {
            "run": run.name,
            "launcher": launcher,
            "job_id": str(job.job_id),
            "folder": folder,
            "submitted": _now(),
        },
    )


def submit_grid(
    config: "runner.GridConfig", launcher: str, options: JobOptions, executor=None
) -> Dict[str, str]:
    """Data -> a job per run not done -> (waiting, or a final job) -> report.

    Returns the report's files (none yet when the jobs were submitted and not waited for).
    Raises GridFailed / GridInterrupted as runner.run_grid does when it waits.
    """
    check_options(launcher, options)
    runner.check_grid(config, jobs_have_gpus=options.gpus(launcher) > 0)
    os.makedirs(config.out_dir, exist_ok=True)
    write_json(os.path.join(config.out_dir, GRID_RECORD), runner.grid_record(config))
    data_bin = runner.prepare_data(config)
    runner.refuse_conflicts(config)  # with what the data-bin holds now
    write_json(os.path.join(config.out_dir, GRID_RECORD), runner.grid_record(config))
    references = runner.reference_files(data_bin)
    pending, skipped = plan_jobs(config, launcher, references)
    for name, why in skipped.items():
        logger.info(f"{name}: not submitted, {why}")
    if not pending:
        logger.info("no run to submit: writing the report")
        return report.write_report(config.out_dir)
    executor = executor or make_executor(config.out_dir, launcher, options)
    name = f"table4-{os.path.basename(os.path.abspath(config.out_dir))}"
    executor.update_parameters(**executor_parameters(launcher, options, name))
    folder = os.path.join(config.out_dir, SUBMITIT_FOLDER)
    wait = options.wait or launcher == "submitit-local"
    limit = options.max_concurrent if launcher == "submitit-local" else None
    logger.info(
        f"{len(pending)} of {len(config.runs)} runs to submit (--launcher {launcher}, "
        f"--checkpoint {config.protocol}); submitit's files in {folder}"
    )

    def submit(runs):
        jobs = []
        if len(runs) > 1:
            with executor.batch():
                for run in runs:
                    jobs.append(executor.submit(RunJob(config, run, data_bin, references)))
        else:
            jobs = [executor.submit(RunJob(config, runs[0], data_bin, references))]
        for run, job in zip(runs, jobs):
            _record_job(config, run, launcher, job, folder)
            logger.info(f"{run.name}: submitted as job {job.job_id}")
        return jobs

    if not wait:
        jobs = submit(pending)
        if options.report_job and launcher == "slurm":
            array = str(jobs[0].job_id).split("_")[0]
            ids = sorted({str(j.job_id).split("_")[0] for j in jobs})
            report_executor = make_executor(config.out_dir, launcher, options)
            report_executor.update_parameters(
                name=f"{name}-report",
                timeout_min=REPORT_JOB_MINUTES,
                nodes=1,
                tasks_per_node=1,
                cpus_per_task=1,
                **{
                    k: v
                    for k, v in executor_parameters(launcher, options, name).items()
                    if k in ("slurm_partition", "slurm_setup", "slurm_additional_parameters")
                },
            )
            report_executor.update_parameters(
                slurm_dependency="afterany:" + ":".join(ids or [array])
            )
            report_job = report_executor.submit(write_report_job, config.out_dir)
            logger.info(
                f"report: job {report_job.job_id} writes {config.out_dir}/report/ once the runs "
                "have ended (or run the same command again)"
            )
        else:
            logger.info("the report: run the same command again once the jobs have ended")
        return {}
    return _wait_for_jobs(config, launcher, pending, submit, limit)


def _wait_for_jobs(config, launcher, pending, submit, limit) -> Dict[str, str]:
    """Waits for the jobs (submitting at most `limit` at once), records what the jobs could
    not, writes the report; Ctrl-C cancels the jobs not done (every run stays resumable)."""
    queue = list(pending)
    running: Dict[object, "runner.Run"] = {}
    outcomes: Dict[str, Tuple[str, str]] = {}
    interrupted = False
    try:
        while queue or running:
            room = len(queue) if limit is None else max(0, limit - len(running))
            if room and queue:
                batch, queue = queue[:room], queue[room:]
                running.update(zip(submit(batch), batch))
            for job in [j for j in running if j.done()]:
                run = running.pop(job)
                outcomes[run.name] = _job_outcome(config, run, job)
            if running:
                time.sleep(POLL_SECONDS)
    except KeyboardInterrupt:
        interrupted = True
        logger.warning(
            "Ctrl-C: submitting no new job; cancelling the running ones (their runs resume when "
            "the grid runs again)"
        )
        for job, run in running.items():
            try:
                job.cancel(check=False)
            except Exception as error:  # cancelling is best effort
                logger.warning(f"{run.name}: could not cancel job {job.job_id}: {error}")
            outcomes[run.name] = ("interrupted", "cancelled (Ctrl-C)")
        for run in queue:
            outcomes[run.name] = ("cancelled", "not submitted (Ctrl-C)")
        # The report of what the cancelled jobs left: once they have let go of their runs.
        deadline = time.monotonic() + CANCEL_WAIT_SECONDS
        try:
            while any(not job.done() for job in running) and time.monotonic() < deadline:
                time.sleep(POLL_SECONDS / 4)
        except KeyboardInterrupt:  # a second Ctrl-C: no more waiting
            pass
    outputs = report.write_report(config.out_dir)
    if interrupted:
        raise runner.GridInterrupted(
            "interrupted (Ctrl-C): jobs cancelled; every run is resumable: run the same command "
            "again to continue",
            outputs,
        )
    failed = {n: m for n, (status, m) in outcomes.items() if status == "failed"}
    if failed:
        raise runner.GridFailed(
            f"{len(failed)} run(s) failed: "
            + "; ".join(f"{n}: {m}" for n, m in failed.items())
            + f" (report written with the others; see each run's {FAILURE_RECORD})",
            outputs,
        )
    return outputs


def _job_outcome(config, run, job) -> Tuple[str, str]:
    """(status, message) of a finished job; a job that died without a result (killed, out of
    memory, timed out too often) is recorded in the run's failure.json here."""
    try:
        result = job.result()
    except Exception as error:
        message = runner.record_failure(
            config.run_dir(run), run, "job", ExperimentError(f"job {job.job_id}: {error}")
        )
        logger.error(f"{run.name}: job {job.job_id} failed: {message}")
        return "failed", f"job: {message}"
    status, message = result.get("status", "failed"), result.get("message", "")
    if status == "failed":
        try:
            failure = read_json_object(os.path.join(config.run_dir(run), FAILURE_RECORD))
        except ExperimentError as error:  # one broken record never stops the wait for the others
            failure = {"stage": "?", "error": str(error)}
        if failure:
            message = f"{failure.get('stage')}: {failure.get('error')}"
    logger.info(f"{run.name}: job {job.job_id} {status}{': ' + message if message else ''}")
    return status, message
