"""Switching an Adam checkpoint to SAM/ASAM (scripts/switch_optimizer.py); not loaded by the
plugin.

fairseq refuses to resume with an optimizer class other than the checkpoint's.  SAM and ASAM
keep Adam's state unchanged, so `switch_optimizer` rewrites the recorded optimizer name of an
Adam checkpoint; resuming from the result keeps the update count, the LR schedule and Adam's
moments.
"""

import os
import tempfile
from typing import Optional, Tuple

import torch

from .errors import FairseqAsamError
from .optim import FairseqASAM, FairseqSAM


def save_atomic(state, path: str) -> None:
    """torch.save to a temporary name in the same folder, then rename: never a half file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# The optimizers whose state is Adam's, by fairseq-train's --optimizer name.
OPTIMIZER_CLASS_NAMES = {
    "adam": "FairseqAdam",
    "sam": FairseqSAM.__name__,
    "asam": FairseqASAM.__name__,
}
# fairseq records the outermost optimizer's class name, so a mixed-precision run records its
# wrapper's (whatever it wraps).  By the fairseq-train flag that selects it:
PRECISION_WRAPPERS = {
    "fp32": None,
    "fp16": "FP16Optimizer",  # flat fp32 master copy, unless --fp16-no-flatten-grads
    "bf16": "FP16Optimizer",  # common.bf16 (fairseq-hydra-train): never flat
    "memory-efficient-fp16": "MemoryEfficientFP16Optimizer",
    "amp": "AMPOptimizer",
}
BMUF_CLASS_NAME = "FairseqBMUF"
_FLAT_STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


class CheckpointError(FairseqAsamError, ValueError):
    """A checkpoint that cannot be switched as asked; the message names the file or flag."""


def _field(node, key: str, default=None):
    """node[key] of a saved config node: a dict, or an argparse.Namespace (legacy options)."""
    if isinstance(node, dict):
        return node.get(key, default)
    return getattr(node, key, default) if node is not None else default


def _setting(state, section: str, key: str, default=None):
    """A setting of the run that saved `state` (its cfg, or the legacy argparse args)."""
    if state.get("cfg") is not None:
        return _field(_field(state["cfg"], section), key, default)
    return _field(state.get("args"), key, default)


def _base_optimizer(state) -> Optional[str]:
    """The --optimizer of the run that saved `state` (inside any mixed-precision wrapper)."""
    if state.get("cfg") is not None:
        node = _field(state["cfg"], "optimizer")
        return _field(node, "_name") or _field(node, "optimizer")
    return _field(state.get("args"), "optimizer")


def _source_precision(state, recorded: str) -> Tuple[str, bool]:
    """(precision, flat) of the run that saved `state`, from its recorded optimizer name."""
    if recorded in OPTIMIZER_CLASS_NAMES.values():
        return "fp32", False
    if recorded == "FP16Optimizer":
        if _setting(state, "common", "bf16", False):
            return "bf16", False
        return "fp16", not _setting(state, "common", "fp16_no_flatten_grads", False)
    for precision, wrapper in PRECISION_WRAPPERS.items():
        if wrapper == recorded:
            return precision, False
    raise CheckpointError(f"optimizer {recorded} is not one fairseq-asam knows")


def _flatten_optimizer_state(optimizer_state, source: str):
    """Per-parameter Adam state → the one flat tensor FP16Optimizer's flat master copy holds
    (parameters in the optimizer's order, as fairseq flattens them)."""
    groups = optimizer_state["param_groups"]
    ids = [i for group in groups for i in group["params"]]
    per_param = optimizer_state["state"]
    if any(i not in per_param or "exp_avg" not in per_param[i] for i in ids):
        raise CheckpointError(
            f"{source}: some parameters have no Adam state (never updated, e.g. unused by the "
            "model); flat --fp16 needs one for every parameter: use --fp16-no-flatten-grads"
        )
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in groups]
    if any(h != hyper[0] for h in hyper):
        raise CheckpointError(
            f"{source}: parameter groups with different settings cannot be flattened "
            "for --fp16; use --fp16-no-flatten-grads"
        )
    steps = {int(per_param[i]["step"]) for i in ids}
    if len(steps) != 1:
        raise CheckpointError(
            f"{source}: parameters were updated different numbers of times; "
            "cannot flatten for --fp16, use --fp16-no-flatten-grads"
        )
    flat = {"step": per_param[ids[0]]["step"]}
    for key in _FLAT_STATE_KEYS:
        if all(key in per_param[i] for i in ids):
            flat[key] = torch.cat([per_param[i][key].reshape(-1) for i in ids])
    out = {k: v for k, v in optimizer_state.items() if k not in ("state", "param_groups")}
    out["state"] = {0: flat}
    out["param_groups"] = [{**hyper[0], "params": [0]}]
    return out


def switch_optimizer(
    source: str, target: str, optimizer: str, precision: Optional[str] = None, flatten: bool = True
) -> Tuple[str, str]:
    """Writes `target`: `source` set up to resume with `--optimizer optimizer` at `precision`.

    fairseq resumes only if the recorded optimizer class equals the new run's: the base
    optimizer's (FairseqAdam, FairseqASAM, ...) in fp32, the wrapper's (FP16Optimizer, ...)
    in mixed precision.  `precision` is one of PRECISION_WRAPPERS (None: the source's); with
    "fp16", `flatten` False means --fp16-no-flatten-grads.  A per-parameter Adam state is
    flattened for flat --fp16; the reverse needs the model and is refused.
    Returns (recorded name before, recorded name after).
    """
    if optimizer not in OPTIMIZER_CLASS_NAMES:
        raise CheckpointError(
            f"--optimizer must be one of {sorted(OPTIMIZER_CLASS_NAMES)}, got {optimizer!r}"
        )
    if precision is not None and precision not in PRECISION_WRAPPERS:
        raise CheckpointError(
            f"precision must be one of {sorted(PRECISION_WRAPPERS)}, got {precision!r}"
        )
    if not os.path.isfile(source):
        raise CheckpointError(f"checkpoint not found: {source}")
    state = torch.load(source, map_location="cpu", weights_only=False)
    history = state.get("optimizer_history") or []
    if not history:
        raise CheckpointError(f"{source} has no optimizer history (was it saved by fairseq-train?)")
    previous = history[-1]["optimizer_name"]
    if previous == BMUF_CLASS_NAME and _base_optimizer(state) in OPTIMIZER_CLASS_NAMES:
        # fairseq records BMUF's name whatever it wraps: a --use-bmuf run resumes it as it is.
        if precision is not None:
            raise CheckpointError(
                f"{source} was trained with --use-bmuf, whose checkpoints record {BMUF_CLASS_NAME}"
                " whatever precision it wraps; switching precision under BMUF is not supported"
            )
        save_atomic(state, target)
        return previous, previous
    if previous not in OPTIMIZER_CLASS_NAMES.values() and (
        previous not in PRECISION_WRAPPERS.values()
        or _base_optimizer(state) not in OPTIMIZER_CLASS_NAMES
    ):
        wrapping = (
            f" around --optimizer {_base_optimizer(state)}"
            if previous in PRECISION_WRAPPERS.values()
            else ""
        )
        raise CheckpointError(
            f"{source} was trained with {previous}{wrapping}; only "
            f"{sorted(OPTIMIZER_CLASS_NAMES)} share Adam's state and can be switched"
        )
    source_precision, source_flat = _source_precision(state, previous)
    if precision is None:
        precision, target_flat = source_precision, source_flat
    else:
        target_flat = precision == "fp16" and flatten
    if source_flat and not target_flat:
        raise CheckpointError(
            f"{source} holds a flat --fp16 optimizer state (one tensor for all parameters); "
            "resume it with --fp16 (flat) or use --reset-optimizer"
        )
    if target_flat and not source_flat and state.get("last_optimizer_state") is not None:
        state["last_optimizer_state"] = _flatten_optimizer_state(
            state["last_optimizer_state"], source
        )
    history[-1]["optimizer_name"] = (
        PRECISION_WRAPPERS[precision] or OPTIMIZER_CLASS_NAMES[optimizer]
    )
    save_atomic(state, target)
    return previous, history[-1]["optimizer_name"]
