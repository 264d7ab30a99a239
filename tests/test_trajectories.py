"""SGD, SAM and ASAM paths on L = ½(1 − w₁w₂)² (experiments/trajectories.py) and their picture."""

import logging
import math
import os

import numpy as np
import pytest
import torch

from fairseq_asam import perturbation
from fairseq_asam_experiments import trajectories
from fairseq_asam_experiments.trajectories import main as trajectories_main

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PICTURE = os.path.join(REPO_ROOT, "docs", "trajectories.png")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MAX_PICTURE_BYTES = 200_000
POINTS = [(0.2, 0.05), (1.5, 0.3), (0.7, 2.0), (-0.4, 1.1)]


def test_loss_depends_only_on_the_product():
    w = np.array(POINTS)
    for scale in (0.1, 3.0):
        np.testing.assert_allclose(
            trajectories.loss(w * [scale, 1 / scale]), trajectories.loss(w), rtol=1e-12
        )


def test_gradient_matches_finite_differences():
    step = 1e-6
    for w in map(np.array, POINTS):
        numeric = [
            (trajectories.loss(w + step * e) - trajectories.loss(w - step * e)) / (2 * step)
            for e in np.eye(2)
        ]
        np.testing.assert_allclose(trajectories.gradient(w), numeric, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("method", ["sam", "asam"])
def test_perturbation_equals_the_optimizers(method):
    """ε of the 2-D picture is perturbation.perturb's (in fp32) for a tensor named `weight`."""
    rho, eta = 0.3, 0.01
    for w in POINTS:
        param = torch.tensor(w, dtype=torch.float32)
        grad = torch.tensor(trajectories.gradient(w), dtype=torch.float32)
        saved = perturbation.perturb(
            [param], [grad], [perturbation.is_adaptive("weight", method == "asam")], rho, eta
        )
        epsilon = (param.double() - saved[0].double()).numpy()
        np.testing.assert_allclose(
            trajectories.perturbation(method, w, rho, eta), epsilon, rtol=1e-5, atol=1e-7
        )


def test_asam_step_equals_the_closed_form():
    """η = 0, w₁w₂ > 0: ε = −sign(1 − w₁w₂) ρ w / √2 and the step is parallel to SGD's."""
    rho, lr = 0.2, 0.05
    for w in map(np.array, [(0.2, 0.05), (1.5, 0.3), (0.7, 2.0), (-1.2, -0.4)]):
        sign = math.copysign(1.0, 1.0 - w[0] * w[1])
        epsilon = -sign * rho * w / math.sqrt(2)
        np.testing.assert_allclose(
            trajectories.perturbation("asam", w, rho, 0.0), epsilon, rtol=1e-12
        )
        shrink = 1 - sign * rho / math.sqrt(2)
        expected = w + lr * (1 - shrink**2 * w[0] * w[1]) * shrink * w[::-1]
        np.testing.assert_allclose(
            trajectories.update("asam", w, lr, rho, 0.0), expected, rtol=1e-12
        )
        sgd_step = trajectories.update("sgd", w, lr, rho, 0.0) - w
        asam_step = expected - w
        assert abs(sgd_step[0] * asam_step[1] - sgd_step[1] * asam_step[0]) < 1e-15


def test_asam_perturbation_is_scale_equivariant_and_sams_is_not():
    """w ↦ (a w₁, w₂ / a): ASAM's ε (η = 0) follows, ε ↦ (a ε₁, ε₂ / a); SAM's does not."""
    w, scale, rho = np.array([0.6, 0.9]), np.array([4.0, 0.25]), 0.1
    np.testing.assert_allclose(
        trajectories.perturbation("asam", w * scale, rho, 0.0),
        trajectories.perturbation("asam", w, rho, 0.0) * scale,
    )
    sam = trajectories.perturbation("sam", w * scale, rho, 0.0)
    assert not np.allclose(sam, trajectories.perturbation("sam", w, rho, 0.0) * scale, rtol=0.1)


def test_zero_gradient_gives_zero_perturbation():
    for method in trajectories.METHODS:
        np.testing.assert_array_equal(
            trajectories.perturbation(method, [0.0, 0.0], 0.5, 0.01), [0.0, 0.0]
        )
    with pytest.raises(KeyError, match="adam"):
        trajectories.perturbation("adam", [1.0, 1.0], 0.5, 0.01)


def test_paths_are_recorded_and_show_the_picture():
    settings = trajectories.Settings()
    rho = {"sgd": 0.0, "sam": settings.sam_rho, "asam": settings.asam_rho}
    paths = trajectories.trajectories(trajectories.DEFAULT_STARTS, settings)
    for method, path in paths.items():
        assert path.shape == (len(trajectories.DEFAULT_STARTS), settings.steps + 1, 2)
        np.testing.assert_array_equal(path[:, 0], trajectories.DEFAULT_STARTS)
        np.testing.assert_array_equal(
            path[0, 1],
            trajectories.update(method, path[0, 0], settings.lr, rho[method], settings.eta),
        )
    final_loss = {m: trajectories.loss(p[:, -1]) for m, p in paths.items()}
    assert final_loss["sgd"].max() < 1e-12
    assert final_loss["asam"].max() < 0.01  # every start reaches the valley
    small_start = trajectories.DEFAULT_STARTS.index((0.2, 0.05))
    assert final_loss["sam"][small_start] > 0.49  # SAM stalls at the saddle w = 0, L = ½
    assert np.linalg.norm(paths["sam"][small_start, -1]) < 0.05


def test_plot_writes_a_small_png(tmp_path):
    output = tmp_path / "paths.png"
    paths = trajectories.plot(
        str(output), trajectories.DEFAULT_STARTS[:2], trajectories.Settings(steps=20)
    )
    assert paths["asam"].shape == (2, 21, 2)
    data = output.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) < MAX_PICTURE_BYTES


# Share of pixels that may differ between the committed picture and one drawn now (none did
# with the matplotlib that drew it; text rendering may move a few pixels under another).
MAX_DIFFERING_PIXELS = 0.001


def differing_pixels(path_a, path_b) -> float:
    from matplotlib import image

    a, b = image.imread(str(path_a)), image.imread(str(path_b))
    if a.shape != b.shape:
        return 1.0
    return float((np.abs(a - b).max(axis=-1) > 0.1).mean())


def test_committed_picture_is_what_the_code_draws(tmp_path):
    """docs/trajectories.png is the default picture drawn now; a picture of other settings (here a
    smaller learning rate) differs by more than the tolerance, so a stale picture fails."""
    with open(PICTURE, "rb") as f:
        data = f.read()
    assert data.startswith(PNG_MAGIC) and len(data) < MAX_PICTURE_BYTES
    trajectories.plot(str(tmp_path / "now.png"))
    assert differing_pixels(PICTURE, tmp_path / "now.png") < MAX_DIFFERING_PIXELS, (
        "docs/trajectories.png is stale: redraw it with "
        "fairseq-asam-trajectories --output docs/trajectories.png"
    )
    trajectories.plot(str(tmp_path / "other.png"), settings=trajectories.Settings(lr=0.04))
    assert differing_pixels(tmp_path / "now.png", tmp_path / "other.png") > 3 * MAX_DIFFERING_PIXELS


def test_cli_rejects_a_missing_output_folder(tmp_path, capsys):
    level = logging.getLogger().level
    try:
        assert trajectories_main(["--output", str(tmp_path / "missing" / "t.png")]) == 1
        err = capsys.readouterr().err
        assert (
            err.startswith("fairseq-asam-trajectories: error: --output ") and err.count("\n") == 1
        )
        assert err.strip().endswith("its folder does not exist")
        assert trajectories_main(["--output", str(tmp_path / "t.png"), "--steps", "5"]) == 0
    finally:
        logging.getLogger().setLevel(level)
    assert (tmp_path / "t.png").read_bytes().startswith(PNG_MAGIC)
    assert os.listdir(tmp_path) == ["t.png"]  # no temporary file left behind
