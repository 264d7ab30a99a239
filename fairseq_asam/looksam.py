"""LookSAM's gradient reuse (Liu et al., CVPR 2022), free of fairseq.

On a sharpness-aware update, with G the plain gradient and G_s the sharpness-aware one,

    g_v = G_s − (⟨G_s, G⟩ / ‖G‖²) · G            the part of G_s orthogonal to G, kept

and on the plain updates in between (`--sam-interval`), the gradient becomes

    G ← G + α · (‖G‖ / ‖g_v‖) · g_v

instead of dropping the sharpness-aware direction altogether.  All vectors are flat fp32.
"""

from typing import Sequence

import torch
from torch import Tensor


def orthogonalize_(sharp: Tensor, plain: Tensor) -> Tensor:
    """g_v, in place of `sharp`: its part orthogonal to `plain` (both flat)."""
    coefficient = torch.dot(sharp, plain) / torch.dot(plain, plain).clamp_min(
        torch.finfo(plain.dtype).tiny
    )
    return sharp.addcmul_(plain, coefficient, value=-1)  # a 0-dim factor: no host sync


def reuse_scale(plain: Sequence[Tensor], g_v: Tensor, alpha: float) -> Tensor:
    """α · ‖G‖/‖g_v‖ (0-dim), the reuse term's factor on g_v; G given as its parts."""
    norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in plain])
    g_v_norm = g_v.norm()
    # g_v = 0 (a sharpness-aware gradient of zero): no direction to reuse, and no 0 · ∞.
    return torch.where(g_v_norm > 0, alpha * norms.norm() / g_v_norm, 0.0)
