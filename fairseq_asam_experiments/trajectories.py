"""fairseq-asam-trajectories: SGD, SAM and ASAM on L(w) = ½(1 − w₁w₂)² (after Kwon et al., 2021,
Figure 4; docs/tools.md shows the picture).  L depends on w only through w₁w₂, so the minima form
the hyperbola w₁w₂ = 1 and the origin is a saddle.  One step, with g = ∇L(w) = −(1 − w₁w₂)(w₂, w₁):

    SGD:  w ← w − λ g
    SAM:  ε = ρ g / ‖g‖₂,          w ← w − λ ∇L(w + ε)
    ASAM: ε = ρ T² g / ‖T g‖₂,     w ← w − λ ∇L(w + ε),   T = diag(|w₁| + η, |w₂| + η)

With η = 0 and w₁w₂ > 0, ε_ASAM = −sign(1 − w₁w₂) ρ w / √2, so ASAM walks SGD's path.
"""

import argparse
import dataclasses
import os

import numpy as np

from .cli import run_command
from .errors import SettingError
from .files import atomic_output

PROGRAM = "fairseq-asam-trajectories"
METHODS = ("sgd", "sam", "asam")
# Small-scale starts (SAM stalls at the saddle) and large, unbalanced ones (all converge).
DEFAULT_STARTS = ((0.2, 0.05), (0.05, 0.2), (0.12, 0.12), (2.0, 0.05), (0.05, 2.0), (1.6, 1.4))
LIMITS, GRID_POINTS, LEVELS = (-0.3, 2.3), 241, np.geomspace(1e-3, 3.0, 14)
STYLES = {  # SGD last and thin, on top of the others
    "sam": dict(color="tab:blue", linestyle="-", linewidth=2.0, label="SAM"),
    "asam": dict(color="tab:red", linestyle="-", linewidth=1.6, label="ASAM"),
    "sgd": dict(color="k", linestyle="--", linewidth=0.9, label="SGD"),
}


@dataclasses.dataclass(frozen=True)
class Settings:
    lr: float = 0.05
    steps: int = 400
    sam_rho: float = 0.2  # a length; ASAM's ρ is a fraction of |w|
    asam_rho: float = 0.2
    eta: float = 0.01


def loss(w) -> np.ndarray:
    return 0.5 * (1.0 - np.prod(np.asarray(w, dtype=float), axis=-1)) ** 2


def gradient(w) -> np.ndarray:
    w = np.asarray(w, dtype=float)
    return -(1.0 - w[..., 0] * w[..., 1])[..., None] * w[..., ::-1]


def perturbation(method: str, w, rho: float, eta: float) -> np.ndarray:
    w = np.asarray(w, dtype=float)
    g, scale = gradient(w), {"sgd": 0.0, "sam": 1.0, "asam": np.abs(w) + eta}[method]  # T
    norm = np.linalg.norm(scale * g)
    return rho * scale**2 * g / norm if norm else np.zeros(2)  # SGD's T = 0: no ε


def update(method: str, w, lr: float, rho: float, eta: float) -> np.ndarray:
    return np.asarray(w, dtype=float) - lr * gradient(w + perturbation(method, w, rho, eta))


def trajectories(starts=DEFAULT_STARTS, settings: Settings = Settings()) -> dict:
    """{method: paths of shape (len(starts), steps + 1, 2)}; [:, 0] are the starts."""
    paths = {m: np.empty((len(starts), settings.steps + 1, 2)) for m in METHODS}
    for method, path in paths.items():
        path[:, 0] = starts
        rho = getattr(settings, f"{method}_rho", 0.0)  # SGD has none
        for i, t in np.ndindex(len(starts), settings.steps):
            path[i, t + 1] = update(method, path[i, t], settings.lr, rho, settings.eta)
    return paths


def plot(output: str, starts=DEFAULT_STARTS, settings: Settings = Settings()) -> dict:
    """Loss contours and every method's paths, to the PNG `output`; returns the paths."""
    from matplotlib import colors, figure

    paths, axis = trajectories(starts, settings), np.linspace(*LIMITS, GRID_POINTS)
    surface = loss(np.stack(np.meshgrid(axis, axis), axis=-1))
    picture = figure.Figure(figsize=(6.0, 5.4), dpi=100, layout="tight")  # no pyplot to close
    ax = picture.subplots()
    shade = dict(cmap="Greens_r", extend="both", alpha=0.55)
    ax.contourf(axis, axis, surface, levels=LEVELS, norm=colors.LogNorm(), **shade)
    ax.contour(axis, axis, surface, levels=LEVELS, colors="0.6", linewidths=0.4)
    valley = np.linspace(1.0 / LIMITS[1], LIMITS[1], 200)
    ax.plot(valley, 1.0 / valley, "k:", linewidth=0.8, label="minima $w_1w_2=1$")
    for method, style in STYLES.items():
        for index, path in enumerate(paths[method]):  # one legend entry per method
            ax.plot(path[:, 0], path[:, 1], **dict(style, label=None if index else style["label"]))
            ax.plot(*path[-1], marker="o", markersize=4, color=style["color"])
    ax.plot(*np.asarray(starts, dtype=float).T, "k^", markersize=5, label="start")
    ax.set(xlim=LIMITS, ylim=LIMITS, xlabel="$w_1$", ylabel="$w_2$", aspect="equal")
    s, loss_text = settings, "$L=\\frac{1}{2}(1-w_1w_2)^2$"
    title = f"{loss_text}: {s.steps} steps, lr {s.lr:g}, SAM $\\rho$={s.sam_rho:g}, "
    ax.set_title(title + f"ASAM $\\rho$={s.asam_rho:g}, $\\eta$={s.eta:g}", fontsize=9)
    ax.legend(loc="upper right", fontsize=8)
    with atomic_output(output) as temporary:
        picture.savefig(temporary, format="png")
    return paths


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROGRAM, description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default=os.path.join("docs", "trajectories.png"), help="PNG")
    for field in dataclasses.fields(Settings):
        p.add_argument(f"--{field.name.replace('_', '-')}", type=field.type, default=field.default)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    return run_command(PROGRAM, lambda: work(args), level=None)


def work(args) -> int:
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
        raise SettingError(f"--output {args.output}: its folder does not exist")
    settings = Settings(*(getattr(args, f.name) for f in dataclasses.fields(Settings)))
    paths = plot(args.output, DEFAULT_STARTS, settings)
    print(f"{'start':>14} {'method':>6} {'end':>18} {'loss':>9}")
    for method in METHODS:
        for start, end in zip(DEFAULT_STARTS, paths[method][:, -1]):
            print(f"{str(start):>14} {method:>6} ({end[0]:7.3f}, {end[1]:7.3f}) {loss(end):9.2e}")
    print(f"wrote {args.output}")
    return 0
