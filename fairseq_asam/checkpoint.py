"""Checkpoint helpers: loading fairseq checkpoints on torch >= 2.6, and switching optimizer.

torch 2.6 made `torch.load(weights_only=True)` the default; fairseq's checkpoints pickle an
`argparse.Namespace`, and numpy arrays and scalars (e.g. the best BLEU with --eval-bleu), so
every load fails.  We allow exactly those types instead of turning the safe loader off.

fairseq refuses to resume with an optimizer class other than the checkpoint's.  SAM and ASAM
keep Adam's state unchanged, so `switch_optimizer` rewrites the recorded optimizer name of an
Adam checkpoint; resuming from the result keeps the update count, the LR schedule and Adam's
moments.
"""
import argparse
import os
import tempfile

import numpy
import torch

from .optim import FairseqASAM, FairseqSAM


def _fairseq_checkpoint_globals():
    """Types fairseq checkpoints contain besides tensors and builtin containers."""
    multiarray = getattr(numpy, "_core", None) or numpy.core  # numpy 2 / numpy 1
    numpy_types = [multiarray.multiarray._reconstruct, multiarray.multiarray.scalar,
                   numpy.ndarray, numpy.dtype]
    dtypes = getattr(numpy, "dtypes", None)  # numpy >= 1.25: one class per dtype
    if dtypes is not None:
        numpy_types += [getattr(dtypes, name) for name in dir(dtypes) if name.endswith("DType")]
    return [argparse.Namespace] + numpy_types

OPTIMIZER_CLASS_NAMES = {
    "adam": "FairseqAdam",
    "sam": FairseqSAM.__name__,
    "asam": FairseqASAM.__name__,
}


def allow_fairseq_checkpoints() -> None:
    add_safe_globals = getattr(torch.serialization, "add_safe_globals", None)
    if add_safe_globals is not None:  # torch >= 2.4
        add_safe_globals(_fairseq_checkpoint_globals())


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


def switch_optimizer(source: str, target: str, optimizer: str) -> str:
    """Writes `target`: `source` with its last optimizer record renamed to `optimizer`.

    Returns the optimizer name the checkpoint had.  Only Adam-family optimizers (adam, sam,
    asam) are interchangeable: their state is Adam's.
    """
    if optimizer not in OPTIMIZER_CLASS_NAMES:
        raise ValueError(f"--optimizer must be one of {sorted(OPTIMIZER_CLASS_NAMES)}, got {optimizer!r}")
    if not os.path.isfile(source):
        raise FileNotFoundError(f"checkpoint not found: {source}")
    state = torch.load(source, map_location="cpu", weights_only=False)
    history = state.get("optimizer_history") or []
    if not history:
        raise ValueError(f"{source} has no optimizer history (was it saved by fairseq-train?)")
    previous = history[-1]["optimizer_name"]
    if previous not in OPTIMIZER_CLASS_NAMES.values():
        raise ValueError(
            f"{source} was trained with {previous}; only {sorted(OPTIMIZER_CLASS_NAMES.values())} "
            "share Adam's state and can be switched"
        )
    history[-1]["optimizer_name"] = OPTIMIZER_CLASS_NAMES[optimizer]
    save_atomic(state, target)
    return previous
