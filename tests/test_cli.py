"""End to end through fairseq's own command-line tools, on a tiny generated corpus."""

import contextlib
import io
import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from harness import TINY_TRANSFORMER

import fairseq_asam
from fairseq_asam.errors import FairseqAsamError
from fairseq_asam.optimizer_switch import switch_optimizer

TRAIN_ARGS = TINY_TRANSFORMER + [
    "--user-dir",
    fairseq_asam.USER_DIR,
    "--task",
    "translation",
    "--criterion",
    "label_smoothed_cross_entropy",
    "--label-smoothing",
    "0.1",
    "--max-tokens",
    "120",
    "--cpu",
    "--num-workers",
    "0",
    "--seed",
    "2",
    "--log-format",
    "json",
    "--log-interval",
    "1",
    "--no-epoch-checkpoints",
]


def fairseq(tool: str, *argv, check=True):
    """fairseq_cli.`tool` on one thread: the fastest for the tiny model, and the same reduction
    order in every run, which the bit-exact resume test needs."""
    proc = subprocess.run(
        [sys.executable, "-m", f"fairseq_cli.{tool}", *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"fairseq_cli.{tool} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def train(data_bin, save_dir, *extra, check=True):
    """fairseq_cli.train in a subprocess (what a user runs: the excepthook's output)."""
    return fairseq("train", data_bin, "--save-dir", str(save_dir), *TRAIN_ARGS, *extra, check=check)


def train_in_process(data_bin, save_dir, *extra) -> None:
    """fairseq-train's main in this process (no interpreter and fairseq start-up per run)."""
    from fairseq import distributed_utils, options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq_cli import train as fairseq_train

    argv = [data_bin, "--save-dir", str(save_dir), *TRAIN_ARGS, *extra]
    args = options.parse_args_and_arch(options.get_training_parser(), argv)
    distributed_utils.call_main(convert_namespace_to_omegaconf(args), fairseq_train.main)


def train_logged(caplog, data_bin, save_dir, *extra):
    """train_in_process; the log records it made (fairseq's progress bar names a record by its
    tag: train_inner, train, valid)."""
    caplog.clear()
    with caplog.at_level(logging.INFO):
        train_in_process(data_bin, save_dir, *extra)
    return list(caplog.records)


def logged(records, tag: str):
    """The JSON statistics fairseq logged under `tag` (--log-format json)."""
    return [json.loads(r.getMessage()) for r in records if r.name == tag]


def model_weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


@pytest.mark.slow  # fairseq-train end to end (in process)
@pytest.mark.parametrize("optimizer", ["asam", "sam"])
def test_training_runs_loss_falls_sharpness_logged(data_bin, tmp_path, caplog, optimizer):
    records = train_logged(
        caplog, data_bin, tmp_path, "--optimizer", optimizer, "--lr", "5e-3", "--max-update", "30"
    )
    inner = logged(records, "train_inner")
    assert len(inner) == 30
    first, last = float(inner[0]["loss"]), float(inner[-1]["loss"])
    assert last < first - 0.5, (first, last)
    assert all("sharpness" in rec for rec in inner)
    assert "train_sharpness" in logged(records, "train")[-1]
    assert (tmp_path / "checkpoint_last.pt").is_file() and (
        tmp_path / "checkpoint_best.pt"
    ).is_file()


# Resumes are compared with dropout on: fairseq reseeds it from the update number.
RESUME_FLAGS = [
    "--optimizer",
    "asam",
    "--lr",
    "2e-3",
    "--dropout",
    "0.1",
    "--lr-scheduler",
    "inverse_sqrt",
    "--warmup-updates",
    "4",
]


# Stopped after 3 updates (odd: --sam-interval 2 leaves update 3 plain, --sam-start-update 4
# has not started), 2 more after the resume: the schedule differs there from one counted from
# the optimizer's own steps (updates 3 and 4 would swap kinds).
RESUME_STOP, RESUME_END = 3, 5


def assert_resume_is_bit_exact(
    data_bin, tmp_path, flags, stop: int = RESUME_STOP, end: int = RESUME_END
) -> None:
    """`end` updates straight against `stop` updates, a resume, and the rest: same weights."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_in_process(data_bin, straight, *RESUME_FLAGS, *flags, "--max-update", str(end))
    train_in_process(data_bin, resumed, *RESUME_FLAGS, *flags, "--max-update", str(stop))
    train_in_process(data_bin, resumed, *RESUME_FLAGS, *flags, "--max-update", str(end))
    a = torch.load(straight / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    b = torch.load(resumed / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    # The second run loaded the first's checkpoint: fairseq appends to its optimizer history.
    assert [h["num_updates"] for h in b["optimizer_history"]] == [stop, end]
    assert a["model"].keys() == b["model"].keys()
    difference = max(
        float((a["model"][k].double() - b["model"][k].double()).abs().max()) for k in a["model"]
    )
    assert difference == 0.0, f"max |Δw| = {difference:.2e} between resumed and straight"


@pytest.mark.slow
def test_resume_matches_uninterrupted_run_and_generate_loads(data_bin, tmp_path):
    from fairseq import options
    from fairseq_cli import generate

    assert_resume_is_bit_exact(data_bin, tmp_path, [])
    # fairseq-generate loads the checkpoint under torch >= 2.6 (weights_only default).
    argv = [data_bin, "--user-dir", fairseq_asam.USER_DIR, "--cpu", "--path"]
    argv += [str(tmp_path / "straight" / "checkpoint_last.pt"), "--gen-subset", "valid"]
    argv += ["--beam", "2", "--max-tokens", "500", "--results-path", str(tmp_path / "gen")]
    generate.main(options.parse_args_and_arch(options.get_generation_parser(), argv))
    lines = (tmp_path / "gen" / "generate-valid.txt").read_text().splitlines()
    assert lines[-1].startswith("Generate valid with beam=2: BLEU4 = ")
    assert sum(line.startswith("H-") for line in lines) == 24  # every valid sentence


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags",
    [
        ["--sam-interval", "2"],
        ["--sam-start-update", "4"],
        ["--sam-interval", "2", "--looksam-alpha", "0.5"],
    ],
    ids=["sam-interval", "sam-start-update", "looksam"],
)
def test_resume_mid_schedule_is_bit_exact(data_bin, tmp_path, flags):
    """Stopped at an update the schedule leaves plain (3 with --sam-interval 2) or before it
    starts (3 < 4): the resumed run must count the schedule from fairseq's update number, not
    from the optimizer's steps since it was built, and LookSAM must resume with its g_v."""
    assert_resume_is_bit_exact(data_bin, tmp_path, flags)


@pytest.mark.slow
def test_adam_checkpoint_fine_tuned_with_asam_keeps_schedule(data_bin, tmp_path, caplog):
    sched = ["--lr", "1e-3", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "20"]
    train_in_process(
        data_bin, tmp_path / "adam", "--optimizer", "adam", *sched, "--max-update", "6"
    )
    # fairseq's own check: a different optimizer class.
    with pytest.raises(Exception, match="Optimizer does not match"):
        train_in_process(
            data_bin, tmp_path / "adam", "--optimizer", "asam", *sched, "--max-update", "8"
        )
    converted = tmp_path / "asam_start.pt"
    assert switch_optimizer(
        str(tmp_path / "adam" / "checkpoint_last.pt"), str(converted), "asam"
    ) == ("FairseqAdam", "FairseqASAM")
    records = train_logged(
        caplog,
        data_bin,
        tmp_path / "asam",
        "--optimizer",
        "asam",
        *sched,
        "--max-update",
        "8",
        "--restore-file",
        str(converted),
    )
    inner = logged(records, "train_inner")
    assert [int(r["num_updates"]) for r in inner] == [7, 8]
    assert float(inner[0]["lr"]) == pytest.approx(1e-3 * 7 / 20, rel=1e-3)  # warm-up continues
    assert "sharpness" in inner[0]


BYPASS_TASK = textwrap.dedent("""
    import fairseq_asam  # registers --optimizer asam
    from fairseq.tasks import register_task
    from fairseq.tasks.translation import TranslationConfig, TranslationTask

    @register_task("bypass_translation", dataclass=TranslationConfig)
    class BypassTranslation(TranslationTask):
        def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
            model.train()
            loss, sample_size, logging_output = criterion(model, sample)
            optimizer.backward(loss)
            return loss, sample_size, logging_output
""")


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--optimizer", "asam", "--rho", "-1"], "--rho must be a finite number > 0"),
        (["--optimizer", "sam", "--rho", "nan"], "--rho must be a finite number > 0"),
        (["--optimizer", "asam", "--eta", "-0.5"], "--eta must be a finite number >= 0"),
        (["--optimizer", "sam", "--sam-interval", "0"], "--sam-interval must be an integer >= 1"),
        (["--optimizer", "asam", "--looksam-alpha", "0.5"], "it needs --sam-interval >= 2"),
        (
            ["--optimizer", "asam", "--sharpness-eval-interval", "-1"],
            "--sharpness-eval-interval must be an integer >= 0",
        ),
        (["--optimizer", "asam", "--task", "bypass_translation"], "task 'BypassTranslation'"),
    ],
)
def test_bad_input_fails_with_one_line(data_bin, tmp_path, caplog, flags, message):
    """fairseq-train's main in process, its error through the plugin's excepthook: the line
    fairseq-train prints (test_bad_input_in_a_fairseq_train_process: the hook installed)."""
    argv = list(flags)
    if "bypass_translation" in flags:
        user_dir = tmp_path / "bypass_task"
        user_dir.mkdir()
        (user_dir / "__init__.py").write_text(BYPASS_TASK)
        argv += ["--user-dir", str(user_dir)]
    with pytest.raises(FairseqAsamError) as raised:
        train_logged(caplog, data_bin, tmp_path / "ck", *argv, "--max-update", "3")
    # The hook the plugin installs (another may wrap it by now: torch.distributed's does).
    hook = fairseq_asam._one_line_for_user_errors(sys.__excepthook__)
    with contextlib.redirect_stderr(io.StringIO()) as stderr:
        hook(raised.type, raised.value, raised.tb)
    assert stderr.getvalue().splitlines() == [f"fairseq-asam: error: {raised.value}"]
    assert message in str(raised.value) and "\n" not in str(raised.value)
    assert not os.path.exists(tmp_path / "ck" / "checkpoint_last.pt")
    assert not logged(caplog.records, "train_inner")  # no update was taken


@pytest.mark.slow
def test_bad_input_in_a_fairseq_train_process(data_bin, tmp_path):
    """What a user sees: one line on stderr, no traceback, exit status 1."""
    proc = train(
        data_bin, tmp_path, "--optimizer", "asam", "--rho", "-1", "--max-update", "3", check=False
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "fairseq-asam: error: --rho must be a finite number > 0 for --optimizer asam, got -1.0"
    )
    assert [line for line in proc.stderr.splitlines() if "error" in line.lower()] == [
        proc.stderr.strip().splitlines()[-1]
    ]
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "checkpoint_last.pt")
    assert "| train_inner |" not in proc.stdout  # no update was taken


def test_fully_sharded_refused_when_optimizer_is_built(data_bin):
    """In-process: fairseq-train needs fairscale for FSDP before it reaches the optimizer."""
    from fairseq import optim
    from harness import parse_cfg

    from fairseq_asam.errors import ConfigError

    cfg = parse_cfg(data_bin, ["--optimizer", "asam", "--ddp-backend", "fully_sharded"])
    with pytest.raises(ConfigError, match="--ddp-backend fully_sharded"):
        optim.build_optimizer(cfg.optimizer, [torch.nn.Parameter(torch.zeros(2))])


def test_looksam_refused_with_zero_sharding_when_optimizer_is_built(data_bin):
    """fairseq's `--zero-sharding os` swaps the torch optimizer for fairscale's OSS after the
    optimizer is built, so the state-dict hooks that checkpoint LookSAM's g_v would be lost."""
    from fairseq import optim
    from harness import parse_cfg

    from fairseq_asam.errors import ConfigError

    looksam = ["--optimizer", "asam", "--sam-interval", "2", "--looksam-alpha", "0.5"]
    params = [torch.nn.Parameter(torch.zeros(2))]
    cfg = parse_cfg(data_bin, looksam + ["--zero-sharding", "os"])
    with pytest.raises(ConfigError, match="--looksam-alpha does not support --zero-sharding os"):
        optim.build_optimizer(cfg.optimizer, params)
    # Controls: LookSAM without sharding, and sharding without LookSAM, are built.
    optim.build_optimizer(parse_cfg(data_bin, looksam).optimizer, params)
    sharded = parse_cfg(data_bin, ["--optimizer", "asam", "--zero-sharding", "os"])
    optim.build_optimizer(sharded.optimizer, params)


def test_checkpoint_with_numpy_values_loads_safely(tmp_path):
    """--eval-bleu checkpoints hold numpy arrays and scalars; fairseq loads with a plain
    torch.load, whose default is weights_only=True on torch >= 2.6."""
    import argparse

    import numpy as np

    state = {
        "args": argparse.Namespace(arch="transformer"),
        "model": {"w": torch.ones(2)},
        "extra_state": {
            "best": np.float64(35.1),
            "counts": np.arange(4, dtype=np.int64),
            "scores": np.ones(3, dtype=np.float32),
        },
    }
    path = tmp_path / "ckpt.pt"
    torch.save(state, path)
    loaded = torch.load(path, map_location="cpu")
    assert float(loaded["extra_state"]["best"]) == 35.1
    assert loaded["extra_state"]["counts"].tolist() == [0, 1, 2, 3]
    torch.save({"f": tmp_path.__class__}, tmp_path / "other.pt")
    with pytest.raises(Exception, match="weights_only"):  # the safe loader stays on for others
        torch.load(tmp_path / "other.pt")


@pytest.mark.slow  # fairseq-train end to end (in process)
def test_no_empty_sharpness_in_logs_with_sam_interval(data_bin, tmp_path, caplog):
    """A log interval without a sharpness-aware update prints no `sharpness` (not None/null)."""
    records = train_logged(
        caplog,
        data_bin,
        tmp_path,
        "--optimizer",
        "asam",
        "--sam-interval",
        "2",
        "--max-update",
        "6",
    )
    inner = logged(records, "train_inner")
    assert [int(r["num_updates"]) for r in inner] == [1, 2, 3, 4, 5, 6]
    # Updates 0, 2, 4 (0-based) are sharpness-aware: they are logged as num_updates 1, 3, 5.
    assert [("sharpness" in r) for r in inner] == [True, False, True, False, True, False]
    assert all(r["sharpness"] is not None for r in inner if "sharpness" in r)
    assert logged(records, "train")[-1]["train_sharpness"] is not None


@pytest.mark.slow  # fairseq-train end to end (in process)
def test_adam_resumed_from_asam_checkpoint_logs_no_sharpness(data_bin, tmp_path, caplog):
    train_in_process(data_bin, tmp_path, "--optimizer", "asam", "--max-update", "4")
    records = train_logged(
        caplog,
        data_bin,
        tmp_path,
        "--optimizer",
        "adam",
        "--reset-optimizer",
        "--max-update",
        "8",
        "--log-format",
        "simple",
    )
    text = "\n".join(f"{r.name} | {r.getMessage()}" for r in records)
    assert "Loaded checkpoint" in text and "num_updates=8" in text
    assert "sharpness" not in text  # fairseq restored the meters; none is printed
