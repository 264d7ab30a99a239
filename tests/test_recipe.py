"""The fairseq-train argument files of configs/ (recipe.py): how they merge, that they hold the
paper's settings as fairseq reads them, and that the hydra YAML says the same (one source of
truth: the YAML is checked against the argument files).  fairseq-hydra-train runs it in
tests/test_hydra_multirun.py: the multirun of table4.yaml (whose rows compose equal to the rows'
YAML), then `--config-name asam` itself."""

import json
import os

import pytest
from harness import HYDRA_DIR, compose_hydra, leaves
from omegaconf import OmegaConf

import fairseq_asam
from fairseq_asam_experiments import grid, recipe
from fairseq_asam_experiments.errors import SettingError

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


@pytest.mark.parametrize("optimizer", grid.OPTIMIZERS)
def test_argument_files_hold_the_papers_settings(optimizer):
    cfg = fairseq_train_cfg(recipe.training_options(grid.PRESETS["paper"].args_files, optimizer))
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
    assert grid.parse_rows(f"asam,{row}") == ("asam", row)
    cfg = fairseq_train_cfg(recipe.training_options(grid.PRESETS["paper"].args_files, row))
    assert (cfg.optimizer._name, cfg.optimizer.rho, cfg.optimizer.eta) == ("asam", 0.2, 0.01)
    assert {k: cfg.optimizer[k] for k in schedule} == schedule
    assert (
        cfg.optimization.max_update == 50000 and cfg.dataset.max_tokens == 4096
    )  # the same recipe


def test_tiny_preset_overrides_the_model_and_the_schedule():
    cfg = fairseq_train_cfg(recipe.training_options(grid.PRESETS["tiny"].args_files, "asam"))
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
        recipe.training_options(grid.PRESETS["tiny"].args_files, "adam", eval_bleu=True)
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
    config = grid.Grid(str(tmp_path), grid.PRESETS["paper"], checkpoint=protocol)
    cfg = fairseq_train_cfg(config.row_options("asam"))
    assert (cfg.task.eval_bleu, cfg.checkpoint.best_checkpoint_metric) == (eval_bleu, metric)
    assert cfg.checkpoint.maximize_best_checkpoint_metric == maximize
    if eval_bleu:  # as fairseq's IWSLT'14 example
        assert json.loads(cfg.task.eval_bleu_args) == {"beam": 5, "max_len_a": 1.2, "max_len_b": 10}
        assert (cfg.task.eval_bleu_detok, cfg.task.eval_bleu_remove_bpe) == ("moses", "@@ ")
    assert grid.PRESETS["paper"].checkpoint == "best-bleu"  # the default


# --------------------------------------------------------------------------------------------
# The hydra YAML says the same as the argument files
# --------------------------------------------------------------------------------------------


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


@pytest.mark.parametrize("optimizer", grid.OPTIMIZERS)
def test_hydra_yaml_and_argument_files_describe_the_same_settings(optimizer):
    # The YAML trains with the default protocol, best-bleu.
    options = recipe.training_options(
        grid.PRESETS["paper"].args_files, optimizer, selection_metric="bleu"
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
