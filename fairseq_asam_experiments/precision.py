"""How much of the SAM/ASAM perturbation ε survives low-precision weights and autocast.

The optimizer (fairseq_asam.perturbation) adds ε = ρ·T²g/‖Tg‖₂ to the model's own parameters.
With fairseq `--fp16` (or bf16) those parameters are fp16 (bf16) tensors, so what pass 2 sees
is not w + ε but round_p(w_p + ε), with w_p the weights as the low-precision model holds them.
This module measures, for one model and fixed batches:

    ε        = the plugin's ε (perturbation.perturb) from the fp32 gradient at w_p
               (w_p promoted to fp32; eval mode, dropout off), per batch
    ε_eff    = round_p(w_p + ε) − w_p               computed in fp32 from the two weight tensors
    lost     = #{i : ε_i ≠ 0 and ε_eff,i = 0} / #{i : ε_i ≠ 0}
    cosine   = <ε_eff, ε> / (‖ε_eff‖ ‖ε‖),  L2 error = ‖ε_eff − ε‖ / ‖ε‖   (float64 sums)
    ΔL       = L(w_p + ε_eff) − L(w_p)              the loss increase pass 2 actually gets

What training uses is pass 2's gradient, so it is compared too (fp32 arithmetic):
    Δg       = ∇L(w_p + ε_eff) − ∇L(w_p)  against  ∇L(w_p + ε) − ∇L(w_p)   (cosine, L2 error)
    g' error = ‖∇L(w_p + ε_eff) − ∇L(w_p + ε)‖ / ‖∇L(w_p + ε)‖              (what Adam receives)

L is the criterion's loss per sample-size unit (label-smoothed cross-entropy: nats per target
token) on the batch, in eval mode.  "(a)" losses use fp32 arithmetic at the (rounded) weights,
which isolates weight storage; "(b)" losses use the real low-precision forward: a copy of the
model cast to fp16/bf16, or fp32 weights under torch.autocast.

Rounding variants of round_p(· + ε):
    nearest       round to nearest even, what `p.add_(ε)` on an fp16/bf16 tensor does
    stochastic    unbiased stochastic rounding of w_p + ε (E[result] = w_p + ε); its noise grows
                  with |ε| (variance |ε_i|·ulp_i − ε_i² per entry), so the control
    sign-control  stochastic rounding of w_p + s⊙ε, s random ±1: the same noise, no direction
    sr-master     stochastic rounding of w + ε, w the fp32 master weights (fairseq's FP16Optimizer
                  keeps them): up to one ulp of noise on every entry, so the control
    noise-floor   stochastic rounding of w alone (ε = 0).  Its ε_eff = SR(w) − w_p has mean
                  w − w_p (w_p's own rounding residual, the same for every seed), plus the noise

Autocast (`--amp`): the weights stay fp32 (w_p = w) and each matmul-type op casts its operands to
fp16/bf16 (round to nearest).  Which parameters reach a low-precision op is recorded by running
the forward under autocast (`autocast_cast_parameters`); for those ε_eff = round_p(w + ε) −
round_p(w), for the others ε_eff = (w + ε) − w in fp32.  A parameter used by both kinds of op
(the shared decoder embedding: fp32 lookup, fp16 output projection) counts as cast.
"""

import copy
import dataclasses
import math
import os
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import torch
from torch import Tensor, nn

from fairseq_asam.perturbation import is_adaptive, perturb

from . import loading, recipe
from .errors import SettingError

# ------------------------------------------------------------------ settings


@dataclasses.dataclass(frozen=True)
class OptimizerSetting:
    name: str
    rho: float
    eta: float
    adaptive: bool


# The paper's IWSLT'14 settings (Kwon et al., ICML 2021, Table 4).
SAM = OptimizerSetting("sam", rho=0.1, eta=0.0, adaptive=False)
ASAM = OptimizerSetting("asam", rho=0.2, eta=0.01, adaptive=True)
PAPER_OPTIMIZERS = (SAM, ASAM)

# Weight storage precisions: the dtype of the model's parameters.
WEIGHT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Autocast modes: fp32 weights, matmul operands cast per op.
AUTOCAST_DTYPES = {"amp-fp16": torch.float16, "amp-bf16": torch.bfloat16}

NEAREST = "nearest"
STOCHASTIC = "stochastic"
SIGN_CONTROL = "sign-control"
SR_MASTER = "sr-master"
NOISE_FLOOR = "noise-floor"
STOCHASTIC_VARIANTS = (STOCHASTIC, SIGN_CONTROL, SR_MASTER, NOISE_FLOOR)

RECIPE_MAX_TOKENS = 4096  # the IWSLT'14 recipe's --max-tokens: one micro-batch
DEFAULT_SR_SEEDS = 5
# Stochastic-rounding seeds whose pass-2 gradient is also compared (a forward-backward each).
DEFAULT_GRADIENT_SEEDS = 2
DEFAULT_SUBSET = "train"  # ε is computed on training micro-batches
# Seed offsets, so that the stochastic variants of one seed draw independent numbers.
_SEED_STRIDE = 1000
_VARIANT_SEED_OFFSET = {STOCHASTIC: 1, SIGN_CONTROL: 2, SR_MASTER: 3, NOISE_FLOOR: 4}
_SIGN_SEED_OFFSET = 5


def _dtype(name: str, table: Dict[str, torch.dtype], flag: str) -> torch.dtype:
    if name not in table:
        raise SettingError(f"{flag} must be one of {', '.join(table)}, got {name!r}")
    return table[name]


# ------------------------------------------------------------------ rounding


def _check_finite(rounded: Tensor, source: Tensor, dtype: torch.dtype) -> None:
    if not bool(torch.isfinite(rounded).all()) and bool(torch.isfinite(source).all()):
        raise OverflowError(
            f"a value overflows {dtype} (largest finite {torch.finfo(dtype).max:g})"
        )


def round_nearest(x: Tensor, dtype: torch.dtype) -> Tensor:
    """x rounded to nearest (ties to even) in `dtype`, held in fp32."""
    rounded = x.float().to(dtype)
    _check_finite(rounded, x, dtype)
    return rounded.float()


def stochastic_round(
    x: Tensor, dtype: torch.dtype, generator: Optional[torch.Generator] = None
) -> Tensor:
    """Unbiased stochastic rounding of fp32 `x` to `dtype`, held in fp32.

    Each entry becomes one of its two neighbours in `dtype`, lo <= x <= hi, the upper one with
    probability (x − lo) / (hi − lo), so E[result] = x (up to fp32 rounding of that probability);
    values representable in `dtype` come back unchanged.
    """
    x = x.float()
    if dtype == torch.float32:
        return x.clone()
    nearest = x.to(dtype)
    _check_finite(nearest, x, dtype)
    nearest_f = nearest.float()
    # The neighbour on the other side of x (where x is exact it is never chosen: probability 0).
    toward = torch.where(x >= nearest_f, math.inf, -math.inf).to(dtype)
    other = torch.nextafter(nearest, toward)
    other_f = other.float()
    gap = (other_f - nearest_f).abs()  # exact: neighbours in dtype differ by one ulp
    # |x − nearest| <= gap / 2, so this is the probability of moving to `other`, in [0, 1/2].
    prob_other = torch.where(gap > 0, (x - nearest_f).abs() / gap, torch.zeros_like(x))
    uniform = torch.rand(x.shape, generator=generator, dtype=torch.float32)
    return torch.where(uniform < prob_other, other_f, nearest_f)


def round_to(
    x: Tensor, dtype: torch.dtype, rounding: str, generator: Optional[torch.Generator] = None
) -> Tensor:
    if rounding == NEAREST:
        return round_nearest(x, dtype)
    if rounding == STOCHASTIC:
        return stochastic_round(x, dtype, generator)
    raise SettingError(f"rounding must be {NEAREST!r} or {STOCHASTIC!r}, got {rounding!r}")


def effective_epsilon(
    held: Sequence[Tensor],
    epsilon: Sequence[Tensor],
    dtype: torch.dtype,
    rounding: str = NEAREST,
    generator: Optional[torch.Generator] = None,
    start: Optional[Sequence[Tensor]] = None,
) -> List[Tensor]:
    """round_p(start + ε) − held, tensor by tensor, in fp32 (start defaults to held).

    `held` are the weights as the model holds them (representable in `dtype`); `start` lets the
    rounding begin from other weights, e.g. the fp32 master copy (sr-master).
    """
    start = held if start is None else start
    return [
        round_to(s.float() + e.float(), dtype, rounding, generator) - h.float()
        for h, s, e in zip(held, start, epsilon)
    ]


def sharpness_epsilon(
    names: Sequence[str],
    weights: Sequence[Tensor],
    grads: Sequence[Tensor],
    setting: OptimizerSetting,
) -> List[Tensor]:
    """The plugin's ε = ρ·T²g/‖Tg‖₂ (perturbation.perturb on fp32 copies), one tensor per weight."""
    params = [w.detach().float().clone() for w in weights]
    eps = [
        g.detach().float().clone() for g in grads
    ]  # perturb turns fp32 gradients into ε in place
    saved = perturb(
        params, eps, [is_adaptive(n, setting.adaptive) for n in names], setting.rho, setting.eta
    )
    if saved is None:
        raise FloatingPointError(f"‖T g‖ is not finite for {setting.name}: no ε")
    return eps


# ------------------------------------------------------------------ comparing ε


@dataclasses.dataclass
class EpsilonStats:
    numel: int
    nonzero: int  # entries with ε ≠ 0
    lost: int  # of those, entries with ε_eff = 0
    changed: int  # entries with ε_eff ≠ 0 (also where ε = 0: rounding noise)
    intended_sq: float  # ‖ε‖²
    effective_sq: float  # ‖ε_eff‖²
    dot: float  # <ε_eff, ε>
    error_sq: float  # ‖ε_eff − ε‖²

    @property
    def lost_fraction(self) -> float:
        return self.lost / self.nonzero if self.nonzero else math.nan

    @property
    def changed_fraction(self) -> float:
        return self.changed / self.numel if self.numel else math.nan

    @property
    def cosine(self) -> float:
        denominator = math.sqrt(self.intended_sq * self.effective_sq)
        return self.dot / denominator if denominator > 0 else math.nan

    @property
    def relative_l2_error(self) -> float:
        return math.sqrt(self.error_sq / self.intended_sq) if self.intended_sq > 0 else math.nan

    @property
    def norm_ratio(self) -> float:
        return math.sqrt(self.effective_sq / self.intended_sq) if self.intended_sq > 0 else math.nan

    def __add__(self, other: "EpsilonStats") -> "EpsilonStats":
        return EpsilonStats(
            *(getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self))
        )

    def summary(self) -> Dict[str, float]:
        return {
            "lost_fraction": self.lost_fraction,
            "changed_fraction": self.changed_fraction,
            "cosine": self.cosine,
            "relative_l2_error": self.relative_l2_error,
            "norm_ratio": self.norm_ratio,
            "nonzero": self.nonzero,
            "lost": self.lost,
            "numel": self.numel,
        }


def compare_epsilon(effective: Sequence[Tensor], intended: Sequence[Tensor]) -> EpsilonStats:
    """Lost entries, cosine and relative L2 error of ε_eff against ε, over all tensors
    (float64 sums)."""
    if len(effective) != len(intended):
        raise ValueError(f"{len(effective)} effective tensors for {len(intended)} intended ones")
    total = EpsilonStats(0, 0, 0, 0, 0.0, 0.0, 0.0, 0.0)
    for eff, eps in zip(effective, intended):
        eff, eps = eff.double(), eps.double()
        nonzero = eps != 0
        total = total + EpsilonStats(
            numel=eps.numel(),
            nonzero=int(nonzero.sum()),
            lost=int((nonzero & (eff == 0)).sum()),
            changed=int((eff != 0).sum()),
            intended_sq=float((eps * eps).sum()),
            effective_sq=float((eff * eff).sum()),
            dot=float((eff * eps).sum()),
            error_sq=float(((eff - eps) ** 2).sum()),
        )
    return total


TENSOR_GROUPS = ("embedding", "layer_norm", "linear_weight", "bias")


def tensor_group(name: str) -> str:
    """embedding / layer_norm (weight and bias) / linear_weight / bias (of a linear layer)."""
    if "embed" in name:
        return "embedding"
    if "layer_norm" in name or "layernorm" in name:
        return "layer_norm"
    if name.endswith("bias"):
        return "bias"
    return "linear_weight"


def compare_by_group(
    names: Sequence[str], effective: Sequence[Tensor], intended: Sequence[Tensor]
) -> Dict[str, EpsilonStats]:
    groups: Dict[str, Tuple[List[Tensor], List[Tensor]]] = {}
    for name, eff, eps in zip(names, effective, intended):
        pair = groups.setdefault(tensor_group(name), ([], []))
        pair[0].append(eff)
        pair[1].append(eps)
    return {g: compare_epsilon(*groups[g]) for g in TENSOR_GROUPS if g in groups}


# ------------------------------------------------------------------ autocast


def autocast_supported(dtype: torch.dtype, device: str = "cpu") -> Tuple[bool, str]:
    """Whether torch.autocast on `device` runs a matmul in `dtype`; (ok, reason)."""
    try:
        with torch.autocast(device, dtype=dtype):
            out = torch.ones(2, 2) @ torch.ones(2, 2)
    except (RuntimeError, TypeError, ValueError) as error:  # what torch raises differs by version
        return False, f"torch.autocast({device!r}, dtype={dtype}) failed: {error}"
    if out.dtype != dtype:
        return False, f"torch.autocast({device!r}, dtype={dtype}) ran the matmul in {out.dtype}"
    return True, "supported"


# Ops whose output holds the input's values unchanged (a new storage): a parameter that reaches
# a low-precision op through them (fairseq's attention concatenates the q/k/v biases) is cast.
_VALUE_PRESERVING_OPS = (
    "cat",
    "stack",
    "clone",
    "_unsafe_view",
    "view",
    "reshape",
    "t",
    "transpose",
    "permute",
    "expand",
    "contiguous",
    "alias",
    "detach",
    "slice",
    "select",
    "split",
    "chunk",
    "unsqueeze",
    "squeeze",
)


def autocast_cast_parameters(
    model: nn.Module, run_forward, dtype: torch.dtype, device: str = "cpu"
) -> Set[str]:
    """Names of the parameters that `run_forward()` casts to `dtype` under torch.autocast.

    Records, below the autocast layer, every copy to `dtype` whose source holds a parameter's
    values (the parameter's own storage, or a tensor made from it by a value-preserving op).
    """
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    origin: Dict[int, Set[str]] = {}
    for name, p in model.named_parameters():
        origin.setdefault(p.untyped_storage().data_ptr(), set()).add(name)
    keep_alive: List[Tensor] = []  # derived tensors stay alive: their storage address stays theirs
    cast: Set[str] = set()

    def sources(tensors) -> Set[str]:
        found: Set[str] = set()
        for t in tensors:
            if isinstance(t, Tensor):
                found |= origin.get(t.untyped_storage().data_ptr(), set())
        return found

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            inputs, _ = tree_flatten((args, kwargs))
            packet = func.overloadpacket.__name__
            if packet == "_to_copy" and kwargs.get("dtype") == dtype:
                cast.update(sources(inputs[:1]))
            elif packet in _VALUE_PRESERVING_OPS:
                names = sources(inputs)
                if names:
                    for t in tree_flatten(out)[0]:
                        if isinstance(t, Tensor):
                            origin.setdefault(t.untyped_storage().data_ptr(), set()).update(names)
                            keep_alive.append(t)
            return out

    with torch.no_grad(), torch.autocast(device, dtype=dtype), Recorder():
        run_forward()
    return cast


# ------------------------------------------------------------------ fairseq model and batches


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def init_model(data_bin: str, seed: int, args_files: Sequence[str] = (recipe.RECIPE_ARGS,)):
    """A model initialised by torch.manual_seed(seed) from the recipe's argument files."""
    options = recipe.training_options(args_files, "adam")
    argv = recipe.merge_options(options, [("--seed", str(seed)), ("--cpu", None)])
    return loading.build_from_args([data_bin, *argv])


def fixed_batches(loaded: loading.Loaded, subset: str, max_tokens: int, count: int, seed: int):
    """The first `count` batches of `subset` in fairseq's shuffled batch order for `seed`
    (length-bucketed batches, as training draws them; the same for every call)."""
    batches = loading.split_batches(
        loaded, subset, count, True, max_tokens=max_tokens, seed=seed, ignore_invalid_inputs=True
    )
    if len(batches) < count:
        raise SettingError(f"--batches {count}: subset {subset!r} has only {len(batches)} batches")
    return batches


class LossProbe:
    """Losses and gradients of one model on one batch at given weights (eval mode, dropout off).

    The probe owns the model's parameters: `loss(values)` writes `values` into them.  Low-precision
    copies of the model (for the real fp16/bf16 forward) are made on first use.
    """

    def __init__(self, model: nn.Module, criterion: nn.Module, batch: Any):
        self.model, self.criterion, self.batch = model.eval(), criterion.eval(), batch
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self._copies: Dict[torch.dtype, Tuple[nn.Module, List[Tensor]]] = {}

    def weights(self) -> List[Tensor]:
        return [p.detach().float().clone() for p in self.params]

    @staticmethod
    def _write(params: Sequence[Tensor], values: Sequence[Tensor]) -> None:
        with torch.no_grad():
            for p, v in zip(params, values):
                p.copy_(v)

    def _mean_loss(self, model: nn.Module) -> float:
        loss, sample_size, _ = self.criterion(model, self.batch)
        value = float(loss.detach().double()) / float(sample_size)
        if not math.isfinite(value):
            raise FloatingPointError("the loss is not finite")
        return value

    def loss(
        self, values: Sequence[Tensor], dtype: torch.dtype = torch.float32, autocast: bool = False
    ) -> float:
        """L at weights `values`: fp32 arithmetic (default), the model cast to `dtype`, or fp32
        weights with `autocast` to `dtype`."""
        if dtype != torch.float32 and not autocast:
            if dtype not in self._copies:
                low = copy.deepcopy(self.model).to(dtype).eval()
                self._copies[dtype] = (
                    low,
                    [p for _, p in low.named_parameters() if p.requires_grad],
                )
            model, params = self._copies[dtype]
        else:
            model, params = self.model, self.params
        self._write(params, values)
        with torch.no_grad():
            if autocast:
                with torch.autocast(_device_of(model).type, dtype=dtype):
                    return self._mean_loss(model)
            return self._mean_loss(model)

    def loss_and_gradient(self, values: Sequence[Tensor]) -> Tuple[float, List[Tensor]]:
        """(L, ∇L of the summed loss) at `values`, fp32."""
        self._write(self.params, values)
        loss, sample_size, _ = self.criterion(self.model, self.batch)
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        grads = [
            torch.zeros_like(p) if g is None else g.detach().float()
            for p, g in zip(self.params, grads)
        ]
        return float(loss.detach().double()) / float(sample_size), grads

    def cast_parameters(self, dtype: torch.dtype) -> Set[str]:
        return autocast_cast_parameters(
            self.model,
            lambda: self.criterion(self.model, self.batch),
            dtype,
            _device_of(self.model).type,
        )


# ------------------------------------------------------------------ the measurement


def _add(a: Sequence[Tensor], b: Sequence[Tensor]) -> List[Tensor]:
    return [x + y for x, y in zip(a, b)]


def _generator(seed: int, variant: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * _SEED_STRIDE + _VARIANT_SEED_OFFSET[variant])


def _random_signs(like: Sequence[Tensor], seed: int) -> List[Tensor]:
    g = torch.Generator().manual_seed(seed * _SEED_STRIDE + _SIGN_SEED_OFFSET)
    return [torch.randint(0, 2, t.shape, generator=g).float() * 2 - 1 for t in like]


def _row(
    optimizer: str,
    mode: str,
    precision: str,
    rounding: str,
    seed: Optional[int],
    stats: EpsilonStats,
    base_a: float,
    perturbed_a: float,
    target_increase: float,
    base_b: Optional[float] = None,
    perturbed_b: Optional[float] = None,
    gradient: Optional[Tuple[EpsilonStats, EpsilonStats]] = None,
    groups: Optional[Dict[str, EpsilonStats]] = None,
) -> Dict[str, Any]:
    row = {
        "optimizer": optimizer,
        "mode": mode,
        "precision": precision,
        "rounding": rounding,
        "seed": seed,
        **stats.summary(),
        "loss_a": base_a,
        "perturbed_loss_a": perturbed_a,
        "increase_a": perturbed_a - base_a,
        "target_increase": target_increase,
        "increase_b": None if base_b is None else perturbed_b - base_b,
        "loss_b": base_b,
        # pass 2's gradient: Δg = ∇L(w_p + ε_eff) − ∇L(w_p) against ∇L(w_p + ε) − ∇L(w_p), and the
        # whole gradient ∇L(w_p + ε_eff) against ∇L(w_p + ε)
        "grad_change_cosine": None if gradient is None else gradient[0].cosine,
        "grad_change_error": None if gradient is None else gradient[0].relative_l2_error,
        "grad_error": None if gradient is None else gradient[1].relative_l2_error,
    }
    if groups is not None:
        row["groups"] = {
            g: {
                **s.summary(),
                "epsilon_sq_share": s.intended_sq / stats.intended_sq
                if stats.intended_sq
                else math.nan,
                "kept_sq_share": s.effective_sq / stats.effective_sq
                if stats.effective_sq
                else math.nan,
            }
            for g, s in groups.items()
        }
    return row


def _difference(a: Sequence[Tensor], b: Sequence[Tensor]) -> List[Tensor]:
    return [x - y for x, y in zip(a, b)]


def measure_batch(
    probe: LossProbe,
    optimizers: Sequence[OptimizerSetting] = PAPER_OPTIMIZERS,
    weight_precisions: Sequence[str] = tuple(WEIGHT_DTYPES),
    autocast_modes: Sequence[str] = tuple(AUTOCAST_DTYPES),
    sr_seeds: int = DEFAULT_SR_SEEDS,
    real_forward: bool = True,
    gradient_seeds: int = DEFAULT_GRADIENT_SEEDS,
    log=None,
) -> Dict[str, Any]:
    """Every row (optimizer × weight precision × rounding [× seed], optimizer × autocast mode) for
    the probe's batch.  The model's weights are restored before returning.

    `gradient_seeds`: pass 2's gradient (fp32 arithmetic) is also compared, for the
    round-to-nearest rows and the first `gradient_seeds` seeds of the stochastic ones (one
    forward-backward each); < 0 turns it off.
    """
    say = log or (lambda message: None)
    with_gradients = gradient_seeds >= 0
    master = probe.weights()  # w, fp32
    rows: List[Dict[str, Any]] = []
    info: Dict[str, Any] = {"autocast": {}}
    try:
        loss_w = probe.loss(master)
        info["loss_fp32"] = loss_w
        fp32_epsilon: Dict[str, List[Tensor]] = {}
        for precision in weight_precisions:
            dtype = _dtype(precision, WEIGHT_DTYPES, "--precisions")
            low = dtype != torch.float32
            held = [round_nearest(w, dtype) for w in master] if low else master
            base_a = probe.loss(held)
            base_b = probe.loss(held, dtype) if real_forward and low else None
            _, grads = probe.loss_and_gradient(held)
            say(
                f"{precision}: L(w_p) = {base_a:.6f} (fp32 arithmetic)"
                + ("" if base_b is None else f", {base_b:.6f} ({precision} forward)")
            )

            def measure(
                setting,
                rounding,
                seed,
                eff,
                eps,
                target,
                target_grad,
                gradient,
                groups=False,
                losses=None,
            ):
                weights = _add(held, eff)
                loss_a, loss_b = losses or (
                    probe.loss(weights),
                    probe.loss(weights, dtype) if base_b is not None else None,
                )
                grad_stats = None
                if gradient and target_grad is not None:
                    _, perturbed_grad = probe.loss_and_gradient(weights)
                    grad_stats = (
                        compare_epsilon(
                            _difference(perturbed_grad, grads), _difference(target_grad, grads)
                        ),
                        compare_epsilon(perturbed_grad, target_grad),
                    )
                rows.append(
                    _row(
                        setting.name,
                        "weights",
                        precision,
                        rounding,
                        seed,
                        compare_epsilon(eff, eps),
                        base_a,
                        loss_a,
                        target,
                        base_b,
                        loss_b,
                        grad_stats,
                        compare_by_group(probe.names, eff, eps) if groups else None,
                    )
                )

            # The noise floor: SR of the fp32 master weights with ε = 0.  Its losses are measured
            # once per seed; its ε_eff is drawn again (same generator) for every comparison.
            zeros = [torch.zeros_like(w) for w in master]

            def noise_floor(seed: int) -> List[Tensor]:
                return effective_epsilon(
                    held, zeros, dtype, STOCHASTIC, _generator(seed, NOISE_FLOOR), start=master
                )

            noise_losses = {}
            if low:
                for seed in range(sr_seeds):
                    weights = _add(held, noise_floor(seed))
                    noise_losses[seed] = (
                        probe.loss(weights),
                        probe.loss(weights, dtype) if base_b is not None else None,
                    )
            for setting in optimizers:
                eps = sharpness_epsilon(probe.names, held, grads, setting)
                if not low:
                    fp32_epsilon[setting.name] = eps
                # the targets: L(w_p + ε) − L(w_p) and ∇L(w_p + ε), fp32 arithmetic
                if with_gradients and low:
                    perturbed_loss, target_grad = probe.loss_and_gradient(_add(held, eps))
                else:
                    perturbed_loss, target_grad = probe.loss(_add(held, eps)), None
                target = perturbed_loss - base_a
                measure(
                    setting,
                    NEAREST,
                    None,
                    effective_epsilon(held, eps, dtype, NEAREST),
                    eps,
                    target,
                    target_grad,
                    with_gradients,
                    groups=True,
                )
                say(
                    f"{precision} {setting.name} nearest: lost {rows[-1]['lost_fraction']:.4f} "
                    f"cos {rows[-1]['cosine']:.4f} dL {rows[-1]['increase_a']:.3e} "
                    f"(target {target:.3e})"
                )
                if not low:
                    continue
                for seed in range(sr_seeds):
                    gradient = with_gradients and seed < gradient_seeds
                    signs = _random_signs(eps, seed)
                    measure(
                        setting,
                        STOCHASTIC,
                        seed,
                        effective_epsilon(
                            held, eps, dtype, STOCHASTIC, _generator(seed, STOCHASTIC)
                        ),
                        eps,
                        target,
                        target_grad,
                        gradient,
                    )
                    measure(
                        setting,
                        SIGN_CONTROL,
                        seed,
                        effective_epsilon(
                            held,
                            [s * e for s, e in zip(signs, eps)],
                            dtype,
                            STOCHASTIC,
                            _generator(seed, SIGN_CONTROL),
                        ),
                        eps,
                        target,
                        target_grad,
                        gradient,
                    )
                    measure(
                        setting,
                        SR_MASTER,
                        seed,
                        effective_epsilon(
                            held, eps, dtype, STOCHASTIC, _generator(seed, SR_MASTER), start=master
                        ),
                        eps,
                        target,
                        target_grad,
                        gradient,
                    )
                    measure(
                        setting,
                        NOISE_FLOOR,
                        seed,
                        noise_floor(seed),
                        eps,
                        target,
                        target_grad,
                        gradient,
                        losses=noise_losses[seed],
                    )
                say(f"{precision} {setting.name}: {sr_seeds} stochastic-rounding seeds done")
                del target_grad
        for mode in autocast_modes:
            dtype = _dtype(mode, AUTOCAST_DTYPES, "--autocast")
            ok, reason = autocast_supported(dtype, _device_of(probe.model).type)
            info["autocast"][mode] = {"supported": ok, "reason": reason}
            if not ok:
                say(f"{mode}: skipped, {reason}")
                continue
            cast = probe.cast_parameters(dtype)
            info["autocast"][mode]["cast_parameters"] = len(cast)
            info["autocast"][mode]["parameters"] = len(probe.names)
            is_cast = [n in cast for n in probe.names]
            held = [round_nearest(w, dtype) if c else w for w, c in zip(master, is_cast)]
            base_a = probe.loss(held)
            base_b = probe.loss(master, dtype, autocast=True) if real_forward else None
            for setting in optimizers:
                eps = fp32_epsilon.get(setting.name)
                if eps is None:
                    _, grads = probe.loss_and_gradient(master)
                    eps = fp32_epsilon[setting.name] = sharpness_epsilon(
                        probe.names, master, grads, setting
                    )
                target = probe.loss(_add(master, eps)) - loss_w
                eff = [
                    round_nearest(w + e, dtype) - h if c else (w + e) - w
                    for w, e, h, c in zip(master, eps, held, is_cast)
                ]
                rows.append(
                    _row(
                        setting.name,
                        "autocast",
                        mode,
                        NEAREST,
                        None,
                        compare_epsilon(eff, eps),
                        base_a,
                        probe.loss(_add(held, eff)),
                        target,
                        base_b,
                        probe.loss(_add(master, eps), dtype, autocast=True)
                        if base_b is not None
                        else None,
                        groups=compare_by_group(probe.names, eff, eps),
                    )
                )
                say(
                    f"{mode} {setting.name}: lost {rows[-1]['lost_fraction']:.4f} "
                    f"cos {rows[-1]['cosine']:.4f}"
                )
    finally:
        LossProbe._write(probe.params, master)
    return {"rows": rows, **info}


# ------------------------------------------------------------------ summaries


def _spread(values: Sequence[float]) -> Dict[str, float]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    mean = sum(values) / len(values)
    std = (
        math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        if len(values) > 1
        else 0.0
    )
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": len(values)}


SUMMARY_METRICS = (
    "lost_fraction",
    "changed_fraction",
    "cosine",
    "relative_l2_error",
    "norm_ratio",
    "increase_a",
    "increase_b",
    "target_increase",
    "grad_change_cosine",
    "grad_change_error",
    "grad_error",
)


def summarize_precision_rows(rows: Iterable[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One entry per (optimizer, mode, precision, rounding): mean/std/min/max of every metric over
    seeds and batches, in first-seen order."""
    grouped: Dict[Tuple, List[Dict[str, Any]]] = {}
    for row in rows:
        grouped.setdefault(
            (row["optimizer"], row["mode"], row["precision"], row["rounding"]), []
        ).append(row)
    out = []
    for (optimizer, mode, precision, rounding), members in grouped.items():
        entry = {
            "optimizer": optimizer,
            "mode": mode,
            "precision": precision,
            "rounding": rounding,
            "count": len(members),
        }
        for metric in SUMMARY_METRICS:
            entry[metric] = _spread([m[metric] for m in members])
        out.append(entry)
    return out


def _cell(spread: Dict[str, float], fmt: str, with_std: bool) -> str:
    if spread["n"] == 0:
        return "-"
    text = format(spread["mean"], fmt)
    if with_std and spread["n"] > 1:
        text += "±" + format(spread["std"], fmt.replace("+", ""))
    return text


def format_summary(summary: Sequence[Dict[str, Any]]) -> str:
    """A markdown table: ΔL in nats per target token; ± is the std over seeds (and batches).

    Δg = ∇L(w_p + ε_eff) − ∇L(w_p) against ∇L(w_p + ε) − ∇L(w_p) (cosine, relative L2 error);
    g' err = ‖∇L(w_p + ε_eff) − ∇L(w_p + ε)‖ / ‖∇L(w_p + ε)‖, the gradient Adam would get.
    """
    lines = [
        (
            "| optimizer | mode | precision | rounding | n | lost | changed | cosine | L2 err "
            "| ‖eff‖/‖ε‖ | ΔL target (fp32 ε) | ΔL (a) fp32 arith | ΔL (b) real fwd "
            "| Δg cosine | Δg err | g' err |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in summary:
        spread = e["count"] > 1
        cells = [
            e["optimizer"],
            e["mode"],
            e["precision"],
            e["rounding"],
            str(e["count"]),
            _cell(e["lost_fraction"], ".4f", spread),
            _cell(e["changed_fraction"], ".4f", spread),
            _cell(e["cosine"], ".4f", spread),
            _cell(e["relative_l2_error"], ".3f", spread),
            _cell(e["norm_ratio"], ".3f", spread),
            _cell(e["target_increase"], ".3e", False),
            _cell(e["increase_a"], "+.3e", spread),
            _cell(e["increase_b"], "+.3e", spread),
            _cell(e["grad_change_cosine"], ".4f", spread),
            _cell(e["grad_change_error"], ".3f", spread),
            _cell(e["grad_error"], ".2e", spread),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_groups(rows: Sequence[Dict[str, Any]]) -> str:
    """Per tensor group, for the round-to-nearest rows of the first batch: lost fraction and the
    group's share of ‖ε‖² and of ‖ε_eff‖²."""
    lines = [
        "| optimizer | mode | precision | group | lost | cosine "
        "| share of ‖ε‖² | share of ‖ε_eff‖² |",
        "|---|---|---|---|---|---|---|---|",
    ]
    seen = set()
    for row in rows:
        key = (row["optimizer"], row["mode"], row["precision"])
        if "groups" not in row or key in seen or row["precision"] == "fp32":
            continue
        seen.add(key)
        for group, s in row["groups"].items():
            lines.append(
                f"| {row['optimizer']} | {row['mode']} | {row['precision']} | {group} "
                f"| {s['lost_fraction']:.4f} | {s['cosine']:.4f} | {s['epsilon_sq_share']:.4f} "
                f"| {s['kept_sq_share']:.4f} |"
            )
    return "\n".join(lines)


# ------------------------------------------------------------------ the whole run


def check_precision_inputs(
    data_bin: str,
    checkpoint: Optional[str],
    init: bool,
    batches: int,
    max_tokens: int,
    sr_seeds: int,
    subset: str,
) -> None:
    """Raises SettingError naming the flag or the file."""
    if init == (checkpoint is not None):
        raise SettingError("give exactly one of --checkpoint PATH and --init")
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise SettingError(f"--checkpoint: file not found: {checkpoint}")
    loading.check_split(data_bin, subset)
    for flag, value, minimum in (
        ("--batches", batches, 1),
        ("--max-tokens", max_tokens, 1),
        ("--sr-seeds", sr_seeds, 0),
    ):
        if value < minimum:
            raise SettingError(f"{flag} must be >= {minimum}, got {value}")


def run(
    data_bin: str,
    checkpoint: Optional[str] = None,
    init: bool = False,
    seed: int = 1,
    batches: int = 1,
    max_tokens: int = RECIPE_MAX_TOKENS,
    sr_seeds: int = DEFAULT_SR_SEEDS,
    subset: str = DEFAULT_SUBSET,
    real_forward: bool = True,
    gradient_seeds: int = DEFAULT_GRADIENT_SEEDS,
    weight_precisions: Sequence[str] = tuple(WEIGHT_DTYPES),
    autocast_modes: Sequence[str] = tuple(AUTOCAST_DTYPES),
    log=None,
) -> Dict[str, Any]:
    """Loads (or initialises) the model, measures `batches` fixed batches; a JSON-ready dict."""
    check_precision_inputs(data_bin, checkpoint, init, batches, max_tokens, sr_seeds, subset)
    for name in weight_precisions:
        _dtype(name, WEIGHT_DTYPES, "--precisions")
    for name in autocast_modes:
        _dtype(name, AUTOCAST_DTYPES, "--autocast")
    if init:
        loaded = init_model(data_bin, seed)
    else:
        loaded = loading.load_checkpoint(checkpoint, data_bin, subset)
    model, criterion, cfg = loaded.model, loaded.criterion, loaded.cfg
    samples = fixed_batches(loaded, subset, max_tokens, batches, seed)
    results = []
    for index, sample in enumerate(samples):
        if log:
            log(
                f"batch {index}: {int(sample['ntokens'])} target tokens, "
                f"{int(sample['nsentences'])} sentences"
            )
        result = measure_batch(
            LossProbe(model, criterion, sample),
            weight_precisions=weight_precisions,
            autocast_modes=autocast_modes,
            sr_seeds=sr_seeds,
            real_forward=real_forward,
            gradient_seeds=gradient_seeds,
            log=log,
        )
        result["batch"] = index
        result["ntokens"] = int(sample["ntokens"])
        results.append(result)
    rows = [r for result in results for r in result["rows"]]
    return {
        "source": "init" if init else checkpoint,
        "data_bin": data_bin,
        "arch": getattr(cfg.model, "arch", None),
        "criterion": getattr(cfg.criterion, "_name", None),
        "parameters": sum(p.numel() for p in model.parameters()),
        "seed": seed,
        "subset": subset,
        "max_tokens": max_tokens,
        "sr_seeds": sr_seeds,
        "gradient_seeds": gradient_seeds,
        "batches": [{k: v for k, v in r.items() if k != "rows"} for r in results],
        "rows": rows,
        "summary": summarize_precision_rows(rows),
    }


def format_result(result: Dict[str, Any]) -> str:
    """The header, the summary table and the per-group table, as the command prints them."""
    batches = result["batches"]
    lines = [
        f"{result['source']}: {result['arch']}, {result['parameters']:,} parameters, criterion "
        f"{result['criterion']}; {len(batches)} batch(es) of "
        f"{', '.join(str(b['ntokens']) for b in batches)} target tokens from {result['subset']}; "
        f"L(w) = {batches[0]['loss_fp32']:.5f} nats/token (first batch)"
    ]
    for mode, status in batches[0]["autocast"].items():
        extra = (
            f", {status['cast_parameters']} of {status['parameters']} parameter tensors cast"
            if status.get("supported")
            else ""
        )
        lines.append(f"{mode}: {status['reason']}{extra}")
    lines += ["", format_summary(result["summary"]), "", format_groups(result["rows"])]
    lines.append(f"\nwall time {result['wall_seconds']:.0f} s")
    return "\n".join(lines)
