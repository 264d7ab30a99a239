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

from .errors import ExperimentError
from .grid import plugin_dir
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
# fairseq-asam-benchmark
# --------------------------------------------------------------------------------------------

BENCHMARK = "fairseq-asam-benchmark"


def benchmark_parser() -> argparse.ArgumentParser:
    from . import benchmark

    parser = argparse.ArgumentParser(
        prog=BENCHMARK,
        description="What an update of SAM/ASAM costs next to Adam's, through fairseq's own "
        "Trainer: update time, ratio to Adam, forward/backward/optimizer time, perturbation "
        "overhead, tokens per second, peak memory (experiments/benchmark.py defines each).",
    )
    parser.add_argument(
        "--preset",
        choices=sorted(benchmark.BENCHMARK_PRESETS),
        default="iwslt",
        help="; ".join(f"{n}: {p.description}" for n, p in benchmark.BENCHMARK_PRESETS.items()),
    )
    parser.add_argument("--device", choices=benchmark.DEVICES, default="cpu")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument(
        "--fp16",
        dest="precision",
        action="store_const",
        const="fp16",
        help="fairseq's --fp16 (needs --device cuda)",
    )
    precision.add_argument(
        "--bf16",
        dest="precision",
        action="store_const",
        const="bf16",
        help="bf16 training (common.bf16; needs --device cuda)",
    )
    parser.add_argument("--update-freq", type=int, default=1, help="micro-batches per update")
    parser.add_argument("--warmup", type=int, help="untimed updates first (default: the preset's)")
    parser.add_argument("--timed", type=int, help="timed updates per row (default: the preset's)")
    parser.add_argument(
        "--sam-interval", type=int, default=5, help="K of the `asam --sam-interval K` row"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--no-memory",
        action="store_true",
        help="skip the peak-memory runs (one fresh process per row)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="also profile one ASAM update with torch.profiler"
    )
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    return parser


def benchmark_main(argv: Optional[List[str]] = None) -> int:
    argv = _arguments(argv)
    args = benchmark_parser().parse_args(argv)
    log_to_stdout(logging.WARNING)

    def work() -> int:
        from . import benchmark
        from .files import write_json

        spec = benchmark.BenchmarkSpec(
            preset=args.preset,
            device=args.device,
            precision=args.precision or "fp32",
            update_freq=args.update_freq,
            warmup=args.warmup,
            timed=args.timed,
            sam_interval=args.sam_interval,
            seed=args.seed,
        )
        benchmark.check_spec(spec)
        result = benchmark.run_benchmark(spec, measure_memory=not args.no_memory)
        result["command"] = " ".join([BENCHMARK] + argv)
        print(benchmark.format_benchmark(result))
        if args.profile:
            result["profile"] = benchmark.profile_update(spec)
            print()
            print(benchmark.format_profile(result["profile"]))
        if args.json:
            write_json(args.json, result)
        return 0

    return run_command(BENCHMARK, work)


# --------------------------------------------------------------------------------------------
# fairseq-asam-trajectories
# --------------------------------------------------------------------------------------------

TRAJECTORIES = "fairseq-asam-trajectories"
DEFAULT_TRAJECTORIES_PNG = os.path.join("docs", "trajectories.png")


def trajectories_parser() -> argparse.ArgumentParser:
    from . import trajectories

    defaults = trajectories.Settings()
    parser = argparse.ArgumentParser(
        prog=TRAJECTORIES,
        description="SGD, SAM and ASAM paths on L = 1/2 (1 - w1 w2)^2 drawn to a PNG; prints "
        "where every path ends and its loss there.",
    )
    parser.add_argument("--output", default=DEFAULT_TRAJECTORIES_PNG, help="PNG to write")
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument(
        "--sam-rho", type=float, default=defaults.sam_rho, help="SAM's radius |eps| <= rho"
    )
    parser.add_argument(
        "--asam-rho", type=float, default=defaults.asam_rho, help="ASAM's radius |T^-1 eps| <= rho"
    )
    parser.add_argument(
        "--eta", type=float, default=defaults.eta, help="eta in ASAM's T = |w| + eta"
    )
    return parser


def trajectories_main(argv: Optional[List[str]] = None) -> int:
    args = trajectories_parser().parse_args(_arguments(argv))
    log_to_stdout(logging.WARNING)

    def work() -> int:
        from . import trajectories

        if not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
            raise ExperimentError(f"--output {args.output}: its folder does not exist")
        settings = trajectories.Settings(args.lr, args.steps, args.sam_rho, args.asam_rho, args.eta)
        paths = trajectories.plot(args.output, trajectories.DEFAULT_STARTS, settings)
        print(f"{'start':>14} {'method':>6} {'end':>18} {'loss':>9}")
        for index, start in enumerate(trajectories.DEFAULT_STARTS):
            for method in trajectories.METHODS:
                end = paths[method][index, -1]
                print(
                    f"{str(start):>14} {method:>6} ({end[0]:7.3f}, {end[1]:7.3f}) "
                    f"{trajectories.loss(end):9.2e}"
                )
        print(f"wrote {args.output}")
        return 0

    return run_command(TRAJECTORIES, work)


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
# fairseq-asam-precision
# --------------------------------------------------------------------------------------------

PRECISION = "fairseq-asam-precision"


def precision_parser() -> argparse.ArgumentParser:
    from . import precision

    parser = argparse.ArgumentParser(
        prog=PRECISION,
        description="How much of the SAM/ASAM perturbation ε survives fp16/bf16 weights and "
        "autocast: fraction of ε lost, cosine and L2 error against ε, the loss increase obtained, "
        "pass 2's gradient, and stochastic rounding with its controls (definitions in "
        "fairseq_asam_experiments/precision.py).",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="PATH", help="a fairseq translation checkpoint")
    source.add_argument(
        "--init",
        action="store_true",
        help="a freshly initialised transformer_iwslt_de_en (the IWSLT'14 recipe's model)",
    )
    parser.add_argument("--data-bin", required=True, help="fairseq binarized data folder")
    parser.add_argument("--subset", default=precision.DEFAULT_SUBSET)
    parser.add_argument("--batches", type=int, default=1, help="fixed batches, each with its own ε")
    parser.add_argument("--max-tokens", type=int, default=precision.RECIPE_MAX_TOKENS)
    parser.add_argument(
        "--sr-seeds",
        type=int,
        default=precision.DEFAULT_SR_SEEDS,
        help="stochastic-rounding draws per row (0: no stochastic rounding)",
    )
    parser.add_argument(
        "--gradient-seeds",
        type=int,
        default=precision.DEFAULT_GRADIENT_SEEDS,
        help="stochastic-rounding draws whose pass-2 gradient is compared too (round to nearest "
        "always; -1: no gradient comparison)",
    )
    parser.add_argument("--seed", type=int, default=1, help="model init (--init) and batch order")
    parser.add_argument("--precisions", default=",".join(precision.WEIGHT_DTYPES))
    parser.add_argument(
        "--autocast",
        default=",".join(precision.AUTOCAST_DTYPES),
        help="autocast modes ('' for none)",
    )
    parser.add_argument(
        "--no-real-forward",
        action="store_true",
        help="fp32-arithmetic losses only (skip the fp16/bf16/autocast forward)",
    )
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    parser.add_argument("--json", metavar="PATH", help="write every row and the summary as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser


def precision_main(argv: Optional[List[str]] = None) -> int:
    argv = _arguments(argv)
    args = precision_parser().parse_args(argv)
    log_to_stdout(logging.WARNING)

    def work() -> int:
        import time

        import torch

        from . import precision
        from .files import write_json

        if args.threads:
            torch.set_num_threads(args.threads)
        start = time.time()

        def log(message):
            print(f"[{time.time() - start:7.1f}s] {message}", file=sys.stderr, flush=True)

        result = precision.run(
            args.data_bin,
            checkpoint=args.checkpoint,
            init=args.init,
            seed=args.seed,
            batches=args.batches,
            max_tokens=args.max_tokens,
            sr_seeds=args.sr_seeds,
            subset=args.subset,
            real_forward=not args.no_real_forward,
            gradient_seeds=args.gradient_seeds,
            weight_precisions=[p for p in args.precisions.split(",") if p],
            autocast_modes=[m for m in args.autocast.split(",") if m],
            log=None if args.quiet else log,
        )
        result["command"] = " ".join([PRECISION] + argv)
        result["wall_seconds"] = time.time() - start
        print(precision.format_result(result))
        if args.json:
            write_json(args.json, result)
        return 0

    return run_command(PRECISION, work)


# --------------------------------------------------------------------------------------------
# python -m fairseq_asam_experiments <command>
# --------------------------------------------------------------------------------------------

# The console scripts of setup.py, by the name after `fairseq-asam-`.
COMMANDS = {
    "prepare": prepare_main,
    "evaluate": evaluate_main,
    "report": report_main,
    "sharpness": sharpness_main,
    "benchmark": benchmark_main,
    "trajectories": trajectories_main,
    "precision": precision_main,
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
