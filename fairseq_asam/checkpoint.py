"""Loading fairseq checkpoints on torch >= 2.6.

torch 2.6 made `torch.load(weights_only=True)` the default; fairseq's checkpoints pickle an
`argparse.Namespace`, and numpy arrays and scalars (e.g. the best BLEU with --eval-bleu), so
every load fails.  We allow exactly those types instead of turning the safe loader off.
"""

import argparse
from typing import Tuple

import numpy
import torch

# numpy 2 moved numpy.core to numpy._core; checkpoints pickled under numpy 1 name the old path.
NUMPY1_MULTIARRAY = "numpy.core.multiarray"
# torch >= 2.5 accepts (object, "pickled.name") entries for a global saved under another name.
_RENAMED_GLOBALS_TORCH = (2, 5)


def _torch_version() -> Tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def _fairseq_checkpoint_globals():
    """Types fairseq checkpoints contain besides tensors and builtin containers."""
    multiarray = (getattr(numpy, "_core", None) or numpy.core).multiarray  # numpy 2 / numpy 1
    numpy_types = [multiarray._reconstruct, multiarray.scalar, numpy.ndarray, numpy.dtype]
    dtypes = getattr(numpy, "dtypes", None)  # numpy >= 1.25: one class per dtype
    if dtypes is not None:
        numpy_types += [getattr(dtypes, name) for name in dir(dtypes) if name.endswith("DType")]
    if multiarray.__name__ != NUMPY1_MULTIARRAY and _torch_version() >= _RENAMED_GLOBALS_TORCH:
        numpy_types += [
            (multiarray._reconstruct, f"{NUMPY1_MULTIARRAY}._reconstruct"),
            (multiarray.scalar, f"{NUMPY1_MULTIARRAY}.scalar"),
        ]
    return [argparse.Namespace] + numpy_types


def allow_fairseq_checkpoints() -> None:
    add_safe_globals = getattr(torch.serialization, "add_safe_globals", None)
    if add_safe_globals is not None:  # torch >= 2.4
        add_safe_globals(_fairseq_checkpoint_globals())
