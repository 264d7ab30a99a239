"""End to end through fairseq's own command-line tools, on a tiny generated corpus."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from harness import TINY_TRANSFORMER

import fairseq_asam
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
    return fairseq("train", data_bin, "--save-dir", str(save_dir), *TRAIN_ARGS, *extra, check=check)


def logged(stdout: str, tag: str):
    """The JSON records fairseq logged under `tag` (train_inner, valid, train)."""
    out = []
    for line in stdout.splitlines():
        if f"| {tag} |" in line:
            out.append(json.loads(line.split(f"| {tag} | ", 1)[1]))
    return out


def model_weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["asam", "sam"])
def test_training_runs_loss_falls_sharpness_logged(data_bin, tmp_path, optimizer):
    proc = train(data_bin, tmp_path, "--optimizer", optimizer, "--lr", "5e-3", "--max-update", "30")
    inner = logged(proc.stdout, "train_inner")
    assert len(inner) == 30
    first, last = float(inner[0]["loss"]), float(inner[-1]["loss"])
    assert last < first - 0.5, (first, last)
    assert all("sharpness" in rec for rec in inner)
    assert "train_sharpness" in logged(proc.stdout, "train")[-1]
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


def train_in_process(data_bin, save_dir, *extra) -> None:
    """fairseq-train's main in this process (no interpreter and fairseq start-up per run)."""
    from fairseq import distributed_utils, options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq_cli import train as fairseq_train

    argv = [data_bin, "--save-dir", str(save_dir), *TRAIN_ARGS, *extra]
    args = options.parse_args_and_arch(options.get_training_parser(), argv)
    distributed_utils.call_main(convert_namespace_to_omegaconf(args), fairseq_train.main)


def assert_resume_is_bit_exact(data_bin, tmp_path, flags, stop: int, end: int = 10) -> None:
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
    assert_resume_is_bit_exact(data_bin, tmp_path, [], stop=5)
    # fairseq-generate loads the checkpoint under torch >= 2.6 (weights_only default).
    gen = fairseq(
        "generate",
        data_bin,
        "--user-dir",
        fairseq_asam.USER_DIR,
        "--cpu",
        "--path",
        str(tmp_path / "straight" / "checkpoint_last.pt"),
        "--gen-subset",
        "valid",
        "--beam",
        "2",
        "--max-tokens",
        "500",
    )
    assert "BLEU4" in gen.stdout + gen.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags, stop",
    [
        (["--sam-interval", "2"], 5),
        (["--sam-start-update", "4"], 3),
        (["--sam-interval", "2", "--looksam-alpha", "0.5"], 5),
    ],
    ids=["sam-interval", "sam-start-update", "looksam"],
)
def test_resume_mid_schedule_is_bit_exact(data_bin, tmp_path, flags, stop):
    """Stopped at an update the schedule leaves plain (5 with --sam-interval 2) or before it
    starts (3 < 4): the resumed run must count the schedule from fairseq's update number, not
    from the optimizer's steps since it was built, and LookSAM must resume with its g_v."""
    assert_resume_is_bit_exact(data_bin, tmp_path, flags, stop)


@pytest.mark.slow
def test_adam_checkpoint_fine_tuned_with_asam_keeps_schedule(data_bin, tmp_path):
    sched = ["--lr", "1e-3", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "20"]
    train(data_bin, tmp_path / "adam", "--optimizer", "adam", *sched, "--max-update", "6")
    refused = train(
        data_bin, tmp_path / "adam", "--optimizer", "asam", *sched, "--max-update", "8", check=False
    )
    assert refused.returncode != 0  # fairseq's own check: a different optimizer class
    converted = tmp_path / "asam_start.pt"
    assert switch_optimizer(
        str(tmp_path / "adam" / "checkpoint_last.pt"), str(converted), "asam"
    ) == ("FairseqAdam", "FairseqASAM")
    proc = train(
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
    inner = logged(proc.stdout, "train_inner")
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


@pytest.mark.slow
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
def test_bad_input_fails_with_one_line(data_bin, tmp_path, flags, message):
    argv = list(flags)
    if "bypass_translation" in flags:
        user_dir = tmp_path / "bypass_task"
        user_dir.mkdir()
        (user_dir / "__init__.py").write_text(BYPASS_TASK)
        argv += ["--user-dir", str(user_dir)]
    proc = train(data_bin, tmp_path / "ck", *argv, "--max-update", "3", check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fairseq-asam: error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "ck" / "checkpoint_last.pt")
    assert not logged(proc.stdout, "train_inner")  # no update was taken


def test_fully_sharded_refused_when_optimizer_is_built(data_bin):
    """In-process: fairseq-train needs fairscale for FSDP before it reaches the optimizer."""
    from fairseq import optim
    from harness import parse_cfg

    from fairseq_asam.errors import ConfigError

    cfg = parse_cfg(data_bin, ["--optimizer", "asam", "--ddp-backend", "fully_sharded"])
    with pytest.raises(ConfigError, match="--ddp-backend fully_sharded"):
        optim.build_optimizer(cfg.optimizer, [torch.nn.Parameter(torch.zeros(2))])


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


@pytest.mark.slow
def test_no_empty_sharpness_in_logs_with_sam_interval(data_bin, tmp_path):
    """A log interval without a sharpness-aware update prints no `sharpness` (not None/null)."""
    proc = train(
        data_bin, tmp_path, "--optimizer", "asam", "--sam-interval", "2", "--max-update", "6"
    )
    inner = logged(proc.stdout, "train_inner")
    assert [int(r["num_updates"]) for r in inner] == [1, 2, 3, 4, 5, 6]
    # Updates 0, 2, 4 (0-based) are sharpness-aware: they are logged as num_updates 1, 3, 5.
    assert [("sharpness" in r) for r in inner] == [True, False, True, False, True, False]
    assert all(r["sharpness"] is not None for r in inner if "sharpness" in r)
    assert logged(proc.stdout, "train")[-1]["train_sharpness"] is not None


@pytest.mark.slow
def test_adam_resumed_from_asam_checkpoint_logs_no_sharpness(data_bin, tmp_path):
    train(data_bin, tmp_path, "--optimizer", "asam", "--max-update", "4")
    proc = train(
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
    assert "Loaded checkpoint" in proc.stdout and "num_updates=8" in proc.stdout
    assert "sharpness" not in proc.stdout  # fairseq restored the meters; none is printed
