"""fairseq-asam-correlation (fairseq_asam_experiments/correlation.py): Kendall τ and ψ against
hand-computed values, the measures of a small trained model and of its rescaled copies, the
family's grid and the output files.  The tiny preset end to end takes minutes: docs/correlation.md
gives its measured run."""

import json
import math
import os

import pytest
import torch

from fairseq_asam_experiments import correlation, launch, recipe
from fairseq_asam_experiments.errors import SettingError

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one thread

AXES = ("a", "b")


def table(gaps_and_measures):
    """Rows of a 2 × 2 family (axes a, b) from [(a, b, gap, measure), ...]."""
    return [
        {"a": a, "b": b, "gap": gap, "sharpness": m, "adaptive_sharpness": m, "parameter_norm": m}
        for a, b, gap, m in gaps_and_measures
    ]


# Within b = 0, a ranks the gap and the measure alike (τ = +1); within b = 1 oppositely (−1):
# ψ_a = 0.  Within a = 0 and a = 1, b ranks both alike: ψ_b = +1, Ψ = 0.5.  Over all 6 pairs one
# is discordant (gaps 3 < 4, measures 4 > 3): τ = (5 − 1) / 6 = 2/3, no ties.
HAND_TABLE = table([(0, 0, 1.0, 1.0), (1, 0, 2.0, 2.0), (0, 1, 3.0, 4.0), (1, 1, 4.0, 3.0)])


def test_tau_and_psi_of_a_hand_computed_table():
    stats = correlation.correlations(HAND_TABLE, AXES)["sharpness"]
    assert stats["tau"] == pytest.approx(2 / 3)
    psi = stats["psi"]["per_axis"]
    assert psi["a"] == {"psi": pytest.approx(0.0), "cells": 2, "undefined_cells": 0, "models": 4}
    assert psi["b"] == {"psi": pytest.approx(1.0), "cells": 2, "undefined_cells": 0, "models": 4}
    assert stats["psi"]["overall"] == pytest.approx(0.5)
    assert stats["models"] == 4


def test_tau_is_tau_b_with_ties():
    """Gaps 1, 1, 2, 3 against 1, 2, 3, 4: the tied pair is neither concordant nor discordant,
    C = 5, D = 0; tau-b = 5 / sqrt((6 − 1)(6 − 0)), where tau-a would be 5/6."""
    rows = table([(0, 0, 1.0, 1.0), (1, 0, 1.0, 2.0), (0, 1, 2.0, 3.0), (1, 1, 3.0, 4.0)])
    assert correlation.kendall_tau(rows, "sharpness") == pytest.approx(5 / math.sqrt(30))


def test_undefined_cells_are_left_out_and_counted():
    """In the cell b = 1 the measure is constant (4, 4): τ is undefined there; ψ_a is the other
    cell's τ (+1) over its 2 models.  A one-model family has no τ at all."""
    rows = table([(0, 0, 1.0, 1.0), (1, 0, 2.0, 2.0), (0, 1, 3.0, 4.0), (1, 1, 4.0, 4.0)])
    psi_a = correlation.granulated(rows, AXES, "sharpness")["per_axis"]["a"]
    assert psi_a == {"psi": pytest.approx(1.0), "cells": 2, "undefined_cells": 1, "models": 2}
    assert correlation.kendall_tau(rows[:1], "sharpness") is None
    constant = correlation.granulated(rows[2:], ("a",), "sharpness")
    assert constant["per_axis"]["a"]["psi"] is None and constant["overall"] is None


def test_outputs_of_a_fixed_table(tmp_path):
    settings = correlation.Settings()
    printed = correlation.write_outputs(str(tmp_path), HAND_TABLE, AXES, settings, {"g": 1}, [])
    with open(tmp_path / "correlation.json", encoding="utf-8") as f:
        report = json.load(f)
    assert report["kendall"] == "tau-b" and "neither concordant nor discordant" in report["ties"]
    assert report["sharpness"]["tau"] == pytest.approx(2 / 3)
    assert report["adaptive_sharpness"]["psi"]["overall"] == pytest.approx(0.5)
    assert report["models"] == 4 and report["parameter_norm"]["models"] == 4
    assert "rho 0.05," in report["sharpness"]["definition"]
    assert "rho 0.5, eta 0, biases normalized" in report["adaptive_sharpness"]["definition"]
    markdown = (tmp_path / "correlation.md").read_text(encoding="utf-8").splitlines()
    assert printed.splitlines() == markdown
    assert markdown[0] == "|  | sharpness | adaptive sharpness | parameter norm |"
    assert markdown[2] == "| τ | +0.667 (4) | +0.667 (4) | +0.667 (4) |"
    assert markdown[3].startswith("| ψ a | +0.000 (4; 2 of 2 cells) |")
    assert markdown[5] == "| Ψ | +0.500 | +0.500 | +0.500 |"
    csv_lines = (tmp_path / "correlation.csv").read_text(encoding="utf-8").splitlines()
    assert csv_lines[0] == "a,b,gap,sharpness,adaptive_sharpness,parameter_norm"
    assert len(csv_lines) == 5
    for measure in correlation.MEASURES:
        assert (tmp_path / f"scatter-{measure}.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------- the family


@pytest.fixture
def checkout_configs(monkeypatch):
    """This checkout's configs/ (an editable install elsewhere would find its own)."""
    configs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    monkeypatch.setattr(recipe, "config_dir", lambda: configs)


def test_the_tiny_family_is_a_grid_of_eight_models_over_three_axes(tmp_path, checkout_configs):
    args = correlation.parser().parse_args(["--out", str(tmp_path)])
    built = correlation.build_grid(args)
    assert correlation.axes_of(built) == ["lr", "dropout", "max-tokens"]
    runs = built.runs()
    assert len(runs) == 8 and {run.row for run in runs} == {"adam"}
    command = built.command(runs[-1], "data-bin")
    assert command[command.index("--lr") + 1] == "0.006"
    assert command[command.index("--dropout") + 1] == "0.3"
    assert command[command.index("--max-tokens") + 1] == "1024"
    assert command[command.index("--max-update") + 1] == "200"
    paper = correlation.build_grid(
        correlation.parser().parse_args(["--out", "x", "--preset", "paper"])
    )
    assert len(paper.runs()) == 27 and paper.budget() == 50000


def test_max_update_replaces_the_presets_and_must_be_positive(tmp_path, checkout_configs):
    args = correlation.parser().parse_args(["--out", str(tmp_path), "--max-update", "7"])
    assert correlation.build_grid(args).budget() == 7
    args = correlation.parser().parse_args(["--out", str(tmp_path), "--max-update", "0"])
    with pytest.raises(SettingError, match="--max-update"):
        correlation.build_grid(args)


def test_a_family_needs_three_axes(tmp_path, checkout_configs):
    argv = ["--out", str(tmp_path), "--sweep", "lr=1e-3,2e-3", "--sweep", "dropout=0,0.1"]
    with pytest.raises(SettingError, match="3 axes"):
        correlation.build_grid(correlation.parser().parse_args(argv))


@pytest.mark.parametrize("flag", ["--rho-plain", "--rho-adaptive", "--steps", "--train-batches"])
def test_measurement_flags_must_be_positive(tmp_path, flag):
    """Refused in one line naming the flag, before any data is prepared or model trained."""
    assert correlation.main(["--out", str(tmp_path), flag, "0"]) == 1
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize(
    "flags, error",
    [
        (["--time-min", "5"], "--time-min is a job option: it needs --launcher slurm or"),
        (["--launcher", "slurm"], "--launcher slurm needs Slurm's sbatch and srun on PATH"),
    ],
)
def test_launcher_flags_are_table4s_checked_before_any_work(
    tmp_path, checkout_configs, capsys, monkeypatch, flags, error
):
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # no sbatch
    assert correlation.main(["--out", str(tmp_path / "out"), *flags]) == 1
    assert error in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_slurm_jobs_go_once_and_the_rerun_after_them_measures(
    tmp_path, checkout_configs, monkeypatch
):
    """Without --wait: a job for each run left to train; a rerun submits nothing while a run's
    job is out (job.json, no training stamp), takes a failed job's run as failed, and measures
    once every run is trained or failed."""
    args = correlation.parser().parse_args(["--out", str(tmp_path), "--launcher", "slurm"])
    built = correlation.build_grid(args)
    names = [run.name for run in built.runs()]
    trained, submitted = set(names[1:]), []
    monkeypatch.setattr(launch, "launch_jobs", lambda g, runs, *rest: submitted.extend(runs))

    def train_family():  # launch.check_runs's plans: None for a trained run
        plans = {name: None if name in trained else "training" for name in names}
        return correlation.train_family(built, "data-bin", args, [], plans)

    assert train_family() is None  # submitted, not waited
    assert [run.name for run in submitted] == names[:1]
    run_dir = tmp_path / "runs" / names[0]
    run_dir.mkdir(parents=True)
    (run_dir / "job.json").write_text('{"job_id": "100"}')  # as launch_jobs writes it
    assert train_family() is None  # still out
    (run_dir / "failure.json").write_text('{"stage": "train", "error": "fairseq-train exited 1"}')
    outcomes = train_family()
    assert outcomes == {name: ("done", "") for name in names[1:]} | {
        names[0]: ("failed", "fairseq-train exited 1")
    }
    trained.add(names[0])
    outcomes = train_family()
    assert outcomes == {name: ("done", "") for name in names} and len(submitted) == 1


@pytest.mark.parametrize("scales", ["0", "1", "-2", "x", "0.5,inf"])
def test_rescaled_copies_take_positive_scales_other_than_one(scales):
    with pytest.raises(SystemExit):
        correlation.parser().parse_args(["--out", "x", "--rescaled-copies", scales])
    parsed = correlation.parser().parse_args(["--out", "x", "--rescaled-copies"])
    assert parsed.rescaled_copies == correlation.DEFAULT_SCALES


# ---------------------------------------------------------------- a small trained model


@pytest.fixture(scope="module")
def checkpoint_and_data(tmp_path_factory):
    from harness import make_data_bin_with_test, train_checkpoint

    data_bin = make_data_bin_with_test(str(tmp_path_factory.mktemp("corr-data")))
    return train_checkpoint(data_bin, tmp_path_factory.mktemp("corr-model"), updates=5), data_bin


SMALL = correlation.Settings(steps=2, train_batches=3, batch_tokens=120)
SCALES = (0.3, 10.0)  # not powers of 2: the copies carry fp32 rounding


@pytest.fixture(scope="module")
def measured(checkpoint_and_data):
    checkpoint, data_bin = checkpoint_and_data
    return correlation.measure_model(checkpoint, data_bin, SMALL, SCALES)


def test_losses_are_the_nll_per_target_token_in_bits(checkpoint_and_data, measured):
    """The train loss against fairseq's own cross-entropy summed over the subset by hand, with
    label smoothing as a negative control (the training criterion's loss differs)."""
    from fairseq_asam_experiments import loading

    checkpoint, data_bin = checkpoint_and_data
    loaded = loading.load_checkpoint(checkpoint, data_bin, "train")
    subset = dict(max_tokens=120, seed=1, shuffle=True)  # as training's epoch 1 draws them
    batches = loading.split_batches(loaded, "train", SMALL.train_batches, **subset)
    nats = tokens = smoothed = 0.0
    with torch.no_grad():
        for sample in batches:
            output = loaded.model(**sample["net_input"])
            lprobs = loaded.model.get_normalized_probs(output, log_probs=True)
            target = sample["target"]
            mask = target.ne(loaded.task.target_dictionary.pad())
            nats -= float(lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)[mask].sum())
            tokens += float(mask.sum())
            smoothed += float(loaded.criterion(loaded.model, sample)[0])
    original = measured[0]
    assert original["train_loss"] == pytest.approx(nats / tokens / math.log(2), rel=1e-5)
    assert smoothed / tokens / math.log(2) != pytest.approx(original["train_loss"], rel=1e-4)
    assert original["gap"] == pytest.approx(original["test_loss"] - original["train_loss"])


def test_rescaled_copies_keep_adaptive_sharpness_not_plain(measured):
    """A copy computes the same function (same loss), shares its original's gap and has its
    adaptive sharpness (η = 0, biases normalized); its plain sharpness changes (control)."""
    assert [row["scale"] for row in measured] == [1.0, *SCALES]
    original = measured[0]
    for copy in measured[1:]:
        assert copy["gap"] == original["gap"]
        assert copy["own_train_loss"] == pytest.approx(original["train_loss"], rel=1e-5)
        assert copy["adaptive_sharpness"] == pytest.approx(original["adaptive_sharpness"], rel=0.01)
        assert copy["parameter_norm"] != pytest.approx(original["parameter_norm"], rel=0.01)
    assert original["adaptive_sharpness"] > 0
    plain = [row["sharpness"] for row in measured]
    assert max(plain) / min(plain) > 1.3, plain


@pytest.mark.slow  # 4 small models trained in process and measured: 11 s (load 3) to 41 s (load 9)
def test_the_command_on_small_models(tmp_path, monkeypatch, checkout_configs, checkpoint_and_data):
    """The whole command on 4 small models (training stubbed: 1 to 4 Adam updates of the tiny
    test Transformer), one of which fails to train: the others are measured with their rescaled
    copies, a one-value axis has only undefined cells, and the exit status is 1."""
    from harness import train_checkpoint

    from fairseq_asam_experiments.errors import ExperimentError

    _, data_bin = checkpoint_and_data
    trained = []

    def train_stub(built, run, data_bin_, env, children):  # launch's train stage
        trained.append(run.name)
        if len(trained) == 4:
            raise ExperimentError(f"{run.name}: fairseq-train exited 1")
        folder = os.path.join(built.run_dir(run), "checkpoints")
        os.makedirs(folder)
        train_checkpoint(data_bin_, folder, updates=len(trained))
        return "fairseq-train ..."

    monkeypatch.setattr(launch, "train", train_stub)
    sweeps = ["lr=0.001,0.002", "dropout=0,0.1", "max-tokens=120"]
    argv = ["--out", str(tmp_path), "--data-bin", data_bin, "--steps", "1", "--train-batches", "2"]
    argv += ["--batch-tokens", "120"]
    argv += [flag for sweep in sweeps for flag in ("--sweep", sweep)] + ["--rescaled-copies", "4"]
    assert correlation.main(argv) == 1
    report = json.loads((tmp_path / "correlation.json").read_text(encoding="utf-8"))
    assert len(trained) == 4 and [f["run"] for f in report["failed_runs"]] == [trained[3]]
    assert "fairseq-train exited 1" in report["failed_runs"][0]["error"]
    assert not any(
        os.path.exists(os.path.join(tmp_path, "runs", r, "results.json")) for r in trained
    )
    assert report["axes"] == ["lr", "dropout", "max-tokens", "scale"]
    assert report["models"] == 6 and report["adaptive_sharpness"]["models"] == 6
    psi = report["sharpness"]["psi"]["per_axis"]
    assert psi["max-tokens"] == {"psi": None, "cells": 6, "models": 0, "undefined_cells": 6}
    assert psi["scale"]["undefined_cells"] == psi["scale"]["cells"] == 3
    rows = (tmp_path / "correlation.csv").read_text(encoding="utf-8").splitlines()
    assert len(rows) == 7 and rows[0].startswith("run,optimizer,lr,dropout,max-tokens,scale,")
