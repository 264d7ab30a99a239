"""fairseq-asam-sharpness: sharpness and adaptive sharpness of a fairseq checkpoint on its data.

    S_ρ(w) = max_{‖T⁻¹ε‖₂ <= ρ} L(w + ε) − L(w)   (Foret et al. 2021; Kwon et al. 2021, Def. 3)

adaptive: T = diag(|w| + η), fixed at w, on the tensors the ASAM optimizer scales ("weight"), on
all with `normalize_biases`; plain: T = I.  L = Σ_B loss_B / Σ_B sample_size_B over fixed batches.
ε* = T δ_k for the k in 1..K of highest L(w + T δ_k): δ₀ = 0, δ_k = Π(δ_{k−1} + ρ T g_k / ‖T g_k‖₂),
g_k = ∇L(w + T δ_{k−1}), Π(δ) = δ · min(1, ρ / ‖δ‖₂).  K = 1 is SAM/ASAM's ε = ρ T² g / ‖T g‖₂.
The estimate is a lower bound of S_ρ that never falls as K grows (on 300 random 2-D quadratics
the worst shortfall at K = 30 was about 1%; a constant step ρ/K fell 36% short).  With η = 0 and
every rescaled tensor normalized, adaptive sharpness is invariant under a function-preserving
rescaling w ↦ S w (T' = S T).
"""

import argparse
import dataclasses
import logging
import math
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from fairseq_asam.perturbation import is_adaptive

from . import loading
from .cli import run_command
from .errors import SettingError
from .files import write_json

PROGRAM = "fairseq-asam-sharpness"
MEASURES = ("adaptive", "plain")
DEFAULT_ETA = 0.01  # the ASAM optimizer's default
DEFAULT_STEPS = 10

LossFn = Callable[[nn.Module, Any], Tuple[Tensor, float]]  # -> (Σ loss, sample size) of a batch


@dataclasses.dataclass
class SharpnessEstimate:
    """One estimate of S_ρ; losses are means per sample-size unit."""

    measure: str  # "adaptive" or "plain"
    rho: float
    eta: Optional[float]  # None for plain sharpness
    normalize_biases: bool
    steps: int  # K, the ascent steps asked for
    loss: float  # L(w)
    perturbed_loss: float  # L(w + ε*)
    sharpness: float  # L(w + ε*) − L(w)
    epsilon_norm: float  # ‖ε*‖₂
    scaled_epsilon_norm: float  # ‖T⁻¹ε*‖₂ <= ρ
    best_step: int  # the k of ε* (0: the gradient was zero, ε* = 0)
    step_losses: List[float]  # L(w + T δ_k), k = 1.. (fewer than K if the ascent ended early)
    sample_size: float
    num_batches: int


def _norm(tensors: Sequence[Tensor]) -> float:
    """‖·‖₂ of the tensors together, reduced in fp64."""
    return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)).double()))


def _mean_loss(model, params, batches, loss_fn: LossFn, with_gradient, step):
    """(L, ∇L or None, Σ sample_size); the model's `.grad` is untouched."""
    loss_sum: Any = 0.0  # a tensor on the batches' device after the first batch: no sync per batch
    sample_size = 0.0
    gradient = [torch.zeros_like(p) for p in params] if with_gradient else None
    with torch.set_grad_enabled(with_gradient):
        for batch in batches:
            batch_loss, batch_sample_size = loss_fn(model, batch)
            if with_gradient:
                grads = torch.autograd.grad(batch_loss, params, materialize_grads=True)
                torch._foreach_add_(gradient, grads)
            loss_sum = loss_sum + batch_loss.detach().double()
            sample_size += float(batch_sample_size)
    mean_loss = float(loss_sum) / sample_size
    if not math.isfinite(mean_loss):
        raise FloatingPointError(f"the loss is not finite at ascent step {step} (0: at w)")
    if gradient is not None:
        torch._foreach_div_(gradient, sample_size)
    return mean_loss, gradient, sample_size


@torch.no_grad()
def _ascent_step(params, origin, scales, delta, gradient, rho: float, step: int):
    """δ ← Π(δ + ρ T g / ‖T g‖), w ← origin + T δ; (‖T δ‖, ‖δ‖), or None if T g = 0."""
    ascent = [g if t is None else t * g for t, g in zip(scales, gradient)]  # T g, in δ-space
    ascent_norm = _norm(ascent)
    if not math.isfinite(ascent_norm):
        raise FloatingPointError(f"the gradient is not finite at ascent step {step}")
    if ascent_norm == 0:
        return None
    torch._foreach_add_(delta, ascent, alpha=rho / ascent_norm)
    delta_norm = _norm(delta)
    if delta_norm > rho:
        torch._foreach_mul_(delta, rho / delta_norm)
        delta_norm = rho
    epsilon = [d if t is None else t * d for t, d in zip(scales, delta)]
    torch._foreach_copy_(params, torch._foreach_add(origin, epsilon))
    return _norm(epsilon), delta_norm


def estimate_sharpness(
    model: nn.Module,
    batches: Sequence,
    loss_fn: LossFn,
    rho: float,
    adaptive: bool = True,
    eta: float = DEFAULT_ETA,
    normalize_biases: bool = False,
    steps: int = DEFAULT_STEPS,
) -> SharpnessEstimate:
    """S_ρ(w) of `model` (in eval mode) on `batches` by K = `steps` ascent steps (the caller checks
    them); plain (T = I, `eta`, `normalize_biases` unused) if not `adaptive`.  Restores w, mode."""
    batches = list(batches)
    if not batches:
        raise SettingError("no batches to measure the loss on (check --subset and --max-batches)")
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    scaled = [adaptive and (normalize_biases or is_adaptive(n, adaptive)) for n in names]
    scales = [p.detach().abs() + eta if s else None for p, s in zip(params, scaled)]  # None: T=1
    origin = [p.detach().clone() for p in params]
    delta = [torch.zeros_like(p) for p in params]
    iterates = []  # (L(w + T δ_k), ‖T δ_k‖, ‖δ_k‖, k)
    was_training = model.training
    model.eval()
    try:
        loss, gradient, size = _mean_loss(model, params, batches, loss_fn, True, 0)
        for step in range(1, steps + 1):
            norms = _ascent_step(params, origin, scales, delta, gradient, rho, step)
            gradient = None  # freed before the next pass allocates its own
            if norms is None:
                break
            step_loss, gradient, _ = _mean_loss(model, params, batches, loss_fn, step < steps, step)
            iterates.append((step_loss, *norms, step))
    finally:  # w restored bit for bit, also on an error
        with torch.no_grad():
            torch._foreach_copy_(params, origin)
        model.train(was_training)
    # ε* is the iterate of highest loss (the first of equals); none if the gradient at w is 0
    best = max(iterates, key=lambda iterate: iterate[0], default=(loss, 0.0, 0.0, 0))
    perturbed_loss, epsilon_norm, delta_norm, best_step = best
    return SharpnessEstimate(
        measure="adaptive" if adaptive else "plain",
        rho=float(rho),
        eta=float(eta) if adaptive else None,
        normalize_biases=bool(normalize_biases and adaptive),
        steps=int(steps),
        loss=loss,
        perturbed_loss=perturbed_loss,
        sharpness=perturbed_loss - loss,
        epsilon_norm=epsilon_norm,
        scaled_epsilon_norm=delta_norm,
        best_step=best_step,
        step_losses=[iterate[0] for iterate in iterates],
        sample_size=size,
        num_batches=len(batches),
    )


def load_subset(checkpoint, data_bin, subset, count, device, max_tokens=None, batch_size=None):
    """The model (eval mode, on `device`), the first `count` batches of `subset` in fairseq's
    fixed validation order (sized as the checkpoint's validation unless given), the LossFn."""
    from fairseq import utils

    loaded = loading.load_checkpoint(checkpoint, data_bin, subset)
    cfg = loaded.cfg.dataset
    batches = loading.split_batches(
        loaded,
        subset,
        count,
        max_tokens=cfg.max_tokens_valid if max_tokens is None else max_tokens,
        max_sentences=cfg.batch_size_valid if batch_size is None else batch_size,
        seed=loaded.cfg.common.seed,
        ignore_invalid_inputs=cfg.skip_invalid_size_inputs_valid_test,
        required_batch_size_multiple=cfg.required_batch_size_multiple,
    )
    model, criterion = loaded.model.to(device), loaded.criterion.to(device)
    batches = [utils.apply_to_sample(lambda t: t.to(device), batch) for batch in batches]
    return model, batches, lambda model_, sample: criterion(model_, sample)[:2]


def format_sharpness(report: Dict[str, Any]) -> str:
    """The report as a small text table."""
    estimates, first = report["estimates"], report["estimates"][0]
    lines = [
        f"{report['checkpoint']} on {report['subset']} of {report['data']}: {first['num_batches']} "
        f"batches, sample size {first['sample_size']:g}; losses per sample-size unit (nats)",
        f"{'measure':<9} {'rho':>7} {'eta':>7} {'K':>3} {'L(w)':>10} {'L(w+eps)':>10} "
        f"{'sharpness':>11} {'|eps|':>10} {'|T^-1 eps|':>10}",
    ]
    for e in estimates:
        eta = "-" if e["eta"] is None else f"{e['eta']:g}" + ("*" if e["normalize_biases"] else "")
        lines.append(
            f"{e['measure']:<9} {e['rho']:>7g} {eta:>7} {e['steps']:>3d} {e['loss']:>10.5f} "
            f"{e['perturbed_loss']:>10.5f} {e['sharpness']:>11.4e} {e['epsilon_norm']:>10.4e} "
            f"{e['scaled_epsilon_norm']:>10.4e}"
        )
    if any(e["normalize_biases"] for e in estimates):
        lines.append("* biases normalized too (T = |w| + eta on every tensor)")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROGRAM, description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="fairseq checkpoint (.pt)")
    p.add_argument("data", help="the checkpoint's data-bin folder")
    p.add_argument("--rho", type=float, required=True, help="radius of the ball |T^-1 eps| <= rho")
    p.add_argument("--subset", default="valid", help="split to measure on")
    p.add_argument("--max-batches", type=int, default=20, help="the subset's first M batches")
    p.add_argument("--measures", nargs="+", choices=MEASURES, default=list(MEASURES))
    p.add_argument("--eta", type=float, default=DEFAULT_ETA, help="eta in T = |w| + eta")
    p.add_argument("--normalize-biases", action="store_true", help="T = |w| + eta on biases too")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="K ascent steps (1: SAM's)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if there is one)")
    p.add_argument("--max-tokens", type=int, help="batch size in tokens (default: checkpoint's)")
    p.add_argument("--batch-size", type=int, help="batch size in sentences (default: checkpoint's)")
    p.add_argument("--json", help="also write the report to this JSON file (atomically)")
    return p


def check_device(name: str) -> "torch.device":
    """--device `name` as a torch.device, or SettingError if it is none or not on this machine."""
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise SettingError(f"--device {name!r} is not a device: {error}") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise SettingError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def work(args: argparse.Namespace) -> int:
    """Checks every argument (SettingError naming the flag or file) before the checkpoint is
    loaded; prints the report and writes it to --json."""
    device = check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not (math.isfinite(args.rho) and args.rho > 0):
        raise SettingError(f"--rho must be a finite number > 0, got {args.rho}")
    if not (math.isfinite(args.eta) and args.eta >= 0):
        raise SettingError(f"--eta must be a finite number >= 0, got {args.eta}")
    for name in ("steps", "max_batches", "max_tokens", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SettingError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not os.path.isfile(args.checkpoint):
        raise SettingError(f"checkpoint not found: {args.checkpoint}")
    loading.check_split(args.data, args.subset)
    subset = (args.checkpoint, args.data, args.subset, args.max_batches)
    loaded = load_subset(*subset, device, args.max_tokens, args.batch_size)
    settings = (args.eta, args.normalize_biases, args.steps)
    estimates = [
        dataclasses.asdict(estimate_sharpness(*loaded, args.rho, m == "adaptive", *settings))
        for m in args.measures
    ]
    report = dict(checkpoint=args.checkpoint, data=args.data, subset=args.subset)
    report.update(device=str(device), estimates=estimates)
    print(format_sharpness(report))
    if args.json:
        write_json(args.json, report)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    return run_command(PROGRAM, lambda: work(args), logging.WARNING)
