"""Table 4 of Kwon et al. (ICML 2021), IWSLT'14 De->En: the grid of runs, from data to report.

    <out>/data/                       the preparation's work folder (data-bin inside)
    <out>/runs/<optimizer>-seed<k>/   one run: command.txt, train.log, checkpoints/,
                                      generate-{valid,test}.txt, results.json
    <out>/report/                     table4.md, table4.csv, plots (experiments.report)

Settings come from the fairseq-train argument files in configs/ (`TABLE4_PRESETS` says which): the
recipe, then the preset's overrides, then the optimizer's file, then what the run itself sets
(data, --save-dir, --seed, --user-dir).  Resumable: a run with a results.json is skipped; a run
without one trains with the same --save-dir, so fairseq continues from checkpoint_last.pt (or
skips training if `training.done` says it finished), then it is evaluated.  On GPUs the runs
go one per GPU in parallel (CUDA_VISIBLE_DEVICES); on a CPU one after the other.
"""

import logging
import math
import os
import queue
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from .. import USER_DIR
from ..errors import ConfigError, FairseqAsamError
from . import evaluation, prepare, recipe, report, sharpness, synthetic_data

logger = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "sam", "asam")
# Cheaper schedules beyond the paper (configs/iwslt14_de_en/<name>.args): rows on request only.
SCHEDULE_ROWS = ("asam_interval5", "asam_looksam5", "asam_late")
DATA_FOLDER = "data"
CHECKPOINTS_FOLDER = "checkpoints"
COMMAND_FILE, TRAINING_DONE = "command.txt", "training.done"
DATA_BIN_NAME = os.path.join("data-bin", prepare.PREP_NAME)


@dataclass(frozen=True)
class SampleArchive:
    """A generated de-en.tgz in the real IWSLT'14 layout (synthetic_data.build_sample_archive)."""

    n_train: int
    n_dev: int
    seed: int = 1


@dataclass(frozen=True)
class Table4Preset:
    name: str
    args_files: Tuple[str, ...]  # relative to the config folder, applied in order
    seeds: Tuple[int, ...]
    bpe_merges: int
    checkpoint: str  # evaluation.parse_checkpoint_choice
    description: str
    sample_archive: Optional[SampleArchive] = None  # data when no --archive is given
    # OMP_NUM_THREADS for runs on a CPU (unless set already): a tiny model is many times faster
    # on one thread than on threads that compete with each other or with other processes.
    cpu_threads: Optional[int] = None


TABLE4_PRESETS = {
    "paper": Table4Preset(
        "paper",
        (recipe.RECIPE_ARGS,),
        seeds=(1, 2, 3),
        bpe_merges=prepare.DEFAULT_BPE_MERGES,
        checkpoint="best",
        description="Table 4 as published: needs --archive (the IWSLT'14 de-en.tgz) and GPUs",
    ),
    "tiny": Table4Preset(
        "tiny",
        (recipe.RECIPE_ARGS, recipe.TINY_OVERRIDES_ARGS),
        seeds=(1,),
        bpe_merges=500,
        checkpoint="best",
        sample_archive=SampleArchive(n_train=2000, n_dev=40),
        cpu_threads=1,
        description="the same pipeline on a generated sample archive, a tiny Transformer, a CPU",
    ),
}


@dataclass(frozen=True)
class Run:
    optimizer: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.optimizer}-seed{self.seed}"


# --------------------------------------------------------------------------------------------
# Command-line values
# --------------------------------------------------------------------------------------------


def parse_optimizers(text: str) -> Tuple[str, ...]:
    choices = ",".join(OPTIMIZERS + SCHEDULE_ROWS)
    if not text.strip():
        raise ConfigError(f"--optimizers: empty list; choose from {choices}")
    names = tuple(name.strip() for name in text.split(","))
    unknown = [name for name in names if name not in OPTIMIZERS + SCHEDULE_ROWS]
    if unknown:
        raise ConfigError(
            f"--optimizers: unknown {', '.join(map(repr, unknown))}; choose from {choices}"
        )
    if len(set(names)) != len(names):
        raise ConfigError(f"--optimizers: {text!r} names an optimizer twice")
    return names


def parse_seeds(text: str) -> Tuple[int, ...]:
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() and int(part) >= 1 for part in parts):
        raise ConfigError(f"--seeds must be a comma-separated list of integers >= 1, got {text!r}")
    seeds = tuple(int(part) for part in parts)
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds: {text!r} names a seed twice")
    return seeds


# --------------------------------------------------------------------------------------------
# fairseq-train commands
# --------------------------------------------------------------------------------------------


def train_command(
    data_bin: str,
    run_dir: str,
    run: Run,
    options: Sequence[Tuple[str, Optional[str]]],
    overrides: Sequence[Tuple[str, Optional[str]]] = (),
) -> List[str]:
    own = [
        ("--save-dir", os.path.join(run_dir, CHECKPOINTS_FOLDER)),
        ("--seed", str(run.seed)),
        ("--user-dir", USER_DIR),
    ]
    return [sys.executable, "-m", "fairseq_cli.train", data_bin] + recipe.merge_options(
        options, overrides, own
    )


# --------------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------------


@dataclass
class GridConfig:
    out_dir: str
    preset: Table4Preset
    optimizers: Tuple[str, ...] = OPTIMIZERS
    seeds: Optional[Tuple[int, ...]] = None  # None: the preset's
    archive: Optional[str] = None
    data_bin: Optional[str] = None
    max_update: Optional[int] = None
    fp16: bool = False
    eval_bleu: bool = False
    checkpoint: Optional[str] = None  # None: the preset's
    sharpness_rho: Optional[float] = None  # also measure the adaptive sharpness at this ρ
    config_dir: Optional[str] = None  # None: the installed configs (recipe.config_dir())
    gpus: Optional[List[str]] = None  # None: every visible GPU

    @property
    def runs(self) -> List[Run]:
        return [Run(o, s) for o in self.optimizers for s in (self.seeds or self.preset.seeds)]

    @property
    def default_data_bin(self) -> str:
        return os.path.join(self.out_dir, DATA_FOLDER, DATA_BIN_NAME)

    def run_dir(self, run: Run) -> str:
        return os.path.join(self.out_dir, report.RUNS_FOLDER, run.name)

    def gpu_ids(self) -> List[str]:
        return self.gpus if self.gpus is not None else visible_gpus()

    def overrides(self) -> List[Tuple[str, Optional[str]]]:
        options = []
        if self.max_update is not None:
            options.append(("--max-update", str(self.max_update)))
        if self.fp16:
            options.append(("--fp16", None))
        return options


def visible_gpus() -> List[str]:
    """CUDA_VISIBLE_DEVICES entries of the GPUs torch sees (indices if the variable is unset)."""
    import torch

    count = torch.cuda.device_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip()][:count]
    return [str(i) for i in range(count)]


def check_grid(config: GridConfig) -> None:
    """Every check that needs no work, so that bad input fails before anything starts."""
    if config.max_update is not None and config.max_update < 1:
        raise ConfigError(f"--max-update must be >= 1, got {config.max_update}")
    if config.checkpoint is not None:
        evaluation.parse_checkpoint_choice(config.checkpoint)
    for optimizer in config.optimizers:
        recipe.training_options(
            config.preset.args_files, optimizer, config.eval_bleu, config.config_dir
        )
    if config.data_bin is not None:
        evaluation.check_data_bin(config.data_bin)
    elif config.archive is not None:
        if not os.path.isfile(config.archive):
            raise ConfigError(f"--archive: file not found: {config.archive}")
    elif config.preset.sample_archive is None and not os.path.isdir(config.default_data_bin):
        raise ConfigError(
            f"--archive is required for --preset {config.preset.name} (the IWSLT'14 de-en.tgz), "
            f"unless {config.default_data_bin} exists or --data-bin is given"
        )
    if config.sharpness_rho is not None and not (
        math.isfinite(config.sharpness_rho) and config.sharpness_rho > 0
    ):
        raise ConfigError(
            f"--sharpness-rho must be a finite number > 0, got {config.sharpness_rho}"
        )
    if config.fp16 and not config.gpu_ids():
        raise ConfigError("--fp16 needs a GPU, and none is visible")


def prepare_data(config: GridConfig) -> str:
    """The binarized data: --data-bin, or prepared in <out>/data (skipped when it exists)."""
    if config.data_bin is not None:
        return os.path.abspath(config.data_bin)
    data_bin = os.path.abspath(config.default_data_bin)
    workdir = os.path.join(config.out_dir, DATA_FOLDER)
    if not evaluation.missing_data_files(data_bin):
        logger.info(f"data: using {data_bin} (delete it to prepare again)")
        return data_bin
    archive = config.archive
    if archive is None:
        sample = config.preset.sample_archive
        os.makedirs(workdir, exist_ok=True)
        archive = synthetic_data.build_sample_archive(
            os.path.join(workdir, prepare.ARCHIVE_NAME),
            n_train=sample.n_train,
            n_dev=sample.n_dev,
            seed=sample.seed,
        )
        logger.info(f"data: built the sample archive {archive}")
    logger.info(f"data: preparing {archive} into {workdir}")
    return os.path.abspath(
        prepare.prepare_iwslt14(archive, workdir, bpe_merges=config.preset.bpe_merges)
    )


def reference_files(data_bin: str) -> Dict[str, str]:
    """Untokenized references `{split}.raw.en` written by the preparation, where they exist."""
    tokenized = os.path.join(os.path.dirname(os.path.dirname(data_bin)), prepare.PREP_NAME)
    found = {}
    for split in evaluation.EVALUATED_SPLITS:
        for folder in (os.path.join(tokenized, "tmp"), tokenized):
            path = os.path.join(folder, f"{split}.raw.{prepare.TARGET_LANG}")
            if os.path.isfile(path):
                found[split] = path
                break
    return found


def train(command: List[str], command_line: str, run_dir: str, env: Dict[str, str]) -> None:
    """fairseq-train, appending to train.log; resumes from checkpoint_last.pt if there is one."""
    with open(os.path.join(run_dir, COMMAND_FILE), "w", encoding="utf-8") as f:
        f.write(command_line + "\n")
    log_path = os.path.join(run_dir, report.TRAIN_LOG)
    with open(log_path, "a", encoding="utf-8") as log:
        returncode = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    if returncode != 0:
        raise FairseqAsamError(f"fairseq-train failed with exit code {returncode}; see {log_path}")
    with open(os.path.join(run_dir, TRAINING_DONE), "w", encoding="utf-8") as f:
        f.write(command_line + "\n")


def run_environment(preset: Table4Preset, gpu: Optional[str]) -> Dict[str, str]:
    """Environment variables a run sets: its GPU, or on a CPU the preset's thread count."""
    if gpu is not None:
        return {"CUDA_VISIBLE_DEVICES": gpu}
    if preset.cpu_threads is not None and "OMP_NUM_THREADS" not in os.environ:
        return {"OMP_NUM_THREADS": str(preset.cpu_threads)}
    return {}


def execute_run(
    config: GridConfig, run: Run, data_bin: str, references: Dict[str, str], gpu: Optional[str]
) -> str:
    """Trains (or resumes) and evaluates one run; returns its results.json."""
    run_dir = config.run_dir(run)
    results_path = os.path.join(run_dir, evaluation.RESULTS_NAME)
    os.makedirs(run_dir, exist_ok=True)
    options = recipe.training_options(
        config.preset.args_files, run.optimizer, config.eval_bleu, config.config_dir
    )
    command = train_command(data_bin, run_dir, run, options, config.overrides())
    settings = run_environment(config.preset, gpu)
    env = {**os.environ, **settings}
    command_line = " ".join(
        [f"{k}={shlex.quote(v)}" for k, v in settings.items()] + [shlex.join(command)]
    )
    if os.path.isfile(os.path.join(run_dir, TRAINING_DONE)):
        logger.info(f"{run.name}: training finished earlier ({TRAINING_DONE}); evaluating")
    else:
        last = os.path.join(run_dir, CHECKPOINTS_FOLDER, "checkpoint_last.pt")
        where = f"GPU {gpu}" if gpu is not None else "CPU"
        logger.info(
            f"{run.name}: {'resuming from ' + last if os.path.isfile(last) else 'training'} "
            f"on {where}"
        )
        train(command, command_line, run_dir, env)
    checkpoint = evaluation.parse_checkpoint_choice(config.checkpoint or config.preset.checkpoint)
    scores = evaluation.evaluate_checkpoint(
        data_bin,
        os.path.join(run_dir, CHECKPOINTS_FOLDER),
        USER_DIR,
        checkpoint,
        references=references,
        output_dir=run_dir,
        env=env,
    )
    with open(os.path.join(run_dir, COMMAND_FILE), encoding="utf-8") as f:
        train_command_line = f.read().strip()
    results = evaluation.update_results(
        results_path,
        {
            "run": run.name,
            "optimizer": run.optimizer,
            "seed": run.seed,
            "preset": config.preset.name,
            "data_bin": data_bin,
            "train_command": train_command_line,
            **scores,
        },
    )
    if config.sharpness_rho is not None and "sharpness" not in results:
        logger.info(f"{run.name}: measuring adaptive sharpness at rho={config.sharpness_rho}")
        # This process sees every GPU of the grid, in CUDA_VISIBLE_DEVICES order.
        device = f"cuda:{config.gpu_ids().index(gpu)}" if gpu is not None else "cpu"
        measured = sharpness.measure_checkpoint(
            scores["checkpoint"]["path"],
            data_bin,
            config.sharpness_rho,
            measures=("adaptive",),
            device=device,
        )
        evaluation.update_results(results_path, {"sharpness": measured})
    logger.info(f"{run.name}: done, {results_path}")
    return results_path


def run_grid(config: GridConfig) -> Dict[str, str]:
    """Data -> every run of the grid -> report; returns the report's files."""
    check_grid(config)
    gpus = config.gpu_ids()
    data_bin = prepare_data(config)
    references = reference_files(data_bin)
    pending = []
    for run in config.runs:
        if os.path.isfile(os.path.join(config.run_dir(run), evaluation.RESULTS_NAME)):
            logger.info(f"{run.name}: skipped, {evaluation.RESULTS_NAME} exists")
        else:
            pending.append(run)
    logger.info(f"{len(pending)} of {len(config.runs)} runs to do, on {len(gpus) or 'no'} GPU(s)")

    devices: "queue.Queue[Optional[str]]" = queue.Queue()
    for device in gpus or [None]:
        devices.put(device)

    def on_free_device(run: Run) -> str:
        device = devices.get()
        try:
            return execute_run(config, run, data_bin, references, device)
        finally:
            devices.put(device)

    failures = []
    with ThreadPoolExecutor(max_workers=max(1, len(gpus))) as pool:
        futures = {run: pool.submit(on_free_device, run) for run in pending}
        for run, future in futures.items():
            try:
                future.result()
            except FairseqAsamError as error:
                logger.error(f"{run.name}: {error}")
                failures.append(f"{run.name}: {error}")
    outputs = report.write_report(config.out_dir)
    if failures:
        raise FairseqAsamError(f"{len(failures)} run(s) failed: " + "; ".join(failures))
    return outputs
