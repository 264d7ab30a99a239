"""Sharpness and adaptive sharpness of a trained model, and the `fairseq-asam-sharpness` command.

Definitions (Foret et al., ICLR 2021; Kwon et al., ICML 2021, Definition 3):

    S_ρ(w) = max_{‖T⁻¹ε‖₂ <= ρ} L(w + ε) − L(w)
    adaptive: T = diag(|w| + η) on the tensors named "weight" (as the ASAM optimizer,
              `perturbation.is_adaptive`), on every tensor with `normalize_biases`; else T = 1
    plain:    T = I (SAM's ball ‖ε‖₂ <= ρ)

T is fixed at the measured w.  L = Σ_B loss_B / Σ_B sample_size_B over fixed batches (fairseq:
the criterion's summed loss and sample_size, nats per target token; its logs show L / ln 2).

Estimator: projected gradient ascent over the ball ‖δ‖₂ <= ρ of δ = T⁻¹ε, where the gradient of
δ ↦ L(w + Tδ) is T ∇L(w + Tδ):

    δ₀ = 0,  u_k = T g_k / ‖T g_k‖₂,  g_k = ∇L(w + T δ_{k−1})
    δ_k = Π(δ_{k−1} + ρ u_k),  Π(δ) = δ · min(1, ρ / ‖δ‖₂)
    ε* = T δ_k for the k in 1..K with the highest L(w + T δ_k)

K = 1 gives ε* = ρ T² g / ‖T g‖₂, SAM/ASAM's one-step estimate; keeping the best iterate makes
the estimate non-decreasing in K, and every estimate is a lower bound of S_ρ (on 300 random 2-D
quadratics the worst shortfall at K = 30 was about 1%; a constant step ρ/K fell 36% short).  A
zero T·g ends the ascent; a non-finite T·g or loss raises FloatingPointError.  Cost: K
forward-backward passes and one forward pass.  With η = 0 and every rescaled tensor normalized,
adaptive sharpness is invariant under a function-preserving rescaling w ↦ S w (T' = S T).
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
from .errors import SettingError

PROGRAM = "fairseq-asam-sharpness"
MEASURES = ("adaptive", "plain")
DEFAULT_SUBSET = "valid"
DEFAULT_MAX_BATCHES = 20
DEFAULT_ETA = 0.01  # the ASAM optimizer's default
DEFAULT_STEPS = 10
ASCENT_STEP_IN_RHO = 1.0  # every ascent step's length in δ-space: the first reaches the sphere

# (model, batch) -> (loss summed over the batch, the batch's sample size)
LossFn = Callable[[nn.Module, Any], Tuple[Tensor, float]]


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


def check_settings(rho: float, eta: float, steps: int) -> None:
    """Raises SettingError, naming the flag, for a radius, η or step count out of range."""
    if not (math.isfinite(rho) and rho > 0):
        raise SettingError(f"--rho must be a finite number > 0, got {rho}")
    if not (math.isfinite(eta) and eta >= 0):
        raise SettingError(f"--eta must be a finite number >= 0, got {eta}")
    if steps < 1:
        raise SettingError(f"--steps must be >= 1, got {steps}")


def _global_norm(tensors: Sequence[Tensor]) -> Tensor:
    return torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(t).double() for t in tensors])
    )


def _scaled(scales: Sequence[Optional[Tensor]], tensors: Sequence[Tensor]) -> List[Tensor]:
    """T x, tensor by tensor; a scale of None is the identity."""
    return [x if t is None else t * x for t, x in zip(scales, tensors)]


def _mean_loss_and_gradient(model, params, batches, loss_fn: LossFn, with_gradient, step):
    """(L, ∇L or None, Σ sample_size) at ascent step `step`: one backward per batch into separate
    buffers (the model's `.grad` is untouched, no graph outlives its batch)."""
    loss_sum: Any = 0.0  # a tensor on the batches' device after the first batch: no sync per batch
    sample_size = 0.0
    gradient = [torch.zeros_like(p) for p in params] if with_gradient else None
    with torch.set_grad_enabled(with_gradient):
        for batch in batches:
            batch_loss, batch_sample_size = loss_fn(model, batch)
            if with_gradient:
                grads = torch.autograd.grad(batch_loss, params, allow_unused=True)
                for total, g in zip(gradient, grads):
                    if g is not None:  # parameters the batch does not reach have g = 0
                        total.add_(g)
            loss_sum = loss_sum + batch_loss.detach().double()
            sample_size += float(batch_sample_size)
    if sample_size <= 0:
        raise ValueError("the batches have a total sample size of 0: there is no loss to measure")
    mean_loss = float(loss_sum) / sample_size
    if not math.isfinite(mean_loss):
        raise FloatingPointError(f"the loss is not finite at ascent step {step} (0: at w)")
    if gradient is not None:
        torch._foreach_div_(gradient, sample_size)
    return mean_loss, gradient, sample_size


@torch.no_grad()
def _ascent_step(params, origin, scales, delta, gradient, rho: float, step: int):
    """δ ← Π(δ + α T g / ‖T g‖), then w ← origin + T δ; returns (‖T δ‖, ‖δ‖), or None if T g = 0."""
    ascent = _scaled(scales, gradient)  # T g, the gradient in δ-space
    ascent_norm = float(_global_norm(ascent))
    if not math.isfinite(ascent_norm):
        raise FloatingPointError(f"the gradient is not finite at ascent step {step}")
    if ascent_norm == 0:
        return None
    torch._foreach_add_(delta, ascent, alpha=ASCENT_STEP_IN_RHO * rho / ascent_norm)
    delta_norm = float(_global_norm(delta))
    if delta_norm > rho:
        torch._foreach_mul_(delta, rho / delta_norm)
        delta_norm = rho
    epsilon = _scaled(scales, delta)
    for p, w, e in zip(params, origin, epsilon):
        p.copy_(w + e)
    return float(_global_norm(epsilon)), delta_norm


def _ascend(model, params, scales, batches, loss_fn, rho, steps):
    """L(w) and Σ sample_size, and (L(w + T δ_k), ‖T δ_k‖, ‖δ_k‖, k) of every ascent step; the
    parameters are restored bit for bit, also on an error."""
    origin = [p.detach().clone() for p in params]
    delta = [torch.zeros_like(p) for p in params]
    iterates = []
    try:
        loss, gradient, sample_size = _mean_loss_and_gradient(
            model, params, batches, loss_fn, True, 0
        )
        for step in range(1, steps + 1):
            norms = _ascent_step(params, origin, scales, delta, gradient, rho, step)
            gradient = None  # freed before the next pass allocates its own
            if norms is None:
                break
            step_loss, gradient, _ = _mean_loss_and_gradient(
                model, params, batches, loss_fn, step < steps, step
            )
            iterates.append((step_loss, *norms, step))
    finally:
        with torch.no_grad():
            for p, w in zip(params, origin):
                p.copy_(w)
    return loss, sample_size, iterates


def estimate_sharpness(
    model: nn.Module, batches: Sequence, loss_fn: LossFn, rho: float, adaptive: bool = True,
    eta: float = DEFAULT_ETA, normalize_biases: bool = False, steps: int = DEFAULT_STEPS,
) -> SharpnessEstimate:  # fmt: skip
    """Estimates S_ρ(w) of `model` (in eval mode) on `batches` by K = `steps` ascent steps.

    `adaptive=False` measures plain sharpness (T = I; `eta`, `normalize_biases` unused).  The
    model's parameters are restored bit for bit, its train/eval mode too.
    """
    check_settings(float(rho), float(eta), int(steps))
    batches = list(batches)
    if not batches:
        raise SettingError("no batches to measure the loss on (check --subset and --max-batches)")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    scaled = [adaptive and (normalize_biases or is_adaptive(n, adaptive)) for n, _ in named]
    scales = [p.detach().abs() + eta if s else None for (_, p), s in zip(named, scaled)]
    was_training = model.training
    model.eval()
    try:
        params = [p for _, p in named]
        loss, sample_size, iterates = _ascend(model, params, scales, batches, loss_fn, rho, steps)
    finally:
        model.train(was_training)
    # ε* is the iterate of highest loss (the first of equals); none if the gradient at w is 0
    perturbed_loss, epsilon_norm, delta_norm, best_step = max(
        iterates, key=lambda iterate: iterate[0], default=(loss, 0.0, 0.0, 0)
    )
    return SharpnessEstimate(
        measure=MEASURES[0] if adaptive else MEASURES[1], rho=float(rho),
        eta=float(eta) if adaptive else None, normalize_biases=bool(normalize_biases and adaptive),
        steps=int(steps), loss=loss, perturbed_loss=perturbed_loss, sharpness=perturbed_loss - loss,
        epsilon_norm=epsilon_norm, scaled_epsilon_norm=delta_norm, best_step=best_step,
        step_losses=[iterate[0] for iterate in iterates], sample_size=sample_size,
        num_batches=len(batches),
    )  # fmt: skip


def check_measurement(checkpoint, data_bin, options: Dict[str, Any]) -> torch.device:
    """The device to measure on; SettingError naming the flag or file before anything is loaded."""
    try:
        device = torch.device(options["device"])
    except RuntimeError as error:
        raise SettingError(f"--device {options['device']!r} is not a device: {error}") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        gpus = torch.cuda.device_count()
        raise SettingError(f"--device {options['device']}: this machine has {gpus} GPU(s)")
    check_settings(float(options["rho"]), float(options["eta"]), int(options["steps"]))
    for name in ("max_batches", "max_tokens", "batch_size"):
        if options[name] is not None and options[name] < 1:
            raise SettingError(f"--{name.replace('_', '-')} must be >= 1, got {options[name]}")
    measures = options["measures"]
    if not measures or any(m not in MEASURES for m in measures):
        got = ", ".join(measures) or "none"
        raise SettingError(f"--measures must be some of {', '.join(MEASURES)}, got {got}")
    if not os.path.isfile(checkpoint):
        raise SettingError(f"checkpoint not found: {checkpoint}")
    loading.check_split(data_bin, options["subset"])
    return device


def load_subset(
    checkpoint, data_bin, subset, max_batches, device, max_tokens=None, batch_size=None
):
    """The checkpoint's model (eval mode, on `device`), the first `max_batches` batches of
    `subset` in fairseq's fixed validation order (sized by `max_tokens`/`batch_size`, by default
    the checkpoint's validation settings; moved to `device` one at a time), and its criterion
    as a LossFn."""
    from fairseq import utils

    loaded = loading.load_checkpoint(checkpoint, data_bin, subset)
    cfg = loaded.cfg.dataset
    batches = loading.split_batches(
        loaded, subset, max_batches,
        max_tokens=cfg.max_tokens_valid if max_tokens is None else max_tokens,
        max_sentences=cfg.batch_size_valid if batch_size is None else batch_size,
        seed=loaded.cfg.common.seed,
        ignore_invalid_inputs=cfg.skip_invalid_size_inputs_valid_test,
        required_batch_size_multiple=cfg.required_batch_size_multiple,
    )  # fmt: skip
    model, criterion = loaded.model.to(device), loaded.criterion.to(device)

    def criterion_loss(model_: nn.Module, sample) -> Tuple[Tensor, float]:
        on_device = utils.apply_to_sample(lambda t: t.to(device), sample)
        loss, sample_size, _ = criterion(model_, on_device)
        return loss, sample_size

    return model, batches, criterion_loss


def measure_checkpoint(
    checkpoint: str, data_bin: str, rho: float, subset: str = DEFAULT_SUBSET,
    max_batches: int = DEFAULT_MAX_BATCHES, measures: Sequence[str] = MEASURES,
    eta: float = DEFAULT_ETA, normalize_biases: bool = False, steps: int = DEFAULT_STEPS,
    device: str = "cpu", max_tokens: Optional[int] = None, batch_size: Optional[int] = None,
) -> Dict[str, Any]:  # fmt: skip
    """Adaptive and/or plain sharpness of a fairseq checkpoint on its data: a JSON-ready dict.
    Every argument is checked before the checkpoint is loaded."""
    torch_device = check_measurement(checkpoint, data_bin, dict(locals()))
    model, batches, loss_fn = load_subset(
        checkpoint, data_bin, subset, max_batches, torch_device, max_tokens, batch_size
    )
    settings = (eta, normalize_biases, steps)
    estimates = [
        estimate_sharpness(model, batches, loss_fn, rho, m == "adaptive", *settings)
        for m in measures
    ]
    return {
        "checkpoint": checkpoint, "data": data_bin, "subset": subset, "device": str(torch_device),
        "estimates": [dataclasses.asdict(e) for e in estimates],
    }  # fmt: skip


def format_sharpness(report: Dict[str, Any]) -> str:
    """The report as a small text table."""
    estimates = report["estimates"]
    lines = [
        f"{report['checkpoint']} on {report['subset']} of {report['data']}: "
        f"{estimates[0]['num_batches']} batches, sample size {estimates[0]['sample_size']:g}; "
        "losses per sample-size unit (nats)",
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


# ---------------------------------------------------------------------- fairseq-asam-sharpness


# The command's arguments: name -> argparse keywords.
ARGUMENTS = {
    "checkpoint": dict(help="fairseq checkpoint (.pt)"),
    "data": dict(help="the checkpoint's data-bin folder"),
    "--rho": dict(type=float, required=True, help="radius of the ball |T^-1 eps| <= rho"),
    "--subset": dict(default=DEFAULT_SUBSET, help="split to measure on"),
    "--max-batches": dict(
        type=int, default=DEFAULT_MAX_BATCHES, help="the subset's first M batches"
    ),
    "--measures": dict(nargs="+", default=list(MEASURES), help="adaptive (T = |w| + eta), plain"),
    "--eta": dict(type=float, default=DEFAULT_ETA, help="eta in T = |w| + eta"),
    "--normalize-biases": dict(action="store_true", help="T = |w| + eta on biases too"),
    "--steps": dict(type=int, default=DEFAULT_STEPS, help="K ascent steps (1: SAM/ASAM's one)"),
    "--device": dict(help="cpu, cuda or cuda:N (default: cuda if there is one, else cpu)"),
    "--max-tokens": dict(type=int, help="batch size in tokens (default: the checkpoint's)"),
    "--batch-size": dict(type=int, help="batch size in sentences (default: the checkpoint's)"),
    "--json": dict(help="also write the report to this JSON file (atomically)"),
}


def parser() -> argparse.ArgumentParser:
    description = "Sharpness and adaptive sharpness of a fairseq checkpoint on its data."
    p = argparse.ArgumentParser(prog=PROGRAM, description=description)
    for name, keywords in ARGUMENTS.items():
        p.add_argument(name, **keywords)
    return p


def work(args: argparse.Namespace) -> int:
    from .files import write_json

    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        raise SettingError(f"--json {args.json}: its folder does not exist")
    options = {k: v for k, v in vars(args).items() if k not in ("checkpoint", "data", "json")}
    options["device"] = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    report = measure_checkpoint(args.checkpoint, args.data, **options)
    print(format_sharpness(report))
    if args.json:
        write_json(args.json, report)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    from .cli import run_command
    from .logs import log_to_stdout

    args = parser().parse_args(argv)
    log_to_stdout(logging.WARNING)
    return run_command(PROGRAM, lambda: work(args))
