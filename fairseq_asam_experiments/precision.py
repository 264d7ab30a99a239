"""fairseq-asam-precision: how much of the SAM/ASAM perturbation ε survives fp16/bf16 weights and
autocast (docs/mixed-precision.md quotes it).  For one model and batch in eval mode, at weights x
(fp32 master weights w rounded to the precision a low-precision model holds, or w under autocast):

    ε        the plugin's ε (perturbation.perturb) from the fp32 gradient at x
    ε_eff    round_p(x + ε) − round_p(x) per tensor, in fp32, rounded to nearest: what `p.add_(ε)`
             does to low-precision weights; under autocast (`--amp`, w in fp32) only parameters
             reaching a matmul-type op are cast (autocast_cast_parameters), the others keep ε
    lost     share of ε's non-zero entries with ε_eff = 0; cosine, L2 error ‖ε_eff − ε‖/‖ε‖
    kept     [L(round_p(x) + ε_eff) − L(round_p(x))] / [L(x + ε) − L(x)] in fp32 arithmetic, L the
             criterion's loss per sample-size unit
"""

import argparse
import collections
import logging
import math
import os
import time
from typing import Any, Dict, List, Set, Tuple

import torch
from torch import Tensor

from fairseq_asam.perturbation import is_adaptive, perturb

from . import loading, recipe
from .benchmark import markdown_table
from .cli import run_command
from .errors import SettingError
from .files import write_json

PROGRAM = "fairseq-asam-precision"
logger = logging.getLogger(__name__)

OptimizerSetting = collections.namedtuple("OptimizerSetting", "name rho eta adaptive")
SAM = OptimizerSetting("sam", rho=0.1, eta=0.0, adaptive=False)  # the paper's IWSLT'14 settings
ASAM = OptimizerSetting("asam", rho=0.2, eta=0.01, adaptive=True)
WEIGHT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
AUTOCAST_DTYPES = {"amp-fp16": torch.float16, "amp-bf16": torch.bfloat16}
DTYPES = {**WEIGHT_DTYPES, **AUTOCAST_DTYPES}
MODES = tuple(DTYPES)


def round_nearest(x: Tensor, dtype: torch.dtype) -> Tensor:
    """x rounded to nearest (ties to even) in `dtype`, held in fp32."""
    rounded = x.float().to(dtype)
    if not bool(torch.isfinite(rounded).all()) and bool(torch.isfinite(x).all()):
        raise OverflowError(f"a value overflows {dtype} (largest {torch.finfo(dtype).max:g})")
    return rounded.float()


def effective_epsilon(x, epsilon, dtypes) -> List[Tensor]:
    """round_p(x + ε) − round_p(x) per tensor, in fp32, p its dtype in `dtypes` (fp32 for the
    tensors that autocast leaves alone)."""
    return [round_nearest(w + e, d) - round_nearest(w, d) for w, e, d in zip(x, epsilon, dtypes)]


def sharpness_epsilon(names, weights, grads, setting: OptimizerSetting) -> List[Tensor]:
    """The plugin's ε = ρ·T²g/‖Tg‖₂ (perturbation.perturb on fp32 copies)."""
    eps = [g.detach().float().clone() for g in grads]  # perturb turns them into ε in place
    params = [w.detach().float().clone() for w in weights]
    adaptive = [is_adaptive(n, setting.adaptive) for n in names]
    if perturb(params, eps, adaptive, setting.rho, setting.eta) is None:
        raise FloatingPointError(f"‖T g‖ is not finite for {setting.name}: no ε")
    return eps


def compare_epsilon(effective, intended) -> Dict[str, float]:
    """ε_eff against ε over all tensors (float64 sums): lost share, cosine, relative L2 error."""
    sums = torch.zeros(6, dtype=torch.float64)
    for eff, eps in zip(effective, intended):
        eff, eps = eff.double(), eps.double()
        terms = [eps != 0, (eps != 0) & (eff == 0), eps * eps, eff * eff, eff * eps, eff - eps]
        sums += torch.stack([t.sum(dtype=torch.float64) for t in terms[:5] + [terms[5] ** 2]])
    nonzero, lost, eps_sq, eff_sq, dot, error_sq = sums.tolist()
    cosine = dot / math.sqrt(eps_sq * eff_sq) if eps_sq * eff_sq else math.nan
    lost = lost / nonzero if nonzero else math.nan
    return dict(lost=lost, cosine=cosine, l2_error=math.sqrt(error_sq / eps_sq))


def autocast_supported(dtype: torch.dtype) -> Tuple[bool, str]:
    """Whether CPU autocast runs a matmul in `dtype` (a torch without it warns, runs it in fp32)."""
    with torch.autocast("cpu", dtype=dtype):
        out = torch.ones(2, 2) @ torch.ones(2, 2)
    ok = out.dtype == dtype
    return ok, "supported" if ok else f"torch.autocast('cpu') ran a matmul in {out.dtype}"


def autocast_cast_parameters(model) -> Set[str]:
    """The parameters CPU autocast casts: the operands of matmul-type ops, which in a model of
    Linear, LayerNorm and Embedding modules (fairseq's Transformer) are its Linear modules' (the
    output projection's shared embedding included; tests/test_precision.py checks it)."""
    kinds = (torch.nn.Linear, torch.nn.LayerNorm, torch.nn.Embedding)
    for name, module in model.named_modules():
        if not isinstance(module, kinds) and list(module.parameters(recurse=False)):
            kind = type(module).__name__
            raise SettingError(f"--autocast: no cast rule for {name} ({kind}); pass --autocast ''")
    ids = {id(p) for m in model.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}


class LossProbe:
    """L and ∇L of one model on one batch (eval mode) at weights it writes into the model's
    parameters (measure_batch puts the model's own back)."""

    def __init__(self, model, criterion, batch):
        self.model, self.criterion, self.batch = model.eval(), criterion.eval(), batch
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names, self.params = [n for n, _ in named], [p for _, p in named]

    def set(self, values) -> None:
        with torch.no_grad():
            torch._foreach_copy_(self.params, values)

    def loss(self, values, gradient: bool = False):
        """L at `values`; with `gradient`, (L, ∇ of the summed loss)."""
        self.set(values)
        with torch.set_grad_enabled(gradient):
            loss, sample_size, _ = self.criterion(self.model, self.batch)
        value = float(loss.detach().double()) / float(sample_size)
        if not math.isfinite(value):
            raise FloatingPointError("the loss is not finite")
        if not gradient:
            return value
        grads = torch.autograd.grad(loss, self.params, materialize_grads=True)
        return value, [g.float() for g in grads]


def measure_batch(probe: LossProbe, modes=MODES, optimizers=(SAM, ASAM)) -> Dict[str, Any]:
    """The probe's batch's rows, one per mode (a weight precision: x = round_p(w); an autocast one:
    x = w) and optimizer (ε from the gradient at x, rounded with each tensor's dtype), and each
    autocast mode's status (how many tensors it casts, or why not measured); w is put back."""
    master = [p.detach().float().clone() for p in probe.params]
    result: Dict[str, Any] = {"loss_fp32": probe.loss(master), "autocast": {}, "rows": []}
    try:
        for mode in modes:
            dtype = DTYPES[mode]
            if mode in WEIGHT_DTYPES:
                kind, dtypes = "weights", [dtype] * len(master)
                x = [round_nearest(w, dtype) for w in master]
            else:
                ok, result["autocast"][mode] = autocast_supported(dtype)
                if not ok:
                    continue
                cast = autocast_cast_parameters(probe.model)
                result["autocast"][mode] = f"{len(cast)} of {len(probe.names)} tensors cast"
                kind, x = "autocast", master
                dtypes = [dtype if n in cast else torch.float32 for n in probe.names]
            held = [round_nearest(w, d) for w, d in zip(x, dtypes)]
            (loss_x, grads), base = probe.loss(x, gradient=True), probe.loss(held)
            for setting in optimizers:
                eps = sharpness_epsilon(probe.names, x, grads, setting)
                eff = effective_epsilon(x, eps, dtypes)
                target = probe.loss(torch._foreach_add(x, eps)) - loss_x
                increase = probe.loss(torch._foreach_add(held, eff)) - base
                kept = increase / target
                row = dict(mode=kind, precision=mode, optimizer=setting.name)
                row.update(compare_epsilon(eff, eps), target=target, increase=increase, kept=kept)
                result["rows"].append(row)
                logger.info("%s %s: lost %.4f, kept %.4f", mode, setting.name, row["lost"], kept)
    finally:
        probe.set(master)
    return result


KEY = ("batch", "optimizer", "mode", "precision")
COLUMNS = {"lost": ".4f", "cosine": ".4f", "l2_error": ".3f", "kept": ".4f"}  # and their format


def format_result(result: Dict[str, Any]) -> str:
    """A header, each autocast mode's status, and one table line per row."""
    first = result["batches"][0]
    tokens = ", ".join(str(b["ntokens"]) for b in result["batches"])
    lines = [
        f"{result['source']}: {result['arch']}, {result['parameters']:,} parameters; batches of "
        f"{tokens} target tokens from {result['subset']}; L(w) = {first['loss_fp32']:.5f}"
    ]
    lines += [f"{mode}: {status}" for mode, status in first["autocast"].items()]
    cells = [
        [r[k] for k in KEY] + [f"{r[c]:{f}}" for c, f in COLUMNS.items()] for r in result["rows"]
    ]
    return "\n".join(lines + ["", markdown_table([*KEY, *COLUMNS], cells)])


def init_model(data_bin: str, seed: int, args_files=(recipe.RECIPE_ARGS,)) -> loading.Loaded:
    """A model initialised by torch.manual_seed(seed) from the recipe's argument files."""
    options = recipe.training_options(args_files, "adam")
    argv = recipe.merge_options(options, [("--seed", str(seed)), ("--cpu", None)])
    return loading.build_from_args([data_bin, *argv])


def run(args) -> int:
    """Loads (or initialises) the model, measures each batch, prints the table."""
    if not os.path.isdir(args.data_bin):
        raise SettingError(f"--data-bin: folder not found: {args.data_bin}")
    if args.checkpoint is not None and not os.path.isfile(args.checkpoint):
        raise SettingError(f"--checkpoint: file not found: {args.checkpoint}")
    loading.check_split(args.data_bin, args.subset)
    if args.batches < 1:
        raise SettingError(f"--batches is too small: {args.batches}")
    start = time.time()
    if args.init:
        loaded = init_model(args.data_bin, args.seed)
    else:
        loaded = loading.load_checkpoint(args.checkpoint, args.data_bin, args.subset)
    options = dict(max_tokens=args.max_tokens, seed=args.seed, ignore_invalid_inputs=True)
    samples = loading.split_batches(loaded, args.subset, args.batches, True, **options)
    if len(samples) < args.batches:
        raise SettingError(f"--batches {args.batches}: {args.subset} has {len(samples)} batches")
    parameters = sum(p.numel() for p in loaded.model.parameters())
    result = dict(source=args.checkpoint or "init", subset=args.subset, arch=loaded.cfg.model.arch)
    result.update(parameters=parameters, rows=[], batches=[])
    for index, sample in enumerate(samples):
        logger.info("batch %d: %d target tokens", index, int(sample["ntokens"]))
        probe = LossProbe(loaded.model, loaded.criterion, sample)
        measured = measure_batch(probe, args.precisions + args.autocast)
        result["rows"] += [dict(row, batch=index) for row in measured.pop("rows")]
        result["batches"].append(dict(measured, batch=index, ntokens=int(sample["ntokens"])))
    result["wall_seconds"] = time.time() - start
    print(format_result(result) + f"\n\nwall time {result['wall_seconds']:.0f} s")
    if args.json:
        write_json(args.json, result)
    return 0


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
    p.add_argument("--seed", type=int, default=1, help="model init (--init) and batch order")
    p.add_argument("--precisions", type=_names(WEIGHT_DTYPES), default=list(WEIGHT_DTYPES))
    p.add_argument("--autocast", type=_names(AUTOCAST_DTYPES), default=list(AUTOCAST_DTYPES))
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    p.add_argument("--json", metavar="PATH", help="write every row as JSON")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return run_command(PROGRAM, lambda: run(args))
