"""The harness's shortcut: harness.parse_cfg composes a cfg from an earlier one by the overrides
that differ (compose_by_difference); every value must be the one fairseq's own conversion gives,
for the kinds of option the suite varies."""

from argparse import Namespace

import pytest
from harness import BASE_ARGS, compose_by_difference, training_cfg
from omegaconf import OmegaConf

import fairseq_asam

ASAM = ["--optimizer", "asam", "--rho", "0.5", "--eta", "0.01"]
# Each against the first of its group choices: values of every type (int given to a float, a
# list, a quoted tuple, None, a switch, an enum), and options of the plugin, of fairseq's groups.
VARIANTS = [
    ASAM + ["--rho", "1", "--sam-interval", "2", "--looksam-alpha", "0.5", "--update-freq", "3"],
    ASAM + ["--sharpness-eval-interval", "1", "--adam-betas", "(0.9, 0.999)", "--lr", "0.1"],
    ASAM + ["--fp16", "--fp16-no-flatten-grads", "--sam-start-update", "4", "--clip-norm", "0.5"],
    ASAM + ["--distributed-world-size", "2", "--ddp-backend", "legacy_ddp", "--use-bmuf"],
    ASAM + ["--amp", "--dropout", "0.3", "--encoder-layers", "2", "--warmup-updates", "7"],
    ["--optimizer", "adam", "--memory-efficient-fp16", "--max-tokens", "130", "--seed", "7"],
]


def plain(cfg) -> dict:
    """Every value of a cfg, a legacy Namespace (fairseq's `model`) as its dict."""
    tree = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    return {k: vars(v) if isinstance(v, Namespace) else v for k, v in tree.items()}


@pytest.mark.parametrize("extra", VARIANTS, ids=["looksam", "betas", "fp16", "bmuf", "amp", "adam"])
def test_a_cfg_composed_by_difference_is_fairseqs(data_bin, extra, monkeypatch):
    from hydra import experimental

    argv = [data_bin, "--user-dir", fairseq_asam.USER_DIR] + BASE_ARGS + ["--cpu"]
    first = training_cfg(argv + extra[:2], compose=compose_by_difference)  # group choices
    composed = []  # hydra's compose, counted: the shortcut must not fall back on it
    real_compose = experimental.compose
    monkeypatch.setattr(
        experimental, "compose", lambda *a, **k: composed.append(a) or real_compose(*a, **k)
    )
    fast = training_cfg(argv + extra, compose=compose_by_difference)
    assert composed == []
    monkeypatch.undo()
    real = training_cfg(argv + extra)
    assert plain(fast) == plain(real)
    assert plain(fast) != plain(first)  # a control: the variant changed values
