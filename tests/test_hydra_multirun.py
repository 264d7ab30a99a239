"""The hydra route: configs/hydra/iwslt14_de_en/table4.yaml with `fairseq-hydra-train --multirun`
over the `row` group (optimizer) x seed (x ρ), through hydra-submitit-launcher.

The fast test composes table4.yaml for each row and compares it with the row's own YAML (itself
checked against the argument files in test_recipe.py), and hydra's run subdir with the run
folder names of fairseq-asam-table4 (so a re-run multirun, or a requeued job, finds its folder).
The slow one runs a real 2-job multirun with `hydra/launcher=submitit_local` on a tiny model,
then the documented single run (`--config-name asam`) on asam's job folder with a higher
--max-update: it continues from the job's checkpoint_last.pt.
"""

import json

import pytest
from harness import compose_hydra, hydra_train

from fairseq_asam_experiments import report


def compose(config_name, overrides=(), hydra_config=False):
    overrides = ["checkpoint.save_dir=/save", *overrides]
    return compose_hydra(config_name, overrides, hydra_config=hydra_config)


@pytest.mark.parametrize(
    "row, folder",
    [("adam", "adam-seed2"), ("sam", "sam-rho0.1-seed2"), ("asam", "asam-rho0.2-eta0.01-seed2")],
)
def test_table4_yaml_with_a_row_is_that_rows_yaml(row, folder):
    table4, subdir = compose("table4", [f"row={row}", "common.seed=2"], hydra_config=True)
    own = compose(row, ["common.seed=2"])
    assert table4 == own  # every setting, the optimizer's and the recipe's
    assert subdir == folder  # the run folder names of fairseq-asam-table4 (grid.Run.name)


# The multirun's protocol (no --eval-bleu on the tiny model), also for the single run resuming it.
RESUMED = [
    "task.eval_bleu=false",
    "checkpoint.best_checkpoint_metric=loss",
    "checkpoint.maximize_best_checkpoint_metric=false",
]


def multirun(sweep_dir, data_bin, max_update, cwd):
    overrides = [
        "row=adam,asam",
        f"hydra.sweep.dir={sweep_dir}",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=10",
        f"optimization.max_update={max_update}",
        *RESUMED,
    ]
    return hydra_train("table4", data_bin, overrides, cwd=cwd, timeout=600, multirun=True)


@pytest.mark.slow
def test_a_two_job_multirun_through_submitit_local_then_a_single_run_resumes_a_job(
    data_bin, tmp_path
):
    sweep_dir = tmp_path / "table4" / "runs"
    done = multirun(sweep_dir, data_bin, 3, tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    jobs = {"adam-seed1": "adam", "asam-rho0.2-eta0.01-seed1": "asam"}
    assert {p.name for p in sweep_dir.iterdir() if not p.name.startswith(".")} >= set(jobs)
    submitit_logs = list((sweep_dir / ".submitit").glob("*/*_0_log.out"))
    assert len(submitit_logs) == 2  # two submitit jobs, each with its own files
    for name, optimizer in jobs.items():
        job = sweep_dir / name
        assert (job / "checkpoints" / "checkpoint_last.pt").is_file()
        assert f"_name: {optimizer}" in (job / ".hydra" / "config.yaml").read_text()
        log = report.read_train_log(str(job / "train.log"))  # hydra's log lines
        inner = log[log.tag == "train_inner"]
        assert list(inner.num_updates) == [1, 2, 3]
        logged = "sharpness" in inner and inner.sharpness.notna().all()
        assert logged == (optimizer == "asam")

    # The documented single run (`--config-name asam`, not --multirun) on asam's job folder, with
    # a higher budget: it continues from the job's checkpoint_last.pt, as a requeued job does.
    # (A re-run multirun finds the same folder: its name is the composed subdir, checked above.)
    asam = sweep_dir / "asam-rho0.2-eta0.01-seed1"
    adam_log = (sweep_dir / "adam-seed1" / "train.log").read_text()
    overrides = [f"checkpoint.save_dir={asam / 'checkpoints'}", "optimization.max_update=5"]
    again = hydra_train("asam", data_bin, overrides + RESUMED, cwd=tmp_path, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "Loaded checkpoint" in again.stdout and "(epoch 1 @ 3 updates)" in again.stdout
    inner = [
        json.loads(line.split(" - ", 1)[1])
        for line in again.stdout.splitlines()
        if "][train_inner][" in line
    ]
    assert [record["num_updates"] for record in inner] == ["4", "5"]
    assert all("sharpness" in record for record in inner)  # ASAM's two-pass step ran
    assert (sweep_dir / "adam-seed1" / "train.log").read_text() == adam_log  # untouched
