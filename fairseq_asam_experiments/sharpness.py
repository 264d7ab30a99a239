"""Sharpness and adaptive sharpness of a trained model, as a measurement.

Definitions (Foret et al., ICLR 2021; Kwon et al., ICML 2021, Definition 3):

    S_ρ(w) = max_{‖T⁻¹ε‖₂ <= ρ} L(w + ε) − L(w)
    adaptive: T = diag(|w| + η) on the tensors whose name contains "weight" (as the ASAM
              optimizer, `perturbation.is_adaptive`), or on every tensor with
              `normalize_biases`; T = 1 on the others
    plain:    T = I (SAM's neighbourhood ‖ε‖₂ <= ρ)

T is fixed at the measured w.  L is the mean loss over a fixed list of batches:
Σ_B loss_B / Σ_B sample_size_B, each `loss_fn(model, B)` returning the loss summed over B and
B's sample size (fairseq: the criterion's summed loss and its sample_size, so L is in nats per
target token for cross-entropy criteria; fairseq's logs show L / ln 2).  Gradients are
accumulated batch by batch, so memory does not grow with the number of batches.

Estimator: projected gradient ascent in the T-scaled space δ = T⁻¹ε, i.e. over the ball
‖δ‖₂ <= ρ, where the gradient of δ ↦ L(w + Tδ) is T ∇L(w + Tδ):

    δ₀ = 0
    u_k = T g_k / ‖T g_k‖₂,  g_k = ∇L(w + T δ_{k−1})     (steepest ascent direction in δ)
    δ_k = Π(δ_{k−1} + α u_k),  α = ρ                        Π(δ) = δ · min(1, ρ / ‖δ‖₂)
    ε* = T δ_k for the k in 1..K with the highest L(w + T δ_k)

K = 1 gives ε* = ρ T² g / ‖T g‖₂, exactly the one-step estimate of SAM/ASAM.  Every later
step moves at most ρ in δ-space (at most 45° along the sphere) and is projected back onto the
ball; keeping the best iterate makes the estimate non-decreasing in K.  For a convex loss no
step decreases L (L(δ_k) >= L(δ_{k−1}) + ∇·(δ_k − δ_{k−1}) >= L(δ_{k−1})).  On 300 random 2-D
quadratics (condition numbers up to e⁶) the worst shortfall at K = 30 was about 1% of the true
maximum; a constant step ρ/K fell 36% short, as its path reaches the sphere only if it is
straight.  Every estimate is a lower bound of S_ρ.  A zero T·g ends the ascent (ε stays where
it is); a non-finite T·g or loss raises FloatingPointError.  Cost: K forward-backward passes
and one forward pass over the batches.

With η = 0 and every rescaled tensor normalized, adaptive sharpness is invariant under a
function-preserving rescaling w ↦ S w (S positive diagonal, e.g. W₂ ← a W₂, W₁ ← W₁ / a around a
ReLU): T' = S T, so w' + T'δ = S (w + T δ) and the maximization over δ is the same problem.
"""

import dataclasses
import math
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from fairseq_asam.perturbation import is_adaptive

from . import loading
from .errors import SettingError

MEASURES = ("adaptive", "plain")
DEFAULT_SUBSET = "valid"
DEFAULT_MAX_BATCHES = 20
DEFAULT_ETA = 0.01  # the ASAM optimizer's default
DEFAULT_STEPS = 10
# Length of every ascent step in δ-space, in units of ρ: the first step reaches the sphere.
ASCENT_STEP_IN_RHO = 1.0

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


def _mean_loss_and_gradient(
    model: nn.Module,
    params: List[Tensor],
    batches: Sequence,
    loss_fn: LossFn,
    with_gradient: bool,
    step: int,
) -> Tuple[float, Optional[List[Tensor]], float]:
    """(L, ∇L or None, Σ sample_size) with L = Σ_B loss_B / Σ_B sample_size_B at ascent step `step`.

    One backward per batch into separate buffers: `.grad` of the model is left untouched and
    no graph outlives its batch.
    """
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
def _ascent_step(
    params: List[Tensor],
    origin: List[Tensor],
    scales: List[Optional[Tensor]],
    delta: List[Tensor],
    gradient: List[Tensor],
    rho: float,
    step: int,
) -> Optional[Tuple[float, float]]:
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
    """Estimates S_ρ(w) of `model` (in eval mode) on `batches` by K = `steps` ascent steps.

    `adaptive=False` measures plain sharpness (T = I; `eta`, `normalize_biases` unused).  The
    model's parameters are restored bit for bit, its train/eval mode too.
    """
    check_settings(float(rho), float(eta), int(steps))
    batches = list(batches)
    if not batches:
        raise SettingError("no batches to measure the loss on (check --subset and --max-batches)")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        origin = [p.detach().clone() for p in params]
        scales = [
            p.detach().abs() + eta
            if adaptive and (normalize_biases or is_adaptive(n, adaptive))
            else None
            for n, p in named
        ]
    delta = [torch.zeros_like(p) for p in params]
    step_losses: List[float] = []
    epsilon_norms: List[float] = []
    delta_norms: List[float] = []
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
            step_losses.append(step_loss)
            epsilon_norms.append(norms[0])
            delta_norms.append(norms[1])
    finally:
        with torch.no_grad():
            for p, w in zip(params, origin):
                p.copy_(w)
        model.train(was_training)

    # ε* is the iterate of highest loss (the first of equals); none if the gradient at w is 0
    iterates = zip(step_losses, epsilon_norms, delta_norms, range(1, steps + 1))
    perturbed_loss, epsilon_norm, delta_norm, best_step = max(
        iterates, key=lambda iterate: iterate[0], default=(loss, 0.0, 0.0, 0)
    )
    return SharpnessEstimate(
        measure=MEASURES[0] if adaptive else MEASURES[1],
        rho=float(rho),
        eta=float(eta) if adaptive else None,
        normalize_biases=bool(normalize_biases) if adaptive else False,
        steps=int(steps),
        loss=loss,
        perturbed_loss=perturbed_loss,
        sharpness=perturbed_loss - loss,
        epsilon_norm=epsilon_norm,
        scaled_epsilon_norm=delta_norm,
        best_step=best_step,
        step_losses=step_losses,
        sample_size=sample_size,
        num_batches=len(batches),
    )


# ---------------------------------------------------------------- fairseq checkpoints


def check_measurement(
    checkpoint: str,
    data_bin: str,
    subset: str,
    max_batches: int,
    rho: float,
    eta: float,
    steps: int,
    measures: Sequence[str],
    device: str,
    max_tokens: Optional[int] = None,
    batch_size: Optional[int] = None,
) -> torch.device:
    """Raises SettingError naming the flag or file; returns the device."""
    check_settings(float(rho), float(eta), int(steps))
    for flag, value in (
        ("--max-batches", max_batches),
        ("--max-tokens", max_tokens),
        ("--batch-size", batch_size),
    ):
        if value is not None and value < 1:
            raise SettingError(f"{flag} must be >= 1, got {value}")
    unknown = [m for m in measures if m not in MEASURES]
    if unknown or not measures:
        raise SettingError(
            f"--measures must be some of {', '.join(MEASURES)}, got {', '.join(measures) or 'none'}"
        )
    try:
        torch_device = torch.device(device)
    except RuntimeError as error:
        raise SettingError(f"--device {device!r} is not a device: {error}") from None
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise SettingError(f"--device {device}: CUDA is not available on this machine")
    if torch_device.type == "cuda" and (torch_device.index or 0) >= torch.cuda.device_count():
        raise SettingError(
            f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)"
        )
    if not os.path.isfile(checkpoint):
        raise SettingError(f"checkpoint not found: {checkpoint}")
    loading.check_split(data_bin, subset)
    return torch_device


def load_subset(
    checkpoint: str,
    data_bin: str,
    subset: str,
    max_batches: int,
    device: torch.device,
    max_tokens: Optional[int] = None,
    batch_size: Optional[int] = None,
) -> Tuple[nn.Module, List[Any], LossFn]:
    """The checkpoint's model (eval mode, on `device`), the first `max_batches` batches of
    `subset` in fairseq's fixed validation order, and the checkpoint's criterion as a LossFn.

    Batches are sized by `max_tokens` / `batch_size`, by default the checkpoint's validation
    settings; they stay on the CPU and move to `device` one at a time.
    """
    from fairseq import utils

    loaded = loading.load_checkpoint(checkpoint, data_bin, subset)
    cfg = loaded.cfg.dataset
    batches = loading.split_batches(
        loaded,
        subset,
        max_batches,
        max_tokens=cfg.max_tokens_valid if max_tokens is None else max_tokens,
        max_sentences=cfg.batch_size_valid if batch_size is None else batch_size,
        seed=loaded.cfg.common.seed,
        ignore_invalid_inputs=cfg.skip_invalid_size_inputs_valid_test,
        required_batch_size_multiple=cfg.required_batch_size_multiple,
    )
    model, criterion = loaded.model.to(device), loaded.criterion.to(device)

    def criterion_loss(model_: nn.Module, sample) -> Tuple[Tensor, float]:
        loss, sample_size, _ = criterion(
            model_, utils.apply_to_sample(lambda t: t.to(device), sample)
        )
        return loss, sample_size

    return model, batches, criterion_loss


def measure_checkpoint(
    checkpoint: str,
    data_bin: str,
    rho: float,
    subset: str = DEFAULT_SUBSET,
    max_batches: int = DEFAULT_MAX_BATCHES,
    measures: Sequence[str] = MEASURES,
    eta: float = DEFAULT_ETA,
    normalize_biases: bool = False,
    steps: int = DEFAULT_STEPS,
    device: str = "cpu",
    max_tokens: Optional[int] = None,
    batch_size: Optional[int] = None,
) -> Dict[str, Any]:
    """Adaptive and/or plain sharpness of a fairseq checkpoint on its data; a JSON-ready dict.

    Every argument is checked before the checkpoint is loaded.
    """
    torch_device = check_measurement(
        checkpoint,
        data_bin,
        subset,
        max_batches,
        rho,
        eta,
        steps,
        measures,
        device,
        max_tokens,
        batch_size,
    )
    model, batches, loss_fn = load_subset(
        checkpoint, data_bin, subset, max_batches, torch_device, max_tokens, batch_size
    )
    estimates = [
        estimate_sharpness(
            model, batches, loss_fn, rho, measure == "adaptive", eta, normalize_biases, steps
        )
        for measure in measures
    ]
    return {
        "checkpoint": checkpoint,
        "data": data_bin,
        "subset": subset,
        "device": str(torch_device),
        "estimates": [dataclasses.asdict(e) for e in estimates],
    }


def format_sharpness(report: Dict[str, Any]) -> str:
    """The report as a small text table."""
    estimates = report["estimates"]
    first = estimates[0]
    lines = [
        f"{report['checkpoint']} on {report['subset']} of {report['data']}: "
        f"{first['num_batches']} batches, "
        f"sample size {first['sample_size']:g}; losses per sample-size unit (nats)",
        f"{'measure':<9} {'rho':>7} {'eta':>7} {'K':>3} {'L(w)':>10} {'L(w+eps)':>10} "
        f"{'sharpness':>11} "
        f"{'|eps|':>10} {'|T^-1 eps|':>10}",
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
