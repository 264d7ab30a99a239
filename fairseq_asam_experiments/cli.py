"""The kit's console commands, in fairseq's style (`fairseq-asam-<name>`, see setup.py).

Each `*_main(argv=None) -> int` parses its flags, logs progress to stdout (fairseq's format) and
returns the exit status.  A `ExperimentError` (a bad flag or file, a failed run) ends it with
status 1 and one line on stderr, `fairseq-asam-<name>: error: <message>`, before any work
where the input can be checked first.  The scripts in scripts/ and benchmarks/ call these.
"""

import argparse
import logging
import os
import sys
from typing import Callable, List, Optional

from .errors import ExperimentError, SettingError
from .layout import plugin_dir
from .logs import log_to_stdout

ERROR_STATUS = 1

INTERRUPTED_STATUS = 130  # the shell's status for a program ended by SIGINT


def run_command(program: str, work: Callable[[], int]) -> int:
    """`work()`, with a user error reported as one line on stderr and status 1 (or the error's
    own `exit_status`: 130 for an interrupted grid), and a Ctrl-C wherever it comes as one line
    and status 130."""
    try:
        return work()
    except Exception as error:
        if not _is_user_error(error):
            raise
        print(f"{program}: error: " + " ".join(str(error).splitlines()), file=sys.stderr)
        return getattr(error, "exit_status", ERROR_STATUS)
    except KeyboardInterrupt:
        print(f"{program}: interrupted (Ctrl-C)", file=sys.stderr)
        return INTERRUPTED_STATUS


def _is_user_error(error: Exception) -> bool:
    # The plugin's errors (from the tools that load it) are user errors too; its module is
    # looked up, not imported, so that commands without torch stay without it.
    plugin_errors = sys.modules.get("fairseq_asam.errors")
    kinds = (ExperimentError,) + ((plugin_errors.FairseqAsamError,) if plugin_errors else ())
    return isinstance(error, kinds)


def _arguments(argv: Optional[List[str]]) -> List[str]:
    return sys.argv[1:] if argv is None else list(argv)


def _print_file(path: str) -> None:
    with open(path, encoding="utf-8") as f:
        print(f.read())


# --------------------------------------------------------------------------------------------
# fairseq-asam-table4
# --------------------------------------------------------------------------------------------

TABLE4 = "fairseq-asam-table4"


def table4_parser() -> argparse.ArgumentParser:
    from . import runner

    optimizers = runner.OPTIMIZERS + runner.SCHEDULE_ROWS
    parser = argparse.ArgumentParser(
        prog=TABLE4,
        description="Table 4 of the ASAM paper (IWSLT'14 De->En BLEU: Adam, Adam+SAM, Adam+ASAM): "
        "data preparation, training (resumable), evaluation and report (<out>/report/table4.md).",
    )
    parser.add_argument(
        "--preset",
        choices=sorted(runner.TABLE4_PRESETS),
        default="paper",
        help="; ".join(f"{p.name}: {p.description}" for p in runner.TABLE4_PRESETS.values()),
    )
    parser.add_argument("--out", help="output folder (default: runs/<preset>)")
    parser.add_argument(
        "--archive", help="the IWSLT'14 de-en.tgz (tiny: a generated sample when omitted)"
    )
    parser.add_argument(
        "--data-bin", help="already binarized IWSLT'14 de-en data (skips preparation)"
    )
    parser.add_argument(
        "--optimizers",
        default=",".join(runner.OPTIMIZERS),
        help=f"comma-separated subset of {','.join(optimizers)}",
    )
    parser.add_argument(
        "--seeds", help="comma-separated seeds (default: the preset's; paper: 1,2,3)"
    )
    parser.add_argument("--max-update", type=int, help="override the preset's number of updates")
    parser.add_argument(
        "--checkpoint",
        help="the protocol: best-loss, best-bleu, last or average:N (default: the preset's, "
        f"{runner.TABLE4_PRESETS['paper'].checkpoint}; configs/README.md gives the evidence). "
        "best-bleu trains with fairseq's in-training validation BLEU and selects by it",
    )
    parser.add_argument(
        "--amp",
        action="store_true",
        help="mixed precision with fp32 weights (fairseq's --amp: fp16 autocast, loss scaling; "
        "GPUs). fp16 weights (--fp16) would round away part of SAM/ASAM's perturbation: see the "
        "docs/mixed-precision.md",
    )
    parser.add_argument("--fp16", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--eval-bleu", action="store_true", help="log validation BLEU every epoch (BLEU plot)"
    )
    parser.add_argument(
        "--sharpness-rho",
        type=float,
        help="also measure each run's adaptive sharpness (fairseq-asam-sharpness) at this rho, "
        "shown next to its BLEU in the report (costs a few minutes per run on CPU)",
    )
    parser.add_argument(
        "--config-dir", help="folder of the argument files (default: the installed configs/)"
    )
    sweep = parser.add_argument_group(
        "sweeps", "a list of values makes one row per value (x seeds), e.g. asam-rho0.1-seed1"
    )
    sweep.add_argument(
        "--rho",
        help="comma-separated ρ values for every SAM/ASAM row (also the schedule rows), e.g. "
        "0.05,0.1,0.2,0.5; the report adds BLEU against ρ and the ρ validation BLEU picks",
    )
    sweep.add_argument(
        "--eta", help="comma-separated η values for every ASAM row (also the schedule rows)"
    )
    jobs = parser.add_argument_group(
        "jobs", "--launcher slurm / submitit-local: each run as a job through submitit"
    )
    jobs.add_argument(
        "--launcher",
        choices=cluster_launchers(),
        default="local",
        help="local: here, one run per GPU (default); slurm: a Slurm job per run (job array), "
        "the report by a final dependent job; submitit-local: the same jobs through submitit's "
        "local executor, waited for here",
    )
    jobs.add_argument("--partition", help="Slurm partition")
    jobs.add_argument(
        "--time-min", type=int, help="time limit of one job in minutes (default: 1440)"
    )
    jobs.add_argument(
        "--gpus-per-job", type=int, help="GPUs per job (default: 1 on Slurm, 0 locally)"
    )
    jobs.add_argument("--cpus-per-job", type=int, help="CPUs per job (default: 8)")
    jobs.add_argument("--mem-gb", type=int, help="memory per job in GB (default: Slurm's)")
    jobs.add_argument(
        "--max-concurrent", type=int, help="at most this many jobs at once (a Slurm array's %%N)"
    )
    jobs.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra sbatch option, e.g. --sbatch account=nlp --sbatch qos=high (repeatable)",
    )
    jobs.add_argument(
        "--job-setup",
        action="append",
        default=[],
        metavar="COMMAND",
        help="a shell line each job runs first, e.g. 'module load cuda' (repeatable)",
    )
    jobs.add_argument(
        "--max-requeue",
        type=int,
        help="timeouts after which a job is requeued, resuming from checkpoint_last.pt "
        "(default: 3; preemptions always requeue)",
    )
    jobs.add_argument(
        "--wait", action="store_true", help="slurm: wait here for the jobs, then write the report"
    )
    jobs.add_argument(
        "--no-report-job",
        action="store_true",
        help="slurm: no final job writing the report (run the same command again for it)",
    )
    return parser


# The job flags, and the launchers that take each (the others refuse it in one line).
JOB_FLAGS = {
    "partition": ("slurm",),
    "time_min": ("slurm", "submitit-local"),
    "gpus_per_job": ("slurm", "submitit-local"),
    "cpus_per_job": ("slurm", "submitit-local"),
    "mem_gb": ("slurm", "submitit-local"),
    "max_concurrent": ("slurm", "submitit-local"),
    "sbatch": ("slurm",),
    "job_setup": ("slurm", "submitit-local"),
    "max_requeue": ("slurm", "submitit-local"),
    "wait": ("slurm",),
    "no_report_job": ("slurm",),
}


def check_job_flags(args) -> None:
    for name, launchers in JOB_FLAGS.items():
        value = getattr(args, name)
        if value not in (None, False, []) and args.launcher not in launchers:
            raise SettingError(
                f"--{name.replace('_', '-')} is a job option: it needs --launcher "
                + " or ".join(launchers)
            )


def job_options(args):
    from . import cluster

    check_job_flags(args)
    defaults = cluster.JobOptions()
    return cluster.JobOptions(
        partition=args.partition,
        time_min=args.time_min if args.time_min is not None else defaults.time_min,
        gpus_per_job=args.gpus_per_job,
        cpus_per_job=args.cpus_per_job if args.cpus_per_job is not None else defaults.cpus_per_job,
        mem_gb=args.mem_gb,
        max_concurrent=args.max_concurrent,
        sbatch=cluster.parse_sbatch(args.sbatch),
        setup=list(args.job_setup),
        max_requeue=args.max_requeue if args.max_requeue is not None else defaults.max_requeue,
        wait=args.wait,
        report_job=not args.no_report_job,
    )


def cluster_launchers():
    from .cluster import LAUNCHERS

    return LAUNCHERS


def table4_main(argv: Optional[List[str]] = None) -> int:
    args = table4_parser().parse_args(_arguments(argv))
    log_to_stdout()

    def work() -> int:
        from . import report, runner

        if args.fp16:
            raise SettingError(
                "--fp16 keeps the weights in fp16, which rounds away part of SAM/ASAM's "
                "perturbation (docs/mixed-precision.md): use --amp (fp32 weights)"
            )
        preset = runner.TABLE4_PRESETS[args.preset]
        config = runner.GridConfig(
            out_dir=os.path.abspath(args.out or os.path.join("runs", preset.name)),
            preset=preset,
            optimizers=runner.parse_optimizers(args.optimizers),
            seeds=runner.parse_seeds(args.seeds) if args.seeds is not None else None,
            archive=args.archive,
            data_bin=args.data_bin,
            max_update=args.max_update,
            amp=args.amp,
            eval_bleu=args.eval_bleu,
            checkpoint=args.checkpoint,
            sharpness_rho=args.sharpness_rho,
            config_dir=args.config_dir,
            sweep={
                name: runner.parse_sweep(name, text)
                for name, text in (("rho", args.rho), ("eta", args.eta))
                if text is not None
            },
        )
        try:
            if args.launcher == "local":
                check_job_flags(args)
                outputs = runner.run_grid(config)
            else:
                from . import cluster

                options = job_options(args)
                outputs = cluster.submit_grid(config, args.launcher, options)
        except runner.GridFailed as failed:  # the report was written with what finished
            if report.TABLE_MARKDOWN in failed.outputs:
                _print_file(failed.outputs[report.TABLE_MARKDOWN])
            raise
        if report.TABLE_MARKDOWN in outputs:
            _print_file(outputs[report.TABLE_MARKDOWN])
        return 0

    return run_command(TABLE4, work)


# --------------------------------------------------------------------------------------------
# fairseq-asam-prepare
# --------------------------------------------------------------------------------------------

PREPARE = "fairseq-asam-prepare"
SAMPLE_ARCHIVE_PATH = os.path.join("orig", "sample-de-en.tgz")


def prepare_parser() -> argparse.ArgumentParser:
    from . import prepare

    parser = argparse.ArgumentParser(
        prog=PREPARE,
        description="IWSLT'14 German-English for fairseq, as examples/translation/"
        "prepare-iwslt14.sh: into WORKDIR/data-bin/iwslt14.tokenized.de-en (printed at the end).",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--archive", help="a local de-en.tgz (default: download it to WORKDIR/orig/)"
    )
    source.add_argument(
        "--sample",
        action="store_true",
        help=f"generate an archive in the real layout at WORKDIR/{SAMPLE_ARCHIVE_PATH}, use it",
    )
    parser.add_argument(
        "--workdir", default=".", help="where the outputs go (default: the current folder)"
    )
    parser.add_argument(
        "--bpe-merges",
        type=int,
        default=prepare.DEFAULT_BPE_MERGES,
        help="BPE merges (default: %(default)s)",
    )
    parser.add_argument(
        "--joined-dictionary", action="store_true", help="one dictionary for both languages"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="processes (default: %(default)s)",
    )
    parser.add_argument(
        "--expect-real-counts",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="check the real corpus's 160,239 / 7,283 / 6,750 pairs (default: for corpora "
        f"of at least {prepare.REAL_CORPUS_MIN_PAIRS:,} cleaned training pairs)",
    )
    parser.add_argument(
        "--download-url", default=prepare.DOWNLOAD_URL, help="where to download de-en.tgz from"
    )
    parser.add_argument(
        "--download-md5",
        default=prepare.ARCHIVE_MD5,
        help="MD5 the downloaded (or already downloaded) archive must have "
        "(default: that of fairseq's mirror, %(default)s)",
    )
    parser.add_argument(
        "--allow-md5-mismatch",
        action="store_true",
        help="use an archive whose MD5 differs from --download-md5 (a warning instead of an "
        "error; the line counts still check the real corpus)",
    )
    return parser


def prepare_main(argv: Optional[List[str]] = None) -> int:
    args = prepare_parser().parse_args(_arguments(argv))
    log_to_stdout()

    def work() -> int:
        from . import prepare, synthetic_data

        archive = args.archive
        if args.sample:
            archive = synthetic_data.build_sample_archive(
                os.path.join(args.workdir, SAMPLE_ARCHIVE_PATH)
            )
        data_bin = prepare.prepare_iwslt14(
            archive,
            args.workdir,
            bpe_merges=args.bpe_merges,
            joined_dictionary=args.joined_dictionary,
            workers=args.workers,
            expect_real_counts=args.expect_real_counts,
            download_url=args.download_url,
            download_md5=args.download_md5,
            allow_md5_mismatch=args.allow_md5_mismatch,
        )
        print(data_bin)
        return 0

    return run_command(PREPARE, work)


# --------------------------------------------------------------------------------------------
# fairseq-asam-evaluate
# --------------------------------------------------------------------------------------------

EVALUATE = "fairseq-asam-evaluate"
RUN_CHECKPOINTS = "checkpoints"


def evaluate_parser() -> argparse.ArgumentParser:
    from . import evaluation

    parser = argparse.ArgumentParser(
        prog=EVALUATE,
        description="BLEU of a trained run on IWSLT'14 valid and test: fairseq-generate into "
        "RUN_DIR/generate-<split>.txt, the scores into RUN_DIR/results.json (other entries kept).",
    )
    parser.add_argument("run_dir", help="a run folder holding checkpoints/")
    parser.add_argument("--data-bin", required=True, help="the binarized data the run trained on")
    parser.add_argument(
        "--checkpoint",
        default=evaluation.DEFAULT_CHECKPOINT,
        help="the protocol: best-loss, best-bleu (checkpoint_best.pt, checked to be selected by "
        "that metric), last or average:N (default: %(default)s)",
    )
    parser.add_argument(
        "--splits", default=",".join(evaluation.EVALUATED_SPLITS), help="comma-separated splits"
    )
    parser.add_argument(
        "--references-dir",
        help="folder of untokenized references <split>.raw.en for sacreBLEU (the preparation's "
        "iwslt14.tokenized.de-en/tmp); default: the detokenized T- lines",
    )
    parser.add_argument("--beam", type=int, default=evaluation.DEFAULT_BEAM)
    parser.add_argument("--batch-size", type=int, default=evaluation.DEFAULT_BATCH_SIZE)
    return parser


def evaluate_main(argv: Optional[List[str]] = None) -> int:
    args = evaluate_parser().parse_args(_arguments(argv))
    log_to_stdout()

    def work() -> int:
        from . import evaluation, prepare

        splits = [s.strip() for s in args.splits.split(",") if s.strip()]
        choice = evaluation.parse_checkpoint_choice(args.checkpoint)
        references = None
        if args.references_dir is not None:
            references = {
                s: os.path.join(args.references_dir, f"{s}.raw.{prepare.TARGET_LANG}")
                for s in splits
            }
        scores = evaluation.evaluate_checkpoint(
            args.data_bin,
            os.path.join(args.run_dir, RUN_CHECKPOINTS),
            plugin_dir(),
            choice,
            splits,
            args.beam,
            args.batch_size,
            references,
            output_dir=args.run_dir,
        )
        path = os.path.join(args.run_dir, evaluation.RESULTS_NAME)
        evaluation.write_results(path, scores)
        for split in splits:
            print(
                f"{split}: BLEU {scores[split]['bleu']:.2f}  "
                f"sacreBLEU {scores[split]['sacrebleu']:.2f}"
            )
        print(f"wrote {path}")
        return 0

    return run_command(EVALUATE, work)


# --------------------------------------------------------------------------------------------
# fairseq-asam-report
# --------------------------------------------------------------------------------------------

REPORT = "fairseq-asam-report"


def report_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=REPORT,
        description="Table 4 (Markdown, CSV) and plots from OUT_DIR/runs/*/results.json and "
        "train.log (the runs of fairseq-asam-table4), into OUT_DIR/report/.  Only the results "
        "of OUT_DIR's grid (grid.json: preset, --checkpoint, training settings) are taken.  "
        "Several OUT_DIRs (e.g. one per --checkpoint protocol) give one table with a row per "
        "folder, optimizer and protocol, side by side (each row names its preset and folder).",
    )
    parser.add_argument(
        "out_dirs", nargs="+", metavar="OUT_DIR", help="output folder(s) of fairseq-asam-table4"
    )
    parser.add_argument(
        "--report-dir",
        help="where to write (default: OUT_DIR/report; required with several OUT_DIRs)",
    )
    return parser


def report_main(argv: Optional[List[str]] = None) -> int:
    args = report_parser().parse_args(_arguments(argv))
    log_to_stdout()

    def work() -> int:
        from . import report

        outputs = report.write_report(args.out_dirs, args.report_dir)
        if report.TABLE_MARKDOWN in outputs:
            _print_file(outputs[report.TABLE_MARKDOWN])
        return 0

    return run_command(REPORT, work)


# --------------------------------------------------------------------------------------------
# fairseq-asam-sharpness
# --------------------------------------------------------------------------------------------

SHARPNESS = "fairseq-asam-sharpness"


def sharpness_parser() -> argparse.ArgumentParser:
    from . import sharpness

    parser = argparse.ArgumentParser(
        prog=SHARPNESS,
        description="Sharpness and adaptive sharpness of a fairseq checkpoint on its data: a "
        "table, and with --json the report (written atomically).",
    )
    parser.add_argument("checkpoint", help="fairseq checkpoint (.pt)")
    parser.add_argument("data", help="the checkpoint's data-bin folder")
    parser.add_argument(
        "--rho", type=float, required=True, help="radius rho of the ball |T^-1 eps|_2 <= rho"
    )
    parser.add_argument("--subset", default=sharpness.DEFAULT_SUBSET, help="split to measure on")
    parser.add_argument(
        "--max-batches",
        type=int,
        default=sharpness.DEFAULT_MAX_BATCHES,
        help="M: the first M batches of the subset, in fairseq's fixed order",
    )
    parser.add_argument(
        "--measures",
        nargs="+",
        default=list(sharpness.MEASURES),
        help="adaptive (T = |w| + eta) and/or plain (T = I)",
    )
    parser.add_argument(
        "--eta", type=float, default=sharpness.DEFAULT_ETA, help="eta in T = |w| + eta"
    )
    parser.add_argument(
        "--normalize-biases",
        action="store_true",
        help="T = |w| + eta on every tensor, not only on weights",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=sharpness.DEFAULT_STEPS,
        help="K ascent steps (1: the SAM/ASAM one-step estimate)",
    )
    parser.add_argument(
        "--device", help="cpu, cuda or cuda:N (default: cuda if there is one, else cpu)"
    )
    parser.add_argument(
        "--max-tokens", type=int, help="batch size in tokens (default: the checkpoint's)"
    )
    parser.add_argument(
        "--batch-size", type=int, help="batch size in sentences (default: the checkpoint's)"
    )
    parser.add_argument("--json", help="also write the report to this JSON file")
    return parser


def sharpness_main(argv: Optional[List[str]] = None) -> int:
    args = sharpness_parser().parse_args(_arguments(argv))
    log_to_stdout(logging.WARNING)

    def work() -> int:
        import torch

        from .files import write_json
        from .sharpness import format_sharpness, measure_checkpoint

        if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
            raise ExperimentError(f"--json {args.json}: its folder does not exist")
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        report = measure_checkpoint(
            args.checkpoint,
            args.data,
            args.rho,
            subset=args.subset,
            max_batches=args.max_batches,
            measures=args.measures,
            eta=args.eta,
            normalize_biases=args.normalize_biases,
            steps=args.steps,
            device=device,
            max_tokens=args.max_tokens,
            batch_size=args.batch_size,
        )
        print(format_sharpness(report))
        if args.json:
            write_json(args.json, report)
        return 0

    return run_command(SHARPNESS, work)


# --------------------------------------------------------------------------------------------
# scripts/tokenizer_parity.py (no console command: it needs a Moses checkout)
# --------------------------------------------------------------------------------------------

PARITY = "tokenizer_parity"


def tokenizer_parity_main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PARITY,
        description="Tokenizes the text the IWSLT'14 recipe tokenizes (training text and dev/test "
        "segments of the archive) with Moses tokenizer.perl, with the recipe's MosesPerlTokenizer "
        "and with plain sacremoses, and prints how many lines differ from perl's.",
    )
    parser.add_argument("--moses-dir", required=True, help="a Moses checkout (scripts/tokenizer/)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--archive", help="an IWSLT'14 de-en.tgz (the real one for the README figure)"
    )
    source.add_argument("--sample", action="store_true", help="a generated sample archive")
    args = parser.parse_args(_arguments(argv))
    log_to_stdout(logging.WARNING)

    def work() -> int:
        import tempfile

        from . import prepare, synthetic_data

        with tempfile.TemporaryDirectory() as folder:
            archive = args.archive or synthetic_data.build_sample_archive(
                os.path.join(folder, prepare.ARCHIVE_NAME)
            )
            results = prepare.tokenizer_parity(args.moses_dir, prepare.extract_texts(archive))
        print(prepare.format_parity(results))
        return 0

    return run_command(PARITY, work)


# --------------------------------------------------------------------------------------------
# python -m fairseq_asam_experiments <command>
# --------------------------------------------------------------------------------------------

# The console scripts of setup.py, by the name after `fairseq-asam-`.
COMMANDS = {
    "table4": table4_main,
    "prepare": prepare_main,
    "evaluate": evaluate_main,
    "report": report_main,
    "sharpness": sharpness_main,
}


def main(argv: Optional[List[str]] = None) -> int:
    """`python -m fairseq_asam_experiments <command> [flags]`: fairseq-asam-<command> without its
    console script on PATH (the runner starts fairseq-asam-sharpness this way)."""
    arguments = _arguments(argv)
    parser = argparse.ArgumentParser(
        prog="python -m fairseq_asam_experiments",
        description="the kit's commands: python -m fairseq_asam_experiments COMMAND --help",
    )
    parser.add_argument("command", choices=list(COMMANDS))
    command = parser.parse_args(arguments[:1]).command
    return COMMANDS[command](arguments[1:])
