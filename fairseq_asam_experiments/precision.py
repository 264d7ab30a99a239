"""fairseq-asam-precision: how much of the SAM/ASAM perturbation ε survives fp16/bf16 weights and
autocast (docs/mixed-precision.md quotes it).  For one model and batch in eval mode, w the fp32
weights and w_p = round_p(w) the weights a low-precision model holds:

    ε      the plugin's ε (perturbation.perturb) from the fp32 gradient at w_p
    ε_eff  round_p(w_p + ε) − w_p in fp32: nearest rounding (what `p.add_(ε)` does), unbiased
           stochastic rounding, or its sign control (stochastic rounding of w_p + s⊙ε, s random
           ±1: the same noise without ε's direction)
    lost   share of ε's non-zero entries with ε_eff = 0; cosine, L2 error ‖ε_eff − ε‖/‖ε‖
    kept   [L(w_p + ε_eff) − L(w_p)] / [L(w_p + ε) − L(w_p)], fp32 arithmetic
    Δg     ∇L(w_p + ε_eff) − ∇L(w_p) against ∇L(w_p + ε) − ∇L(w_p) (cosine, L2 error); g' err
           ‖∇L(w_p + ε_eff) − ∇L(w_p + ε)‖ / ‖∇L(w_p + ε)‖ (the gradient Adam gets)

Autocast (`--amp`) keeps w in fp32 and casts the operands of matmul-type ops: for the parameters
that reach one (recorded under autocast) ε_eff = round_p(w + ε) − round_p(w), for the others ε;
the intended increase is L(w + ε) − L(w).  Sums are float64; L is the criterion's loss per
sample-size unit.
"""

import argparse
import collections
import dataclasses
import logging
import math
import os
import statistics
import time
from typing import Any, Dict, List, Optional, Set, Tuple

import torch
from torch import Tensor

from fairseq_asam.perturbation import is_adaptive, perturb

from . import loading, recipe
from .benchmark import markdown_table
from .cli import run_command
from .errors import SettingError
from .files import write_json
from .logs import log_to_stdout

PROGRAM = "fairseq-asam-precision"
logger = logging.getLogger(__name__)


OptimizerSetting = collections.namedtuple("OptimizerSetting", "name rho eta adaptive")

SAM = OptimizerSetting("sam", rho=0.1, eta=0.0, adaptive=False)  # the paper's IWSLT'14 settings
ASAM = OptimizerSetting("asam", rho=0.2, eta=0.01, adaptive=True)
WEIGHT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
AUTOCAST_DTYPES = {"amp-fp16": torch.float16, "amp-bf16": torch.bfloat16}
NEAREST, STOCHASTIC, SIGN_CONTROL = "nearest", "stochastic", "sign-control"
# Generator seeds seed·1000 + offset: the draws of one seed are independent.
SEED_OFFSETS = {STOCHASTIC: 1, SIGN_CONTROL: 2, "signs": 5}
TENSOR_GROUPS = ("embedding", "layer_norm", "linear_weight", "bias")


@dataclasses.dataclass(frozen=True)
class Study:
    precisions: Tuple[str, ...] = tuple(WEIGHT_DTYPES)
    autocast: Tuple[str, ...] = tuple(AUTOCAST_DTYPES)
    sr_seeds: int = 5
    gradient_seeds: int = 2  # stochastic draws whose pass-2 gradient is compared; -1: none at all
    optimizers: Tuple[OptimizerSetting, ...] = (SAM, ASAM)


def round_nearest(x: Tensor, dtype: torch.dtype) -> Tensor:
    """x rounded to nearest (ties to even) in `dtype`, held in fp32."""
    rounded = x.float().to(dtype)
    if not bool(torch.isfinite(rounded).all()) and bool(torch.isfinite(x).all()):
        raise OverflowError(f"a value overflows {dtype} (largest {torch.finfo(dtype).max:g})")
    return rounded.float()


def stochastic_round(x: Tensor, dtype: torch.dtype, generator=None) -> Tensor:
    """Each entry of x to one of its two neighbours in `dtype`, the farther one with probability
    |x − nearest| / ulp, so that E[result] = x; held in fp32."""
    x = x.float()
    nearest = round_nearest(x, dtype)
    if dtype == torch.float32:
        return nearest
    toward = torch.where(x >= nearest, math.inf, -math.inf).to(dtype)
    other = torch.nextafter(nearest.to(dtype), toward).float()
    gap = (other - nearest).abs()  # exact: one ulp
    p_other = torch.where(gap > 0, (x - nearest).abs() / gap, torch.zeros_like(x))
    return torch.where(torch.rand(x.shape, generator=generator) < p_other, other, nearest)


def effective_epsilon(held, epsilon, dtype, generator=None) -> List[Tensor]:
    """round_p(w_p + ε) − w_p per tensor, in fp32: to nearest, or stochastic with a generator."""
    if generator is None:
        return [round_nearest(h + e, dtype) - h for h, e in zip(held, epsilon)]
    return [stochastic_round(h + e, dtype, generator) - h for h, e in zip(held, epsilon)]


def sharpness_epsilon(names, weights, grads, setting: OptimizerSetting) -> List[Tensor]:
    """The plugin's ε = ρ·T²g/‖Tg‖₂ (perturbation.perturb on fp32 copies)."""
    eps = [g.detach().float().clone() for g in grads]  # perturb turns them into ε in place
    params = [w.detach().float().clone() for w in weights]
    adaptive = [is_adaptive(n, setting.adaptive) for n in names]
    if perturb(params, eps, adaptive, setting.rho, setting.eta) is None:
        raise FloatingPointError(f"‖T g‖ is not finite for {setting.name}: no ε")
    return eps


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def compare_epsilon(effective, intended) -> Dict[str, float]:
    """ε_eff against ε over all tensors: lost share, cosine, relative L2 error, and the squared
    norms ‖ε‖², ‖ε_eff‖² (float64 sums)."""
    sums = torch.zeros(6, dtype=torch.float64)
    for eff, eps in zip(effective, intended):
        eff, eps = eff.double(), eps.double()
        kept, nonzero = eff != 0, eps != 0
        parts = [nonzero.sum(), (nonzero & ~kept).sum(), eps * eps, eff * eff, eff * eps]
        sums += torch.stack([t.sum().double() for t in parts + [(eff - eps) ** 2]])
    nonzero, lost, eps_sq, eff_sq, dot, error_sq = sums.tolist()
    cosine = _ratio(dot, math.sqrt(eps_sq * eff_sq))
    error = math.sqrt(_ratio(error_sq, eps_sq))
    return dict(
        lost=_ratio(lost, nonzero), cosine=cosine, l2_error=error, eps_sq=eps_sq, eff_sq=eff_sq
    )


def tensor_group(name: str) -> str:
    """embedding / layer_norm (weight and bias) / bias (of a linear layer) / linear_weight."""
    if "embed" in name:
        return "embedding"
    if "layer_norm" in name or "layernorm" in name:
        return "layer_norm"
    return "bias" if name.endswith("bias") else "linear_weight"


def compare_by_group(names, effective, intended) -> Dict[str, Dict[str, float]]:
    pairs = [[tensor_group(n), e, i] for n, e, i in zip(names, effective, intended)]
    by_group = {g: [p[1:] for p in pairs if p[0] == g] for g in TENSOR_GROUPS}
    return {g: compare_epsilon(*zip(*ps)) for g, ps in by_group.items() if ps}


def autocast_supported(dtype: torch.dtype, device: str = "cpu") -> Tuple[bool, str]:
    try:
        with torch.autocast(device, dtype=dtype):
            out = torch.ones(2, 2) @ torch.ones(2, 2)
    except (RuntimeError, TypeError, ValueError) as error:  # what torch raises differs by version
        return False, f"torch.autocast({device!r}, dtype={dtype}) failed: {error}"
    ok = out.dtype == dtype
    return ok, "supported" if ok else f"torch.autocast({device!r}) ran a matmul in {out.dtype}"


# Ops whose output holds the input's values: a parameter reaching a low-precision op through them
# (fairseq's attention concatenates the q/k/v biases) is cast.
VALUE_PRESERVING_OPS = frozenset(
    "cat stack clone _unsafe_view view reshape t transpose permute expand contiguous alias "
    "detach slice select split chunk unsqueeze squeeze".split()
)


def autocast_cast_parameters(model, run_forward, dtype, device="cpu") -> Set[str]:
    """Names of the parameters that `run_forward()` casts to `dtype` under torch.autocast: each
    copy to `dtype` (seen below autocast) of a parameter's values or of a value-preserving op's."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    origin: Dict[int, Set[str]] = {}  # storage address -> the parameters whose values it holds
    for name, p in model.named_parameters():
        origin.setdefault(p.untyped_storage().data_ptr(), set()).add(name)
    keep_alive, cast = [], set()  # derived tensors stay alive: their storage address stays theirs

    def sources(tensors) -> Set[str]:
        found = [origin.get(t.untyped_storage().data_ptr(), set()) for t in tensors]
        return set().union(*found)

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
            op = func.overloadpacket.__name__
            if op == "_to_copy" and (kwargs or {}).get("dtype") == dtype:
                cast.update(sources(inputs[:1]))
            elif op in VALUE_PRESERVING_OPS and sources(inputs):
                for t in [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]:
                    origin.setdefault(t.untyped_storage().data_ptr(), set()).update(sources(inputs))
                    keep_alive.append(t)
            return out

    with torch.no_grad(), torch.autocast(device, dtype=dtype), Recorder():
        run_forward()
    return cast


class LossProbe:
    """Loss and gradient of one model on one batch at given weights (eval mode, fp32): it writes
    them into the model's parameters (measure_batch puts the model's own back)."""

    def __init__(self, model, criterion, batch):
        self.model, self.criterion, self.batch = model.eval(), criterion.eval(), batch
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names, self.params = [n for n, _ in named], [p for _, p in named]
        self.device = self.params[0].device.type

    def weights(self) -> List[Tensor]:
        return [p.detach().float().clone() for p in self.params]

    def set(self, values) -> None:
        with torch.no_grad():
            for p, v in zip(self.params, values):
                p.copy_(v)

    def _loss(self, values) -> Tuple[Tensor, float]:
        self.set(values)
        loss, sample_size, _ = self.criterion(self.model, self.batch)
        value = float(loss.detach().double()) / float(sample_size)
        if not math.isfinite(value):
            raise FloatingPointError("the loss is not finite")
        return loss, value

    def loss(self, values) -> float:
        with torch.no_grad():
            return self._loss(values)[1]

    def loss_and_gradient(self, values) -> Tuple[float, List[Tensor]]:
        """(L, ∇ of the summed loss) at `values`."""
        loss, value = self._loss(values)
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        return value, [g.float() if g is not None else 0 * p for p, g in zip(self.params, grads)]

    def cast_parameters(self, dtype) -> Set[str]:
        run = lambda: self.criterion(self.model, self.batch)  # noqa: E731
        return autocast_cast_parameters(self.model, run, dtype, self.device)


def _add(a, b) -> List[Tensor]:
    return [x + y for x, y in zip(a, b)]


def _sub(a, b) -> List[Tensor]:
    return [x - y for x, y in zip(a, b)]


def _generator(seed: int, draw: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1000 + SEED_OFFSETS[draw])


@dataclasses.dataclass
class Case:
    """One optimizer at one precision: what each rounding of its ε is measured against."""

    probe: LossProbe
    key: Dict[str, str]  # optimizer, mode, precision
    held: List[Tensor]  # w_p, the weights ε_eff is added to
    eps: List[Tensor]
    base: float  # L(w_p)
    target: float  # the intended loss increase
    grads: Optional[List[Tensor]] = None  # ∇L(w_p)
    target_grad: Optional[List[Tensor]] = None  # ∇L(w_p + ε); None: no gradient compared


def measure(case: Case, rounding: str, seed, eff, gradient=True, groups=False) -> Dict[str, Any]:
    """One row: ε_eff against ε, the loss increase it gives, pass 2's gradient, tensor groups."""
    weights, stats = _add(case.held, eff), compare_epsilon(eff, case.eps)
    increase = case.probe.loss(weights) - case.base
    row = dict(case.key, rounding=rounding, seed=seed, **stats)
    row.update(target=case.target, increase=increase, kept=increase / case.target)
    if gradient and case.target_grad is not None:
        grad = case.probe.loss_and_gradient(weights)[1]
        change = compare_epsilon(_sub(grad, case.grads), _sub(case.target_grad, case.grads))
        row.update(grad_change_cosine=change["cosine"], grad_change_error=change["l2_error"])
        row["grad_error"] = compare_epsilon(grad, case.target_grad)["l2_error"]
    if groups:
        by_group = compare_by_group(case.probe.names, eff, case.eps).items()
        row["groups"] = {
            g: dict(
                t,
                eps_share=t["eps_sq"] / stats["eps_sq"],
                eff_share=_ratio(t["eff_sq"], stats["eff_sq"]),
            )
            for g, t in by_group
        }
    return row


def weight_rows(probe: LossProbe, master, precision: str, study: Study) -> List[Dict[str, Any]]:
    """Weights held in `precision`: nearest rounding, and (low precision) per seed stochastic
    rounding and its sign control."""
    dtype = WEIGHT_DTYPES[precision]
    low = dtype != torch.float32
    held = [round_nearest(w, dtype) for w in master] if low else master
    base, grads = probe.loss_and_gradient(held)
    rows = []
    for setting in study.optimizers:
        eps = sharpness_epsilon(probe.names, held, grads, setting)
        key = dict(optimizer=setting.name, mode="weights", precision=precision)
        case = Case(probe, key, held, eps, base, math.nan, grads)
        if low and study.gradient_seeds >= 0:
            perturbed, case.target_grad = probe.loss_and_gradient(_add(held, eps))
        else:
            perturbed = probe.loss(_add(held, eps))
        case.target = perturbed - base
        rows.append(measure(case, NEAREST, None, effective_epsilon(held, eps, dtype), groups=True))
        logger.info(
            "%s %s: %s", precision, setting.name, {k: rows[-1][k] for k in ("lost", "kept")}
        )
        for seed in range(study.sr_seeds if low else 0):
            gradient = seed < study.gradient_seeds
            sr = effective_epsilon(held, eps, dtype, _generator(seed, STOCHASTIC))
            rows.append(measure(case, STOCHASTIC, seed, sr, gradient))
            signs = _generator(seed, "signs")  # one generator through all tensors
            signed = [(torch.randint(0, 2, e.shape, generator=signs) * 2 - 1) * e for e in eps]
            control = effective_epsilon(held, signed, dtype, _generator(seed, SIGN_CONTROL))
            rows.append(measure(case, SIGN_CONTROL, seed, control, gradient))
    return rows


def autocast_rows(probe: LossProbe, master, mode: str, study: Study) -> Tuple[dict, list]:
    """fp32 weights, autocast to `mode`'s dtype: (its status, one row per optimizer)."""
    dtype = AUTOCAST_DTYPES[mode]
    ok, reason = autocast_supported(dtype, probe.device)
    if not ok:
        return {"supported": False, "reason": reason}, []
    cast = probe.cast_parameters(dtype)
    status = dict(supported=True, reason=reason, cast=len(cast), parameters=len(probe.names))
    is_cast = [n in cast for n in probe.names]
    held = [round_nearest(w, dtype) if c else w for w, c in zip(master, is_cast)]
    base, (loss_w, grads), rows = probe.loss(held), probe.loss_and_gradient(master), []
    for setting in study.optimizers:
        eps = sharpness_epsilon(probe.names, master, grads, setting)
        eff = [
            round_nearest(w + e, dtype) - h if c else (w + e) - w
            for w, e, h, c in zip(master, eps, held, is_cast)
        ]
        key = dict(optimizer=setting.name, mode="autocast", precision=mode)
        case = Case(probe, key, held, eps, base, probe.loss(_add(master, eps)) - loss_w)
        rows.append(measure(case, NEAREST, None, eff, groups=True))
    return status, rows


def measure_batch(probe: LossProbe, study: Study = Study()) -> Dict[str, Any]:
    """Every row of the probe's batch; the model's own weights are put back."""
    master = probe.weights()
    try:
        result = {"loss_fp32": probe.loss(master), "autocast": {}, "rows": []}
        for precision in study.precisions:
            result["rows"] += weight_rows(probe, master, precision, study)
        for mode in study.autocast:
            result["autocast"][mode], rows = autocast_rows(probe, master, mode, study)
            result["rows"] += rows
    finally:
        probe.set(master)
    return result


KEY = ("optimizer", "mode", "precision", "rounding")
# Summary columns: (row key, header, format).
# fmt: off
COLUMNS = (("lost", "lost", ".4f"), ("cosine", "cosine", ".4f"), ("l2_error", "L2 err", ".3f"),
           ("target", "ΔL target", ".3e"), ("increase", "ΔL", "+.3e"), ("kept", "kept", ".4f"),
           ("grad_change_cosine", "Δg cosine", ".4f"), ("grad_change_error", "Δg err", ".3f"),
           ("grad_error", "g' err", ".2e"))
# fmt: on


def summary_table(rows) -> str:
    """Per (optimizer, mode, precision, rounding): each column's mean ± std over seeds and
    batches."""
    groups: Dict[tuple, list] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in KEY), []).append(row)
    lines = []
    for key, members in groups.items():
        cells = list(key) + [len(members)]
        for column, _, fmt in COLUMNS:
            values = [m[column] for m in members if not math.isnan(m.get(column, math.nan))]
            spread = f"±{statistics.stdev(values):{fmt.lstrip('+')}}" if len(values) > 1 else ""
            cells.append(f"{statistics.mean(values):{fmt}}{spread}" if values else "-")
        lines.append(cells)
    return markdown_table([*KEY, "n", *(header for _, header, _ in COLUMNS)], lines)


def group_table(rows) -> str:
    """For the first batch's round-to-nearest low-precision rows: each tensor group's lost share,
    cosine, and share of ‖ε‖² and of ‖ε_eff‖²."""
    seen, lines = set(), []
    for row in rows:
        key = tuple(row[k] for k in KEY[:3])
        if "groups" in row and key not in seen and row["precision"] != "fp32":
            seen.add(key)
            for group, s in row["groups"].items():
                numbers = (s["lost"], s["cosine"], s["eps_share"], s["eff_share"])
                lines.append([*key, group, *(f"{x:.4f}" for x in numbers)])
    header = [*KEY[:3], "group", "lost", "cosine", "share of ‖ε‖²", "share of ‖ε_eff‖²"]
    return markdown_table(header, lines)


def format_result(result: Dict[str, Any]) -> str:
    first = result["batches"][0]
    tokens = ", ".join(str(b["ntokens"]) for b in result["batches"])
    lines = [
        f"{result['source']}: {result['arch']}, {result['parameters']:,} parameters; batches of "
        f"{tokens} target tokens from {result['subset']}; L(w) = {first['loss_fp32']:.5f}"
    ]
    for mode, status in first["autocast"].items():
        cast = f", {status.get('cast')} of {status.get('parameters')} tensors cast"
        lines.append(f"{mode}: {status['reason']}" + cast * status["supported"])
    rows = result["rows"]
    return "\n".join(lines + ["", summary_table(rows), "", group_table(rows)])


def init_model(data_bin: str, seed: int, args_files=(recipe.RECIPE_ARGS,)) -> loading.Loaded:
    """A model initialised by torch.manual_seed(seed) from the recipe's argument files."""
    options = recipe.training_options(args_files, "adam")
    argv = recipe.merge_options(options, [("--seed", str(seed)), ("--cpu", None)])
    return loading.build_from_args([data_bin, *argv])


def check(args) -> None:
    """Raises SettingError naming the flag or file."""
    if not os.path.isdir(args.data_bin):
        raise SettingError(f"--data-bin: folder not found: {args.data_bin}")
    if args.checkpoint is not None and not os.path.isfile(args.checkpoint):
        raise SettingError(f"--checkpoint: file not found: {args.checkpoint}")
    if not any(f.startswith(args.subset + ".") for f in os.listdir(args.data_bin)):
        raise SettingError(f"--subset {args.subset}: no such split in {args.data_bin}")
    for flag in ("batches", "max_tokens", "sr_seeds"):
        if getattr(args, flag) < (flag != "sr_seeds"):
            raise SettingError(f"--{flag.replace('_', '-')} is too small: {getattr(args, flag)}")


def run(args) -> Dict[str, Any]:
    """Loads (or initialises) the model and measures each batch: a JSON-ready dict."""
    check(args)
    study = Study(tuple(args.precisions), tuple(args.autocast), args.sr_seeds, args.gradient_seeds)
    if args.init:
        loaded = init_model(args.data_bin, args.seed)
    else:
        loaded = loading.load_checkpoint(args.checkpoint, args.data_bin, args.subset)
    options = dict(max_tokens=args.max_tokens, seed=args.seed, ignore_invalid_inputs=True)
    samples = loading.split_batches(loaded, args.subset, args.batches, True, **options)
    if len(samples) < args.batches:
        raise SettingError(f"--batches {args.batches}: {args.subset} has {len(samples)} batches")
    batches, rows = [], []
    for index, sample in enumerate(samples):
        logger.info("batch %d: %d target tokens", index, int(sample["ntokens"]))
        measured = measure_batch(LossProbe(loaded.model, loaded.criterion, sample), study)
        rows += measured.pop("rows")
        batches.append(dict(measured, batch=index, ntokens=int(sample["ntokens"])))
    result = dict(source="init" if args.init else args.checkpoint, subset=args.subset)
    result.update(arch=loaded.cfg.model.arch, study=dataclasses.asdict(study), rows=rows)
    return dict(
        result, parameters=sum(p.numel() for p in loaded.model.parameters()), batches=batches
    )


def _names(table):
    def parse(text: str) -> List[str]:
        names = [name for name in text.split(",") if name]
        if set(names) - set(table):
            raise argparse.ArgumentTypeError(f"choose from {', '.join(table)}")
        return names

    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROGRAM, description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="PATH", help="a fairseq translation checkpoint")
    source.add_argument("--init", action="store_true", help="the IWSLT'14 recipe's model, new")
    p.add_argument("--data-bin", required=True, help="fairseq binarized data folder")
    p.add_argument("--subset", default="train")
    p.add_argument("--batches", type=int, default=1, help="fixed batches, each with its own ε")
    p.add_argument("--max-tokens", type=int, default=4096, help="(the recipe's)")
    p.add_argument("--sr-seeds", type=int, default=Study.sr_seeds, help="stochastic draws")
    gradients = "draws whose pass-2 gradient is compared (nearest: always; -1: never)"
    p.add_argument("--gradient-seeds", type=int, default=Study.gradient_seeds, help=gradients)
    p.add_argument("--seed", type=int, default=1, help="model init (--init) and batch order")
    p.add_argument("--precisions", type=_names(WEIGHT_DTYPES), default=list(WEIGHT_DTYPES))
    p.add_argument("--autocast", type=_names(AUTOCAST_DTYPES), default=list(AUTOCAST_DTYPES))
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    p.add_argument("--json", metavar="PATH", help="write every row as JSON")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    log_to_stdout()
    return run_command(PROGRAM, lambda: work(args))


def work(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    result = run(args)
    result["wall_seconds"] = time.time() - start
    print(format_result(result) + f"\n\nwall time {result['wall_seconds']:.0f} s")
    if args.json:
        write_json(args.json, result)
    return 0
