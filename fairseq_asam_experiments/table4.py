"""Table 4 of the ASAM paper (IWSLT'14 De->En BLEU: Adam, Adam+SAM, Adam+ASAM) from the raw
archive or a prepared --data-bin to the report (<out>/report/table4.md), resumable.
"""

import argparse
import logging
import os
import shutil
from typing import Dict, List, Optional, Tuple

from . import files, launch
from . import grid as grids
from .cli import run_command
from .errors import ExperimentError, SettingError
from .logs import log_to_stdout

logger = logging.getLogger(__name__)

PROGRAM = "fairseq-asam-table4"
DATA_FOLDER, SAMPLE_ARCHIVE = "data", "sample-de-en.tgz"
SLURM, JOBS = ("slurm",), ("slurm", "submitit-local")  # the launchers a job flag is for
SWEEP = "OPTION=V1,V2"  # any fairseq-train option, repeatable: a row per combination of values
GRID_FLAGS = ("max_update", "amp", "eval_bleu", "checkpoint", "sharpness_rho", "config_dir")


def at_least(least: int):
    def parse(text: str) -> int:
        if not text.lstrip("-").isdigit() or int(text) < least:
            raise argparse.ArgumentTypeError(f"must be an integer >= {least}, got {text!r}")
        return int(text)

    return parse


def key_value(text: str) -> Tuple[str, str]:
    key, equals, value = text.partition("=")
    if not equals or not key.strip("- ") or not value.strip():
        raise argparse.ArgumentTypeError(f"takes KEY=VALUE (an sbatch option), got {text!r}")
    return key.strip("- "), value.strip()


ROWS = ",".join(grids.OPTIMIZERS + grids.SCHEDULE_ROWS)
FLAGS = [  # (flag, argparse options, help)
    ("--out", {}, "output folder (default: runs/<preset>)"),
    ("--archive", {}, "the IWSLT'14 de-en.tgz (tiny: a generated sample when omitted)"),
    ("--data-bin", {}, "already binarized IWSLT'14 de-en data (no preparation)"),
    ("--optimizers", {"default": ",".join(grids.OPTIMIZERS)}, f"rows: a subset of {ROWS}"),
    ("--seeds", {}, "comma-separated seeds (default: the preset's; paper: 1,2,3)"),
    ("--max-update", {"type": int}, "the updates each run trains to (default: the preset's)"),
    ("--checkpoint", {}, "best-bleu (default), best-loss, last or average:N (configs/README.md)"),
    ("--amp", {"action": "store_true"}, "fairseq's --amp: fp32 weights (docs/mixed-precision.md)"),
    ("--eval-bleu", {"action": "store_true"}, "log validation BLEU every epoch"),
    ("--sharpness-rho", {"type": float}, "also measure each run's adaptive sharpness at this ρ"),
    ("--config-dir", {}, "folder of the argument files (default: the installed configs/)"),
    ("--sweep", {"action": "append", "default": [], "metavar": SWEEP}, "e.g. lr=5e-4,1e-3"),
    ("--rho", {}, "--sweep rho=V1,V2: ρ of every SAM/ASAM row"),
    ("--eta", {}, "--sweep eta=V1,V2: η of every ASAM row"),
]
JOB_FLAGS = [  # and the launchers that take each
    ("--partition", {}, "Slurm partition", SLURM),
    ("--time-min", {"type": at_least(1), "default": 1440}, "minutes a job may run", JOBS),
    ("--gpus-per-job", {"type": at_least(0)}, "default: 1 on Slurm, 0 locally", JOBS),
    ("--cpus-per-job", {"type": at_least(1), "default": 8}, "CPUs per job", JOBS),
    ("--mem-gb", {"type": at_least(1)}, "memory per job (default: Slurm's)", JOBS),
    ("--max-concurrent", {"type": at_least(1)}, "jobs at once (a Slurm array's %%N)", SLURM),
    ("--max-requeue", {"type": at_least(0), "default": 3}, "timeouts requeued after", JOBS),
    ("--sbatch", {"action": "append", "type": key_value}, "KEY=VALUE: an sbatch option", SLURM),
    ("--job-setup", {"action": "append"}, "a shell line each job runs first", SLURM),
    ("--wait", {"action": "store_true"}, "wait here for the jobs, then write the report", SLURM),
    ("--no-report-job", {"action": "store_true"}, "no final job writing the report", SLURM),
]


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROGRAM, description=__doc__.split("\n\n")[0])
    presets = "; ".join(f"{p.name}: {p.description}" for p in grids.PRESETS.values())
    parser.add_argument("--preset", choices=sorted(grids.PRESETS), default="paper", help=presets)
    for flag, options, text in FLAGS:
        parser.add_argument(flag, help=text, **options)
    return add_launcher_flags(parser)


def add_launcher_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--launcher and the job flags (also fairseq-asam-correlation's; check_launcher checks)."""
    choices = dict(choices=("local", *JOBS), default="local")
    parser.add_argument("--launcher", help="local: one run per GPU", **choices)
    jobs = parser.add_argument_group("jobs", "slurm: a job per run; submitit-local: the same here")
    for flag, options, text, _ in JOB_FLAGS:
        jobs.add_argument(flag, help=text, **options)
    return parser


def check_launcher(args, grid: grids.Grid) -> List[str]:
    """Job flags need a job launcher, slurm its commands, --amp a GPU; the local GPUs."""
    defaults = add_launcher_flags(argparse.ArgumentParser()).parse_args([])
    for flag, _, _, launchers in JOB_FLAGS:
        name = flag[2:].replace("-", "_")
        if getattr(args, name) != getattr(defaults, name) and args.launcher not in launchers:
            needs = " or ".join(launchers)
            raise SettingError(f"{flag} is a job option: it needs --launcher {needs}")
    if args.launcher == "slurm" and not (shutil.which("sbatch") and shutil.which("srun")):
        raise SettingError("--launcher slurm needs Slurm's sbatch and srun on PATH")
    gpus = launch.visible_gpus() if args.launcher == "local" else []
    if grid.amp and args.launcher == "local" and not gpus:
        raise SettingError("--amp needs a GPU, and none is visible")
    return gpus


def make_grid(args) -> grids.Grid:
    preset = grids.PRESETS[args.preset]
    shorthands = [f"{name}={text}" for name, text in (("rho", args.rho), ("eta", args.eta)) if text]
    out_dir = os.path.abspath(args.out or os.path.join("runs", preset.name))
    rows, flags = grids.parse_rows(args.optimizers), {f: getattr(args, f) for f in GRID_FLAGS}
    seeds = grids.parse_seeds(args.seeds) if args.seeds is not None else None
    sweeps = tuple(grids.parse_sweep(text) for text in args.sweep + shorthands)
    return grids.Grid(out_dir, preset, rows=rows, seeds=seeds, sweeps=sweeps, **flags)


def locate_data(args, grid: grids.Grid) -> Tuple[Optional[str], str]:
    """(the archive to prepare or None, the data-bin: a folder named by the archive's content)."""
    from . import prepare, synthetic_data

    if args.data_bin is not None:
        if not os.path.isdir(args.data_bin):
            raise SettingError(f"--data-bin: folder not found: {args.data_bin}")
        return None, os.path.abspath(args.data_bin)
    archive, sample = args.archive, grid.preset.sample_archive
    if archive is None and sample is None:
        raise SettingError(
            f"--preset {grid.preset.name} needs --archive (the IWSLT'14 de-en.tgz) or --data-bin"
        )
    if archive is None:  # a generated archive in the real layout, the same bytes every time
        archive = os.path.join(grid.out_dir, DATA_FOLDER, SAMPLE_ARCHIVE)
        synthetic_data.build_sample_archive(archive, *sample)
    elif not os.path.isfile(archive):
        raise SettingError(f"--archive: file not found: {archive}")
    name = prepare.data_folder_name(archive, grid.preset.bpe_merges)
    return os.path.abspath(archive), os.path.join(grid.out_dir, DATA_FOLDER, name, prepare.DATA_BIN)


def prepare_data(grid: grids.Grid, archive: Optional[str], data_bin: str) -> Dict[str, str]:
    """Prepares `archive` unless it is; the raw references found beside a prepared data-bin."""
    from . import prepare

    if archive is not None:
        root = os.path.join(grid.out_dir, DATA_FOLDER)
        prepare.prepare_iwslt14(archive, root, grid.preset.bpe_merges)
    references = prepare.reference_files(os.path.dirname(data_bin))
    return {split: path for split, path in references.items() if os.path.isfile(path)}


def write_report(out_dir: str) -> str:
    """The grid's report (also the final job of --launcher slurm); returns table4.md's path."""
    from . import report

    log_to_stdout()
    return report.write_report([out_dir], os.path.join(out_dir, report.REPORT_FOLDER))


def ending(outcomes: Dict[str, Tuple[str, str]]) -> int:
    """Status 0, or the error naming the runs that Ctrl-C stopped or that failed."""
    stopped = [name for name, (status, _) in outcomes.items() if status == "interrupted"]
    failed = [f"{name}: {why}" for name, (status, why) in outcomes.items() if status == "failed"]
    if stopped:
        raise launch.Interrupted(f"interrupted (Ctrl-C): {', '.join(stopped)} stopped, resumable")
    if failed:
        raise ExperimentError(f"{len(failed)} run(s) failed: {'; '.join(failed)} (see the report)")
    return 0


def work(args) -> int:
    """Every check that needs no work (flags, fairseq-train's parser, training stamps) first."""
    grid = make_grid(args)
    grid.check()
    gpus = check_launcher(args, grid)
    grids.check_options_known(grid, args.data_bin or DATA_FOLDER)
    archive, data_bin = locate_data(args, grid)
    launch.check_runs(grid, data_bin)
    references = prepare_data(grid, archive, data_bin)
    files.write_json(os.path.join(grid.out_dir, grids.GRID_RECORD), grid.record())
    runs = grid.runs()
    logger.info(f"{len(runs)} runs (--checkpoint {grid.protocol}) on {len(gpus) or 'no'} GPU(s)")
    if args.launcher == "local":
        outcomes = launch.launch_local(grid, runs, data_bin, references, gpus)
    else:
        final = (write_report, grid.out_dir)
        outcomes = launch.launch_jobs(grid, runs, data_bin, references, args, final)
        if outcomes is None:
            logger.info("jobs submitted: the report comes once they have ended (or run again)")
            return 0
    with open(write_report(grid.out_dir), encoding="utf-8") as table:
        print(table.read())
    return ending(outcomes)


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    return run_command(PROGRAM, lambda: work(args))
