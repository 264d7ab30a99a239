"""fairseq-asam-table4: Table 4 of the ASAM paper (IWSLT'14 De→En BLEU of Adam, Adam+SAM,
Adam+ASAM), from the raw archive (or a prepared --data-bin) to the report, in one resumable
command.

    <out>/data/<iwslt14-de-en-<md5>-bpe<merges>>/   the prepared data, named by its content
    <out>/grid.json                                 the grid (grid.py), written before any run
    <out>/runs/<run>/                               one run (launch.py)
    <out>/submitit/                                 the jobs' files (--launcher slurm, submitit-local)
    <out>/report/                                   table4.md, table4.csv, plots (report.py)

Every check that needs no work comes first — the flags, the argument files, fairseq-train's own
parser on every row, every run's training stamp — so that a bad flag or a changed setting fails
in one line before anything starts; then the data, grid.json, the runs, the report.
"""

import argparse
import logging
import os
from typing import Dict, List, Optional, Tuple

from . import files
from . import grid as grids
from .cli import run_command
from .errors import ExperimentError, SettingError
from .logs import log_to_stdout

logger = logging.getLogger(__name__)

PROGRAM = "fairseq-asam-table4"
DATA_FOLDER, REPORT_FOLDER, SAMPLE_ARCHIVE = "data", "report", "sample-de-en.tgz"
LAUNCHERS = ("local", "slurm", "submitit-local")  # launch.LAUNCHERS, without importing it
JOBS = ("slurm", "submitit-local")
# The job flags: (flag, type, help, the launchers that take it).
JOB_FLAGS = [
    ("--partition", str, "Slurm partition", ("slurm",)),
    ("--time-min", int, "time limit of one job in minutes (default: 1440)", JOBS),
    ("--gpus-per-job", int, "GPUs per job (default: 1 on Slurm, 0 locally)", JOBS),
    ("--cpus-per-job", int, "CPUs per job (default: 8)", JOBS),
    ("--mem-gb", int, "memory per job in GB (default: Slurm's)", JOBS),
    ("--max-concurrent", int, "at most this many jobs at once (a Slurm array's %%N)", JOBS),
    ("--max-requeue", int, "timeouts a job is requeued after (default: 3)", JOBS),
    (
        "--sbatch",
        "append",
        "an extra sbatch option KEY=VALUE, e.g. account=nlp (repeatable)",
        ("slurm",),
    ),
    ("--job-setup", "append", "a shell line each job runs first (repeatable)", JOBS),
    ("--wait", "store_true", "wait here for the jobs, then write the report", ("slurm",)),
    ("--no-report-job", "store_true", "no final job writing the report (afterany)", ("slurm",)),
]


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="Table 4 of the ASAM paper (IWSLT'14 De->En BLEU: Adam, Adam+SAM, Adam+ASAM): "
        "data preparation, training (resumable), evaluation and report (<out>/report/table4.md).",
    )
    add = parser.add_argument
    presets = grids.PRESETS.values()
    add(
        "--preset",
        choices=sorted(grids.PRESETS),
        default=grids.PAPER_PRESET,
        help="; ".join(f"{p.name}: {p.description}" for p in presets),
    )
    add("--out", help="output folder (default: runs/<preset>)")
    add("--archive", help="the IWSLT'14 de-en.tgz (tiny: a generated sample when omitted)")
    add("--data-bin", help="already binarized IWSLT'14 de-en data (no preparation)")
    add(
        "--optimizers",
        default=",".join(grids.OPTIMIZERS),
        help=f"rows, a comma-separated subset of {','.join(grids.OPTIMIZERS + grids.SCHEDULE_ROWS)}",
    )
    add("--seeds", help="comma-separated seeds (default: the preset's; paper: 1,2,3)")
    add("--max-update", type=int, help="the updates every run trains to (default: the preset's)")
    add(
        "--checkpoint",
        help="the protocol: best-bleu, best-loss, last or average:N (default: "
        "the preset's, best-bleu; configs/README.md gives the evidence)",
    )
    add(
        "--amp",
        action="store_true",
        help="mixed precision with fp32 weights (fairseq's --amp; "
        "GPUs); fp16 weights would round away part of the perturbation: docs/mixed-precision.md",
    )
    add("--fp16", action="store_true", help=argparse.SUPPRESS)
    add("--eval-bleu", action="store_true", help="log validation BLEU every epoch")
    add(
        "--sharpness-rho",
        type=float,
        help="also measure each run's adaptive sharpness "
        "(fairseq-asam-sharpness) at this rho, shown next to its BLEU",
    )
    add("--config-dir", help="folder of the argument files (default: the installed configs/)")
    sweeps = parser.add_argument_group("sweeps", "each combination of values is a row (x seeds)")
    sweeps.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="OPTION=V1,V2",
        help="any fairseq-train option over values, e.g. lr=5e-4,1e-3 (repeatable)",
    )
    sweeps.add_argument("--rho", help="--sweep rho=...: ρ of every SAM/ASAM row, e.g. 0.05,0.1")
    sweeps.add_argument("--eta", help="--sweep eta=...: η of every ASAM row")
    jobs = parser.add_argument_group("jobs", "each run a submitit job (Slurm, or local)")
    jobs.add_argument(
        "--launcher",
        choices=LAUNCHERS,
        default="local",
        help="local: here, one run per GPU; slurm: a job per run (an array), the report by a "
        "final dependent job; submitit-local: the same jobs through submitit's local executor",
    )
    for flag, kind, text, _ in JOB_FLAGS:
        if kind in ("append", "store_true"):
            jobs.add_argument(flag, action=kind, help=text)
        else:
            jobs.add_argument(flag, type=kind, help=text)
    return parser


def job_options(args):
    """launch.JobOptions of the job flags; a job flag of another launcher is refused."""
    from .launch import JobOptions

    for flag, _, _, launchers in JOB_FLAGS:
        if (
            getattr(args, flag[2:].replace("-", "_")) not in (None, False)
            and args.launcher not in launchers
        ):
            raise SettingError(
                f"{flag} is a job option: it needs --launcher {' or '.join(launchers)}"
            )
    sbatch = {}
    for item in args.sbatch or []:
        key, equals, value = item.partition("=")
        if not equals or not key.strip("- ") or not value.strip():
            raise SettingError(f"--sbatch takes KEY=VALUE (an sbatch option), got {item!r}")
        sbatch[key.strip("- ")] = value.strip()
    given = {k: getattr(args, k) for k in ("time_min", "cpus_per_job", "max_requeue")}
    options = JobOptions(
        partition=args.partition,
        gpus_per_job=args.gpus_per_job,
        mem_gb=args.mem_gb,
        max_concurrent=args.max_concurrent,
        sbatch=sbatch,
        setup=list(args.job_setup or []),
        wait=args.wait,
        report_job=not args.no_report_job,
        **{k: v for k, v in given.items() if v is not None},
    )
    for name in (
        "time_min",
        "cpus_per_job",
        "mem_gb",
        "max_concurrent",
        "max_requeue",
        "gpus_per_job",
    ):
        least = 0 if name in ("max_requeue", "gpus_per_job") else 1
        value = getattr(options, name)
        if value is not None and value < least:
            raise SettingError(f"--{name.replace('_', '-')} must be >= {least}, got {value}")
    return options


def make_grid(args) -> grids.Grid:
    if args.fp16:
        raise SettingError(
            "--fp16 keeps the weights in fp16, which rounds away part of "
            "SAM/ASAM's perturbation (docs/mixed-precision.md): use --amp"
        )
    preset = grids.PRESETS[args.preset]
    shorthands = [f"{name}={text}" for name, text in (("rho", args.rho), ("eta", args.eta)) if text]
    return grids.Grid(
        out_dir=os.path.abspath(args.out or os.path.join("runs", preset.name)),
        preset=preset,
        rows=grids.parse_rows(args.optimizers),
        seeds=grids.parse_seeds(args.seeds) if args.seeds is not None else None,
        sweeps=tuple(grids.parse_sweep(text) for text in args.sweep + shorthands),
        max_update=args.max_update,
        amp=args.amp,
        eval_bleu=args.eval_bleu,
        checkpoint=args.checkpoint,
        sharpness_rho=args.sharpness_rho,
        config_dir=args.config_dir,
    )


def locate_data(args, grid: grids.Grid) -> Tuple[Optional[str], str]:
    """(the archive to prepare, or None for --data-bin; the data-bin the runs train on).  The
    prepared folder is named by the archive's content: another archive never lands on it."""
    from . import prepare

    if args.data_bin is not None:
        if not os.path.isdir(args.data_bin):
            raise SettingError(f"--data-bin: folder not found: {args.data_bin}")
        return None, os.path.abspath(args.data_bin)
    archive = args.archive
    if archive is None and grid.preset.sample_archive is None:
        raise SettingError(
            f"--preset {grid.preset.name} needs --archive (the IWSLT'14 de-en.tgz) or --data-bin"
        )
    if archive is None:  # the tiny preset: a generated archive in the real layout, reproducible
        from . import synthetic_data

        archive = os.path.join(grid.out_dir, DATA_FOLDER, SAMPLE_ARCHIVE)
        if not os.path.isfile(archive):
            train, dev = grid.preset.sample_archive
            synthetic_data.build_sample_archive(archive, n_train=train, n_dev=dev)
    elif not os.path.isfile(archive):
        raise SettingError(f"--archive: file not found: {archive}")
    name = prepare.data_folder_name(archive, grid.preset.bpe_merges)
    data_dir = os.path.join(grid.out_dir, DATA_FOLDER, name)
    return os.path.abspath(archive), os.path.join(data_dir, prepare.DATA_BIN)


def prepare_data(grid: grids.Grid, archive: Optional[str], data_bin: str) -> Dict[str, str]:
    """Prepares the archive unless its folder exists; returns the raw references found."""
    from . import prepare

    data_dir = data_bin[: -len(prepare.DATA_BIN)] if data_bin.endswith(prepare.DATA_BIN) else None
    if archive is not None and not os.path.isdir(data_bin):
        logger.info(f"data: preparing {archive} into {data_dir}")
        root = os.path.join(grid.out_dir, DATA_FOLDER)
        prepare.prepare_iwslt14(archive, root, grid.preset.bpe_merges, os.cpu_count() or 1)
    references = prepare.reference_files(data_dir) if data_dir else {}
    return {split: path for split, path in references.items() if os.path.isfile(path)}


def write_report(out_dir: str) -> str:
    """The grid's report (also the final job of --launcher slurm); returns table4.md's path."""
    from . import report

    log_to_stdout()
    return report.write_report([out_dir], os.path.join(out_dir, REPORT_FOLDER))


def devices(args, grid: grids.Grid, options) -> List[str]:
    """The GPUs of a local launcher; --amp refused without one."""
    from . import launch

    gpus = launch.visible_gpus() if args.launcher == "local" else []
    if grid.amp and args.launcher == "local" and not gpus:
        raise SettingError("--amp needs a GPU, and none is visible")
    if grid.amp and args.launcher != "local" and options.gpus(args.launcher) == 0:
        raise SettingError("--amp needs a GPU, and the jobs get none (--gpus-per-job 0)")
    return gpus


def ending(outcomes: Dict[str, Tuple[str, str]]) -> int:
    """Status 0, or the error that says which runs failed or that Ctrl-C stopped the grid."""
    from .launch import FAILURE_RECORD, Interrupted

    stopped = [
        name for name, (status, _) in outcomes.items() if status in ("interrupted", "cancelled")
    ]
    if stopped:
        raise Interrupted(
            f"interrupted (Ctrl-C): {', '.join(stopped)} stopped; every run is "
            "resumable: run the same command again to continue"
        )
    failed = {name: message for name, (status, message) in outcomes.items() if status == "failed"}
    if failed:
        raise ExperimentError(
            f"{len(failed)} run(s) failed: "
            + "; ".join(f"{name}: {message}" for name, message in failed.items())
            + f" (the report shows the others; see each run's {FAILURE_RECORD})"
        )
    return 0


def work(args) -> int:
    from . import launch

    grid = make_grid(args)
    options = job_options(args)
    grid.check()
    archive, data_bin = locate_data(args, grid)
    grids.check_options_known(grid, data_bin)
    gpus = devices(args, grid, options)
    launch.check_runs(grid, data_bin)
    references = prepare_data(grid, archive, data_bin)
    files.write_json(os.path.join(grid.out_dir, grids.GRID_RECORD), grid.record())
    runs = grid.runs()
    logger.info(f"{len(runs)} runs (--checkpoint {grid.protocol}) on {len(gpus) or 'no'} GPU(s)")
    if args.launcher == "local":
        outcomes = launch.launch_local(grid, runs, data_bin, references, gpus)
    else:
        final = (write_report, grid.out_dir)
        outcomes = launch.launch_jobs(
            grid, runs, data_bin, references, args.launcher, options, final
        )
        if outcomes is None:
            logger.info("jobs submitted: the report comes once they have ended (or run again)")
            return 0
    with open(write_report(grid.out_dir), encoding="utf-8") as table:
        print(table.read())
    return ending(outcomes)


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    log_to_stdout()
    return run_command(PROGRAM, lambda: work(args))
