"""LookSAM's gradient reuse (Liu et al., CVPR 2022), free of fairseq.

On a sharpness-aware update, with G the plain gradient and G_s the sharpness-aware one,

    g_v = G_s − (⟨G_s, G⟩ / ‖G‖²) · G            the part of G_s orthogonal to G, kept

and on the plain updates in between (`--sam-interval`), the gradient becomes

    G ← G + α · (‖G‖ / ‖g_v‖) · g_v

instead of dropping the sharpness-aware direction altogether.  All vectors are flat fp32.
"""

import torch
from torch import Tensor


def orthogonal_component(sharp: Tensor, plain: Tensor) -> Tensor:
    """g_v: the part of `sharp` orthogonal to `plain` (both flat)."""
    coefficient = torch.dot(sharp, plain) / torch.dot(plain, plain).clamp_min(
        torch.finfo(plain.dtype).tiny
    )
    return sharp - coefficient * plain


def reuse_term(plain: Tensor, g_v: Tensor, alpha: float) -> Tensor:
    """α · ‖G‖/‖g_v‖ · g_v, to be added to the plain gradient G."""
    return g_v * (alpha * plain.norm() / g_v.norm().clamp_min(torch.finfo(g_v.dtype).tiny))
