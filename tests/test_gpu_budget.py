"""The README's GPU budget is what experiments.gpu_budget computes from its stated assumptions."""

import os

import pytest

from fairseq_asam.experiments import gpu_budget

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_one_run_is_training_validation_and_evaluation_over_the_gpus_factor():
    a = gpu_budget.Assumptions()
    adam_v100 = (50_000 * 3_300 / 40_000 + 45 * 45 + 120) / 3600
    assert gpu_budget.run_hours("adam", "V100") == pytest.approx(adam_v100)
    assert gpu_budget.run_hours("adam", "A100") == pytest.approx(adam_v100 / 2.2)
    asam_h100 = (50_000 * 3_300 / 40_000 * 1.91 + 45 * 45 + 120) / 3600 / (2.2 * 1.5)
    assert gpu_budget.run_hours("asam", "H100") == pytest.approx(asam_h100)
    assert gpu_budget.ROW_COST["asam_late"] == pytest.approx(1.182)
    assert a.v100_tokens_per_second == 40_000  # myleott's 160k wps on 4 x V100


def test_a_node_runs_one_run_per_gpu_longest_first():
    assert gpu_budget.node_hours([2, 2, 1, 1, 1], 2) == 4
    assert gpu_budget.node_hours([1.0] * 9, 8) == 2.0  # the ninth run waits for a free GPU
    assert gpu_budget.node_hours([3.0], 8) == 3.0


def test_readme_shows_the_computed_tables():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert gpu_budget.markdown() in readme
    for source in ("facebookresearch/fairseq/issues/940", "lambdalabs.com", "ozmarx.com"):
        assert source in readme  # every figure's source is named
    saved = {row: round(share * 100) for row, share in gpu_budget.savings().items()}
    assert saved == {"asam_interval5": 35, "asam_looksam5": 28, "asam_late": 30}
    assert "`--sam-interval 5` 35%, LookSAM 28%, `asam_late` 30%" in readme
