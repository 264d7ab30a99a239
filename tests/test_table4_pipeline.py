"""Table 4's pipeline: the configs, bad input, and the tiny preset end to end (prepare, train,
evaluate, report, skip and resume) through fairseq-asam-table4 (scripts/reproduce_table4.py)."""

import json
import math
import os
import subprocess
import sys
import threading
import time

import pytest
import torch
from harness import HYDRA_DIR, independent_scores, leaves, one_step_reference
from omegaconf import OmegaConf

import fairseq_asam
from fairseq_asam_experiments import (
    evaluation,
    prepare,
    recipe,
    report,
    runner,
    sharpness,
    synthetic_data,
)
from fairseq_asam_experiments.cli import table4_main
from fairseq_asam_experiments.errors import ExperimentError, SettingError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Set by the launcher (or on the fairseq-hydra-train command line), not by the configs.
RUN_SETTINGS = {"task.data", "common.user_dir", "checkpoint.save_dir", "common.seed"}
# fairseq-train flags that pick a registered class: the `_name` of their config group.
REGISTRY_FLAGS = {
    "task": "task._name",
    "arch": "model._name",
    "optimizer": "optimizer._name",
    "criterion": "criterion._name",
    "lr_scheduler": "lr_scheduler._name",
}
PAPER_OPTIMIZER_SETTINGS = {"adam": {}, "sam": {"rho": 0.1}, "asam": {"rho": 0.2, "eta": 0.01}}
END_TO_END_UPDATES = 12
RESUMED_UPDATES = 16


# --------------------------------------------------------------------------------------------
# Argument files
# --------------------------------------------------------------------------------------------


def test_argument_files_merge_later_options_in_place(tmp_path):
    base, override = tmp_path / "base.args", tmp_path / "override.args"
    base.write_text(
        "# comment\n--arch transformer_iwslt_de_en\n\n--share-all-embeddings\n"
        "--adam-betas (0.9, 0.98)\n"
    )
    override.write_text(
        "--arch transformer   # not a comment: values run to the end of the line\n--lr 1e-3\n"
    )
    merged = recipe.merge_options(
        recipe.read_args_file(str(base)), recipe.read_args_file(str(override))
    )
    assert merged == [
        "--arch",
        "transformer   # not a comment: values run to the end of the line",
        "--share-all-embeddings",
        "--adam-betas",
        "(0.9, 0.98)",
        "--lr",
        "1e-3",
    ]


def test_argument_file_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.args"
    bad.write_text("--lr 1\nlr 2\n")
    with pytest.raises(SettingError, match=r"bad.args:2: expected '--flag \[value\]'"):
        recipe.read_args_file(str(bad))
    with pytest.raises(SettingError, match="argument file not found: .*missing.args"):
        recipe.read_args_file(str(tmp_path / "missing.args"))


def fairseq_train_cfg(options):
    from fairseq import options as fairseq_options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    argv = ["/data-bin", "--user-dir", fairseq_asam.USER_DIR] + recipe.merge_options(options)
    args = fairseq_options.parse_args_and_arch(fairseq_options.get_training_parser(), argv)
    return convert_namespace_to_omegaconf(args)


@pytest.mark.parametrize("optimizer", runner.OPTIMIZERS)
def test_argument_files_hold_the_papers_settings(optimizer):
    cfg = fairseq_train_cfg(
        recipe.training_options(runner.TABLE4_PRESETS["paper"].args_files, optimizer)
    )
    assert cfg.optimizer._name == optimizer
    for name, value in PAPER_OPTIMIZER_SETTINGS[optimizer].items():
        assert cfg.optimizer[name] == value
    assert cfg.optimizer.adam_betas == "(0.9, 0.98)" and cfg.optimizer.weight_decay == 0.0001
    assert list(cfg.optimization.lr) == [5e-4] and cfg.optimization.clip_norm == 0.0
    assert (cfg.lr_scheduler._name, cfg.lr_scheduler.warmup_updates) == ("inverse_sqrt", 4000)
    assert (cfg.criterion._name, cfg.criterion.label_smoothing) == (
        "label_smoothed_cross_entropy",
        0.1,
    )
    assert cfg.dataset.max_tokens == 4096 and cfg.optimization.max_update == 50000
    model = cfg.model
    assert (model.arch, model.dropout, model.share_decoder_input_output_embed) == (
        "transformer_iwslt_de_en",
        0.3,
        True,
    )
    assert (model.encoder_layers, model.encoder_embed_dim, model.encoder_ffn_embed_dim) == (
        6,
        512,
        1024,
    )
    assert cfg.common.log_format == "json"


@pytest.mark.parametrize(
    "row,schedule",
    [
        ("asam_interval5", {"sam_interval": 5, "looksam_alpha": 0.0, "sam_start_update": 0}),
        ("asam_looksam5", {"sam_interval": 5, "looksam_alpha": 0.7, "sam_start_update": 0}),
        ("asam_late", {"sam_interval": 1, "looksam_alpha": 0.0, "sam_start_update": 40000}),
    ],
)
def test_schedule_rows_are_asam_with_a_cheaper_schedule(row, schedule):
    assert runner.parse_optimizers(f"asam,{row}") == ("asam", row)
    cfg = fairseq_train_cfg(recipe.training_options(runner.TABLE4_PRESETS["paper"].args_files, row))
    assert (cfg.optimizer._name, cfg.optimizer.rho, cfg.optimizer.eta) == ("asam", 0.2, 0.01)
    assert {k: cfg.optimizer[k] for k in schedule} == schedule
    assert (
        cfg.optimization.max_update == 50000 and cfg.dataset.max_tokens == 4096
    )  # the same recipe


def test_tiny_preset_overrides_the_model_and_the_schedule():
    cfg = fairseq_train_cfg(
        recipe.training_options(runner.TABLE4_PRESETS["tiny"].args_files, "asam")
    )
    assert (cfg.model.arch, cfg.model.encoder_layers, cfg.model.decoder_embed_dim) == (
        "transformer",
        1,
        32,
    )
    assert cfg.optimization.max_update == 200 and cfg.dataset.max_tokens == 1024
    assert (cfg.optimizer._name, cfg.optimizer.rho, cfg.optimizer.eta) == ("asam", 0.2, 0.01)
    assert (
        cfg.optimizer.adam_betas == "(0.9, 0.98)" and cfg.criterion.label_smoothing == 0.1
    )  # the recipe's


def test_eval_bleu_argument_file_turns_on_validation_bleu():
    cfg = fairseq_train_cfg(
        recipe.training_options(runner.TABLE4_PRESETS["tiny"].args_files, "adam", eval_bleu=True)
    )
    assert (
        cfg.task.eval_bleu
        and cfg.task.eval_bleu_detok == "moses"
        and cfg.task.eval_bleu_remove_bpe == "@@ "
    )
    assert json.loads(cfg.task.eval_bleu_args) == {"beam": 5, "max_len_a": 1.2, "max_len_b": 10}
    assert cfg.checkpoint.best_checkpoint_metric == "loss"  # the checkpoint choice does not change


@pytest.mark.parametrize(
    "protocol, eval_bleu, metric, maximize",
    [
        ("best-bleu", True, "bleu", True),
        ("best-loss", False, "loss", False),
        ("last", False, "loss", False),
        ("average:5", False, "loss", False),
    ],
)
def test_the_protocol_sets_how_fairseq_selects_checkpoint_best(
    tmp_path, protocol, eval_bleu, metric, maximize
):
    config = runner.GridConfig(str(tmp_path), runner.TABLE4_PRESETS["paper"], checkpoint=protocol)
    cfg = fairseq_train_cfg(config.training_options("asam"))
    assert (cfg.task.eval_bleu, cfg.checkpoint.best_checkpoint_metric) == (eval_bleu, metric)
    assert cfg.checkpoint.maximize_best_checkpoint_metric == maximize
    if eval_bleu:  # as fairseq's IWSLT'14 example
        assert json.loads(cfg.task.eval_bleu_args) == {"beam": 5, "max_len_a": 1.2, "max_len_b": 10}
        assert (cfg.task.eval_bleu_detok, cfg.task.eval_bleu_remove_bpe) == ("moses", "@@ ")
    assert runner.TABLE4_PRESETS["paper"].checkpoint == "best-bleu"  # the default


# --------------------------------------------------------------------------------------------
# The hydra YAML says the same as the argument files
# --------------------------------------------------------------------------------------------


def compose_hydra(config_name: str):
    from fairseq.dataclass.initialize import hydra_init
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    hydra_init(config_name)  # as fairseq-hydra-train: fairseq's schema under the config's name
    # version_base 1.1, as fairseq's own hydra calls expect.
    with initialize_config_dir(config_dir=HYDRA_DIR, version_base="1.1"):
        cfg = compose(
            config_name=config_name,
            overrides=["task.data=/data-bin", f"common.user_dir={fairseq_asam.USER_DIR}"],
        )
    GlobalHydra.instance().clear()
    return dict(leaves(OmegaConf.to_container(cfg, resolve=True)))


def written_yaml_settings(config_name: str):
    """The leaves written in recipe.yaml and <config_name>.yaml, but hydra's own and the run's."""
    written = {}
    for name in ("recipe", config_name):
        raw = OmegaConf.to_container(OmegaConf.load(os.path.join(HYDRA_DIR, f"{name}.yaml")))
        written.update(
            (k, v)
            for k, v in leaves(raw)
            if not k.startswith(("hydra.", "defaults")) and k not in RUN_SETTINGS
        )
    return written


def normalized(value):
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("optimizer", runner.OPTIMIZERS)
def test_hydra_yaml_and_argument_files_describe_the_same_settings(optimizer):
    # The YAML trains with the default protocol, best-bleu.
    options = recipe.training_options(
        runner.TABLE4_PRESETS["paper"].args_files, optimizer, selection_metric="bleu"
    )
    from_args = dict(leaves(OmegaConf.to_container(fairseq_train_cfg(options), resolve=True)))
    from_yaml = compose_hydra(optimizer)
    written = written_yaml_settings(optimizer)

    # The same options are written down...
    flags = {flag[2:].replace("-", "_") for flag, _ in options}
    assert {REGISTRY_FLAGS.get(f, f) for f in flags} == {
        k if k.endswith("._name") else k.split(".")[-1] for k in written
    }
    # ...with the same values as fairseq reads them...
    for key, value in written.items():
        assert normalized(from_args[key]) == normalized(value), key
    # ...and every other setting is the same fairseq default either way.
    for key, value in from_yaml.items():
        if key in RUN_SETTINGS or (value is None and key not in from_args):
            continue
        assert normalized(from_args[key]) == normalized(value), key


@pytest.mark.slow
def test_hydra_train_runs_the_yaml(data_bin, tmp_path):
    """fairseq-hydra-train composes asam.yaml and trains (one update of a smaller model)."""
    tiny_model = [
        f"+model.{k}={v}"
        for k, v in (
            ("encoder_layers", 1),
            ("decoder_layers", 1),
            ("encoder_embed_dim", 16),
            ("decoder_embed_dim", 16),
            ("encoder_ffn_embed_dim", 32),
            ("decoder_ffn_embed_dim", 32),
        )
    ]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fairseq_cli.hydra_train",
            "--config-dir",
            HYDRA_DIR,
            "--config-name",
            "asam",
            f"task.data={data_bin}",
            f"common.user_dir={fairseq_asam.USER_DIR}",
            f"checkpoint.save_dir={tmp_path}",
            "optimization.max_update=1",
            "dataset.max_tokens=200",
            "common.log_interval=1",
            "common.cpu=true",
            "dataset.num_workers=0",
            *tiny_model,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    inner = [
        json.loads(line.split(" - ", 1)[1])
        for line in proc.stdout.splitlines()
        if "][train_inner][" in line
    ]
    assert inner and "sharpness" in inner[0]  # ASAM's two-pass step ran
    assert (tmp_path / "checkpoint_last.pt").is_file()


# --------------------------------------------------------------------------------------------
# Bad input: one line, exit status 1, nothing done
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--optimizers", "adam,adamw"],
            "--optimizers: unknown 'adamw'; choose from adam,sam,asam",
        ),
        (["--optimizers", ""], "--optimizers: empty list; choose from adam,sam,asam"),
        (["--optimizers", "asam,asam"], "--optimizers: 'asam,asam' names an optimizer twice"),
        (
            ["--seeds", "1,two"],
            "--seeds must be a comma-separated list of integers >= 1, got '1,two'",
        ),
        (["--seeds", "0"], "--seeds must be a comma-separated list of integers >= 1"),
        (["--seeds", "2,2"], "--seeds: '2,2' names a seed twice"),
        (["--archive", "{tmp}/missing.tgz"], "--archive: file not found: {tmp}/missing.tgz"),
        (["--data-bin", "{tmp}/missing"], "--data-bin: folder not found: {tmp}/missing"),
        (["--max-update", "0"], "--max-update must be >= 1, got 0"),
        (
            ["--checkpoint", "newest"],
            "--checkpoint must be best-loss, best-bleu, last or average:N",
        ),
        (["--checkpoint", "best"], "--checkpoint best names no protocol: use best-loss"),
        (["--amp"], "--amp needs a GPU, and none is visible"),
        (["--fp16"], "--fp16 keeps the weights in fp16, which rounds away part of SAM/ASAM's"),
        (["--preset", "paper"], "--archive is required for --preset paper"),
    ],
)
def test_bad_input_fails_with_one_line_before_any_work(
    tmp_path, capsys, monkeypatch, argv, message
):
    monkeypatch.setattr(runner, "visible_gpus", lambda: [])
    out = tmp_path / "out"
    argv = [a.format(tmp=tmp_path) for a in argv]
    preset = [] if "--preset" in argv else ["--preset", "tiny"]
    assert table4_main(preset + argv + ["--out", str(out)]) == 1
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and stderr.startswith("fairseq-asam-table4: error: ")
    assert message.format(tmp=tmp_path) in stderr
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# Scheduling: one run per GPU at a time
# --------------------------------------------------------------------------------------------


def test_runs_spread_over_the_gpus_one_at_a_time_and_failures_are_reported(tmp_path, monkeypatch):
    busy, started, lock = set(), [], threading.Lock()

    def fake_execute_run(config, run, data_bin, references, gpu, supervisor, progress):
        with lock:
            assert gpu not in busy, f"{gpu} runs two runs at once"
            busy.add(gpu)
            started.append((run.name, gpu))
        time.sleep(0.05)
        with lock:
            busy.discard(gpu)
        if run.name == "sam-seed2":
            raise ExperimentError("fairseq-train failed with exit code 1; see sam-seed2/train.log")
        return "results.json"

    monkeypatch.setattr(runner, "prepare_data", lambda config: str(tmp_path / "data-bin"))
    monkeypatch.setattr(runner, "execute_run", fake_execute_run)
    monkeypatch.setattr(report, "write_report", lambda *args: {})
    config = runner.GridConfig(
        str(tmp_path),
        runner.TABLE4_PRESETS["paper"],
        seeds=(1, 2, 3),
        gpus=["4", "7"],
        data_bin=str(tmp_path / "data-bin"),
    )
    monkeypatch.setattr(runner.evaluation, "check_data_bin", lambda path: None)
    with pytest.raises(
        ExperimentError, match=r"1 run\(s\) failed: sam-seed2: plan: fairseq-train failed"
    ):
        runner.run_grid(config)
    assert sorted(name for name, _ in started) == sorted(
        r.name for r in config.runs
    )  # each run once
    assert {gpu for _, gpu in started} == {"4", "7"}


# --------------------------------------------------------------------------------------------
# The tiny preset end to end
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_out(tmp_path_factory):
    """The tiny preset for Adam and ASAM, END_TO_END_UPDATES updates each, from a built archive,
    with the default protocol named: --checkpoint best-bleu."""
    root = tmp_path_factory.mktemp("table4")
    archive = synthetic_data.build_sample_archive(str(root / "de-en.tgz"), n_train=300, n_dev=4)
    out = root / "out"
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "scripts", "reproduce_table4.py"),
            "--preset",
            "tiny",
            "--checkpoint",
            "best-bleu",
            "--archive",
            archive,
            "--out",
            str(out),
            "--optimizers",
            "adam,asam",
            "--max-update",
            str(END_TO_END_UPDATES),
            "--sharpness-rho",
            "0.05",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert (out / "report" / "table4.md").read_text().strip() in proc.stdout  # printed
    return out


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.slow
def test_tiny_preset_writes_every_run_file_and_the_report(tiny_out):
    data_bin = tiny_out / "data" / "data-bin" / prepare.PREP_NAME

    def raw_references(split):
        path = tiny_out / "data" / prepare.PREP_NAME / "tmp" / f"{split}.raw.en"
        return path.read_text(encoding="utf-8").splitlines()

    assert (data_bin / "dict.en.txt").is_file()
    grid = read_json(tiny_out / "grid.json")
    assert (grid["preset"], grid["protocol"], grid["optimizers"]) == (
        "tiny",
        "best-bleu",
        ["adam", "asam"],
    )
    logged_bleu = {}  # of the evaluated checkpoint, as fairseq-train logged it
    for name in ("adam-seed1", "asam-seed1"):
        run = tiny_out / "runs" / name
        for file in (
            "command.txt",
            "training.json",
            "train.log",
            "generate-valid.txt",
            "generate-test.txt",
            "checkpoints/checkpoint_best.pt",
            "checkpoints/checkpoint_last.pt",
        ):
            assert (run / file).is_file(), run / file
        assert not (run / "failure.json").exists()
        command = (run / "command.txt").read_text()
        if "OMP_NUM_THREADS" not in os.environ:
            assert command.startswith("OMP_NUM_THREADS=1 ")  # the tiny preset on a CPU
        assert f"--optimizer {name.split('-')[0]} " in command and "--seed 1 " in command
        assert (
            f"--save-dir {run / 'checkpoints'}" in command
            and f"--max-update {END_TO_END_UPDATES}" in command
        )
        # best-bleu: fairseq's in-training BLEU, and checkpoint_best.pt selected by it.
        assert "--eval-bleu --eval-bleu-args " in command and "--eval-bleu-detok moses" in command
        assert "--best-checkpoint-metric bleu --maximize-best-checkpoint-metric" in command
        training = read_json(run / "training.json")
        assert training["status"] == "finished" and training["command"] == command.strip()
        assert training["settings"]["--best-checkpoint-metric"] == "bleu"
        results = read_json(run / "results.json")
        assert results["train_command"] == command.strip()
        assert results["protocol"] == "best-bleu" and results["checkpoint"]["selected_by"] == "bleu"
        best = str(run / "checkpoints" / "checkpoint_best.pt")
        assert evaluation.checkpoint_selection_metric(best) == ("bleu", True)
        log = report.read_train_log(str(run / "train.log"))
        logged = log[log.tag == "valid"].to_dict("records")
        top = max(record["valid_bleu"] for record in logged)
        # fairseq's is_better is >=: of epochs with the top BLEU, the last one is kept.
        chosen = [record for record in logged if record["valid_bleu"] == top][-1]
        state = torch.load(best, map_location="cpu", weights_only=False)
        assert float(state["extra_state"]["best"]) == pytest.approx(top, abs=0.01)
        assert state["optimizer_history"][-1]["num_updates"] == chosen["valid_num_updates"]
        assert results["checkpoint"]["num_updates"] == chosen["valid_num_updates"]
        logged_bleu[name] = chosen["valid_bleu"]
        for split in ("valid", "test"):
            scores = results[split]
            bleu, sacre, sentences = independent_scores(
                run / f"generate-{split}.txt", raw_references(split)
            )
            assert scores["bleu"] == pytest.approx(bleu, abs=1e-4)
            assert scores["sacrebleu"] == pytest.approx(sacre, abs=1e-4)
            assert scores["sentences"] == sentences == len(raw_references(split))
            assert (
                scores["fairseq_generate_bleu"] == scores["bleu_details"]
            )  # checked against fairseq-generate
            assert scores["sacrebleu_signature"].startswith("nrefs:1|case:lc|eff:no|tok:13a")
            assert scores["sacrebleu_references"].endswith(f"tmp/{split}.raw.en")
            assert "--beam 5" in scores["command"] and "--remove-bpe" in scores["command"]
        (estimate,) = results["sharpness"]["estimates"]  # --sharpness-rho: adaptive only
        assert estimate["rho"] == 0.05 and estimate["measure"] == "adaptive"
        assert results["sharpness"]["checkpoint"] == results["checkpoint"]["path"]
        assert results["sharpness_settings"]["rho"] == 0.05
        # L(w) of the best checkpoint on the whole valid split is what fairseq-train logged for
        # it (base 2, 3 decimals); the ascent finds at least the one-step ASAM perturbation's rise.
        assert estimate["loss"] / math.log(2) == pytest.approx(chosen["valid_loss"], abs=6e-4)
        loss, perturbed = one_step_reference(
            *sharpness.load_subset(
                results["checkpoint"]["path"], str(data_bin), "valid", 20, torch.device("cpu")
            ),
            rho=0.05,
            eta=0.01,
            adaptive=True,
        )
        # Losses reduced in fp32, here and in the run's own process (other threads, other
        # code): ~1e-6 relative each, so the rises may differ by that much of both losses.
        assert estimate["loss"] == pytest.approx(loss, rel=1e-6)
        rounding = 1e-6 * (abs(loss) + abs(perturbed))
        assert perturbed - loss > rounding and estimate["sharpness"] >= perturbed - loss - rounding
        # an fp32 norm: ~1e-7 relative rounding per operation, so the bound allows 1e-6
        assert estimate["scaled_epsilon_norm"] <= 0.05 * (1 + 1e-6)
    asam_log = report.read_train_log(str(tiny_out / "runs" / "asam-seed1" / "train.log"))
    assert (asam_log.tag == "valid").any()
    assert asam_log[asam_log.tag == "train_inner"].sharpness.notna().all()

    table = (tiny_out / "report" / "table4.md").read_text()
    assert table.startswith(
        "# Table 4: IWSLT'14 De→En, Transformer — --checkpoint best-bleu (--preset tiny)"
    )
    assert "| Adam | 1 | best-bleu |" in table and "| Adam+ASAM | 1 | best-bleu |" in table
    assert "Adam+SAM" not in table and "Adaptive sharpness" in table
    # The tiny preset is not the paper's: no paper numbers beside it, and a line says why.
    assert "35.66" not in table and "Paper valid" not in table
    assert "not beside `--preset tiny`: not comparable" in table

    def cells(first):
        line = next(x for x in table.splitlines() if x.startswith(f"| {first} |"))
        return [c.strip() for c in line.split("|")]

    for name, bleu in logged_bleu.items():
        assert cells(name)[cells("Run").index("Valid BLEU (in-training)")] == f"{bleu:.2f}"
    adam_best = read_json(tiny_out / "runs" / "adam-seed1" / "results.json")["checkpoint"]
    assert f"| adam-seed1 | done | {adam_best['num_updates']} |" in table
    csv_lines = (tiny_out / "report" / "table4.csv").read_text().splitlines()
    assert csv_lines[0].startswith("row,label,preset,protocol,max_update,valid_bleu_mean,")
    assert [line.split(",")[:4] for line in csv_lines[1:]] == [
        ["adam", "Adam", "tiny", "best-bleu"],
        ["asam", "Adam+ASAM", "tiny", "best-bleu"],
    ]
    for plot in ("valid_loss.png", "valid_bleu.png", "sharpness.png"):
        assert (tiny_out / "report" / plot).read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_best_loss_and_best_bleu_side_by_side(tiny_out, tmp_path):
    """Adam trained again with --checkpoint best-loss on the same data: the same training
    (in-training BLEU changes no update), another checkpoint_best.pt, one report of both."""
    by_loss = tmp_path / "best-loss"
    data_bin = tiny_out / "data" / "data-bin" / prepare.PREP_NAME
    argv = ["--preset", "tiny", "--checkpoint", "best-loss", "--data-bin", str(data_bin)]
    argv += ["--out", str(by_loss), "--optimizers", "adam"]
    assert table4_main(argv + ["--max-update", str(END_TO_END_UPDATES)]) == 0
    run = by_loss / "runs" / "adam-seed1"
    assert "--eval-bleu" not in (run / "command.txt").read_text()
    best = str(run / "checkpoints" / "checkpoint_best.pt")
    assert evaluation.checkpoint_selection_metric(best) == ("loss", False)
    by_bleu = report.read_train_log(str(tiny_out / "runs" / "adam-seed1" / "train.log"))
    by_loss_log = report.read_train_log(str(run / "train.log"))
    for tag, value in (("train_inner", "loss"), ("valid", "valid_loss")):
        assert list(by_loss_log[by_loss_log.tag == tag][value]) == list(
            by_bleu[by_bleu.tag == tag][value]
        )
    both = tmp_path / "both"
    assert report.main([str(by_loss), str(tiny_out), "--out", str(both)]) == 0
    text = (both / "table4.md").read_text()
    assert text.startswith(
        "# Table 4: IWSLT'14 De→En, Transformer — --checkpoint best-loss, best-bleu"
    )
    loss_row = next(
        line for line in text.splitlines() if line.startswith("| Adam | 1 | best-loss |")
    )
    bleu_row = next(
        line for line in text.splitlines() if line.startswith("| Adam | 1 | best-bleu |")
    )
    loss_results = read_json(run / "results.json")
    bleu_results = read_json(tiny_out / "runs" / "adam-seed1" / "results.json")
    assert f"| {loss_results['test']['bleu']:.2f} |" in loss_row
    assert f"| {bleu_results['test']['bleu']:.2f} |" in bleu_row


@pytest.mark.slow
def test_second_invocation_skips_finished_runs_and_continues_to_a_higher_budget(tiny_out, capsys):
    adam, asam = tiny_out / "runs" / "adam-seed1", tiny_out / "runs" / "asam-seed1"
    asam_results = (asam / "results.json").read_bytes()
    asam_mtime = os.stat(asam / "results.json").st_mtime_ns
    argv = ["--preset", "tiny", "--out", str(tiny_out)]

    # Everything finished: nothing trains, nothing is evaluated again.
    assert table4_main(argv + ["--optimizers", "adam,asam", "--max-update", "12"]) == 0
    out = capsys.readouterr().out
    assert "adam-seed1: skipped, done (results.json is current)" in out
    assert os.stat(asam / "results.json").st_mtime_ns == asam_mtime

    # A higher budget for Adam: it continues from its 12-update checkpoint, and is evaluated
    # on the new checkpoint.
    generated_before = (adam / "generate-test.txt").read_bytes()
    assert table4_main(argv + ["--optimizers", "adam", "--max-update", str(RESUMED_UPDATES)]) == 0
    out = capsys.readouterr().out
    assert f"adam-seed1: --max-update {END_TO_END_UPDATES} → {RESUMED_UPDATES}: continuing" in out
    log = (adam / "train.log").read_text()
    assert f"@ {END_TO_END_UPDATES} updates" in log.split("Loaded checkpoint")[-1].splitlines()[0]
    log = report.read_train_log(str(adam / "train.log"))
    assert log[log.tag == "valid"].valid_num_updates.iloc[-1] == RESUMED_UPDATES
    results = read_json(adam / "results.json")
    bleu, _, _ = independent_scores(adam / "generate-test.txt", None)
    assert results["test"]["bleu"] == pytest.approx(bleu, abs=1e-4)
    assert results["training"]["settings"]["--max-update"] == str(RESUMED_UPDATES)
    assert (adam / "generate-test.txt").read_bytes() != generated_before  # evaluated again
    assert (asam / "results.json").read_bytes() == asam_results
    # The report: Adam at its new budget, ASAM's 12-update result a row at its own budget.
    table = (tiny_out / "report" / "table4.md").read_text()
    assert f"| Adam | 1 | best-bleu | tiny | {RESUMED_UPDATES} |" in table
    assert "| Adam+ASAM | 1 | best-bleu | tiny | 12 |" in table

    # Back to fewer updates: refused in one line, before anything runs.
    assert table4_main(argv + ["--optimizers", "adam", "--max-update", "12"]) == 1
    assert "adam-seed1 trained with other settings: --max-update 16 → 12" in capsys.readouterr().err
