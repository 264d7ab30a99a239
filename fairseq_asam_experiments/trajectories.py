"""SGD, SAM and ASAM on a two-parameter scale-symmetric loss (after Kwon et al., 2021, Figure 4).

The loss depends on w = (w₁, w₂) only through the product w₁w₂, like a two-layer linear
network y = w₁ w₂ x fitted to y = x:

    L(w) = ½ (1 − w₁w₂)²,   ∇L(w) = −(1 − w₁w₂) (w₂, w₁)

so L(a w₁, w₂ / a) = L(w₁, w₂) for every a > 0: the minima form the hyperbola w₁w₂ = 1 and
the origin is a saddle.  One step of each method, with g = ∇L(w) and step size λ:

    SGD:  w ← w − λ g
    SAM:  ε = ρ g / ‖g‖₂,            w ← w − λ ∇L(w + ε)
    ASAM: ε = ρ T² g / ‖T g‖₂,      w ← w − λ ∇L(w + ε),   T = diag(|w₁| + η, |w₂| + η)

ε = 0 where g = 0.  With η = 0 and w₁w₂ > 0, T g = −(1 − w₁w₂) w₁w₂ (1, 1), hence

    ε_ASAM = −sign(1 − w₁w₂) ρ w / √2

ASAM perturbs both weights by the same fraction ρ/√2 of themselves, whatever the scale of w;
∇L(w + ε) is then parallel to g, so ASAM walks SGD's path (up to discretization: the step
lengths differ) and settles next to where SGD does (η = 0.01 changes this little).  SAM's ε
has length ρ wherever w is: from
starts whose ‖w‖ is comparable to ρ it jumps across the saddle and stalls there, and on the
valley it drifts toward the balanced minimum (1, 1), where the largest Hessian eigenvalue
w₁² + w₂² is smallest.  Adaptive sharpness, invariant along the valley, prefers no point of it.
"""

import dataclasses
from typing import Dict, Sequence, Tuple

import numpy as np

from .files import atomic_output

METHODS = ("sgd", "sam", "asam")
# Small-scale starts (SAM stalls at the saddle) and large, unbalanced ones (all converge).
DEFAULT_STARTS = ((0.2, 0.05), (0.05, 0.2), (0.12, 0.12), (2.0, 0.05), (0.05, 2.0), (1.6, 1.4))
PLOT_LIMITS = (-0.3, 2.3)
GRID_POINTS = 241
CONTOUR_LEVELS = np.geomspace(1e-3, 3.0, 14)
METHOD_STYLES = {  # SGD last and thin, on top of the others
    "sam": dict(color="tab:blue", linestyle="-", linewidth=2.0, label="SAM"),
    "asam": dict(color="tab:red", linestyle="-", linewidth=1.6, label="ASAM"),
    "sgd": dict(color="k", linestyle="--", linewidth=0.9, label="SGD"),
}
FIGURE_SIZE_INCHES = (6.0, 5.4)
FIGURE_DPI = 100


@dataclasses.dataclass(frozen=True)
class Settings:
    """Step size, step count and radii of the picture (SAM's ρ is absolute, ASAM's relative)."""

    lr: float = 0.05
    steps: int = 400
    sam_rho: float = 0.2
    asam_rho: float = 0.2
    eta: float = 0.01

    def rho(self, method: str) -> float:
        return {"sgd": 0.0, "sam": self.sam_rho, "asam": self.asam_rho}[method]


def loss(w: np.ndarray) -> np.ndarray:
    """L(w) = ½ (1 − w₁w₂)² for w of shape (..., 2)."""
    w = np.asarray(w, dtype=float)
    return 0.5 * (1.0 - w[..., 0] * w[..., 1]) ** 2


def gradient(w: np.ndarray) -> np.ndarray:
    """∇L(w) = −(1 − w₁w₂) (w₂, w₁) for w of shape (..., 2)."""
    w = np.asarray(w, dtype=float)
    residual = 1.0 - w[..., 0] * w[..., 1]
    return -residual[..., None] * w[..., ::-1]


def perturbation(method: str, w: np.ndarray, rho: float, eta: float) -> np.ndarray:
    """ε of `method` at w: 0 (SGD), ρ g/‖g‖ (SAM) or ρ T² g/‖T g‖ (ASAM); 0 where g = 0."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    w = np.asarray(w, dtype=float)
    g = gradient(w)
    scale = np.abs(w) + eta if method == "asam" else np.ones_like(w)
    norm = np.linalg.norm(scale * g)
    if method == "sgd" or norm == 0:
        return np.zeros_like(w)
    return rho * scale**2 * g / norm


def update(method: str, w: np.ndarray, lr: float, rho: float, eta: float) -> np.ndarray:
    """One step: w − λ ∇L(w + ε)."""
    w = np.asarray(w, dtype=float)
    return w - lr * gradient(w + perturbation(method, w, rho, eta))


def trajectory(method: str, start: Sequence[float], settings: Settings = Settings()) -> np.ndarray:
    """The path of `method` from `start`: shape (steps + 1, 2), row 0 is the start."""
    path = np.empty((settings.steps + 1, 2))
    path[0] = start
    for step in range(settings.steps):
        path[step + 1] = update(method, path[step], settings.lr, settings.rho(method), settings.eta)
    return path


def trajectories(
    starts: Sequence[Tuple[float, float]] = DEFAULT_STARTS, settings: Settings = Settings()
) -> Dict[str, np.ndarray]:
    """{method: paths of shape (len(starts), steps + 1, 2)} for every method."""
    return {m: np.stack([trajectory(m, s, settings) for s in starts]) for m in METHODS}


def plot(
    output: str,
    starts: Sequence[Tuple[float, float]] = DEFAULT_STARTS,
    settings: Settings = Settings(),
) -> Dict[str, np.ndarray]:
    """Draws loss contours and the paths of SGD, SAM and ASAM to the PNG `output`; returns them."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import colors
    from matplotlib import pyplot as plt

    paths = trajectories(starts, settings)
    axis = np.linspace(*PLOT_LIMITS, GRID_POINTS)
    grid = np.stack(np.meshgrid(axis, axis), axis=-1)
    figure, ax = plt.subplots(figsize=FIGURE_SIZE_INCHES, dpi=FIGURE_DPI)
    try:
        ax.contourf(
            axis,
            axis,
            loss(grid),
            levels=CONTOUR_LEVELS,
            norm=colors.LogNorm(),
            cmap="Greens_r",
            extend="both",
            alpha=0.55,
        )
        ax.contour(axis, axis, loss(grid), levels=CONTOUR_LEVELS, colors="0.6", linewidths=0.4)
        valley = np.linspace(1.0 / PLOT_LIMITS[1], PLOT_LIMITS[1], 200)
        ax.plot(
            valley, 1.0 / valley, color="k", linewidth=0.8, linestyle=":", label="minima $w_1w_2=1$"
        )
        for method, style in METHOD_STYLES.items():
            for index, path in enumerate(paths[method]):
                ax.plot(
                    path[:, 0],
                    path[:, 1],
                    **dict(style, label=style["label"] if index == 0 else None),
                )
                ax.plot(*path[-1], marker="o", markersize=4, color=style["color"])
        starts_array = np.asarray(starts, dtype=float)
        ax.plot(starts_array[:, 0], starts_array[:, 1], "k^", markersize=5, label="start")
        ax.set(xlim=PLOT_LIMITS, ylim=PLOT_LIMITS, xlabel="$w_1$", ylabel="$w_2$", aspect="equal")
        ax.set_title(
            f"$L=\\frac{{1}}{{2}}(1-w_1w_2)^2$: {settings.steps} steps, lr {settings.lr:g}, "
            f"SAM $\\rho$={settings.sam_rho:g}, ASAM $\\rho$={settings.asam_rho:g}, "
            f"$\\eta$={settings.eta:g}",
            fontsize=9,
        )
        ax.legend(loc="upper right", fontsize=8)
        figure.tight_layout()
        with atomic_output(output) as temporary:
            figure.savefig(temporary, format="png")
    finally:
        plt.close(figure)
    return paths
