"""The sharpness-aware perturbation of SAM and ASAM, free of fairseq and of the base optimizer.

Update rule (Foret et al., ICLR 2021; Kwon et al., ICML 2021, Algorithm 1), per micro-batch B:

    g  = ∇L_B(w)                              pass 1
    T  = |w| + η   on adaptive tensors        (ASAM: parameters whose name contains "weight")
    T  = 1         on all other tensors       (SAM: T = 1 everywhere)
    ε  = ρ · T² g / ‖T g‖₂                    one norm over all tensors together, in fp32
    g' = ∇L_B(w + ε)                          pass 2; the base optimizer (Adam) steps with g'
    w  ← the saved copy of w                  exact restore, never w + ε − ε

`perturb` applies ε in place and returns the saved copy, `restore` puts it back.  Costs:
one copy of the parameters (the buffer that holds T is reused to save w), fp32 gradients are
turned into ε in place, and one device-to-host sync per call (to skip a non-finite ‖T g‖).
"""

from typing import List, Optional, Sequence

import torch
from torch import Tensor

ADAPTIVE_NAME_KEY = "weight"
# Keeps ρ / ‖Tg‖ finite when the gradient is exactly zero (ε is then zero too).
_MIN_NORM = torch.finfo(torch.float32).tiny


def is_adaptive(name: str, adaptive: bool) -> bool:
    """Whether ASAM scales the tensor `name` by T = |w| + η (the paper leaves biases alone)."""
    return adaptive and ADAPTIVE_NAME_KEY in name


def _copy_(dst: List[Tensor], src: List[Tensor]) -> None:
    if hasattr(torch, "_foreach_copy_"):  # torch >= 2.2
        torch._foreach_copy_(dst, src)
    else:
        for d, s in zip(dst, src):
            d.copy_(s)


def perturb(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    adaptive_flags: Sequence[bool],
    rho: float,
    eta: float,
) -> Optional[List[Tensor]]:
    """w ← w + ε for every tensor in `params`, ε computed from `grads` (pass 1's gradient).

    `grads[i]` belongs to `params[i]`; `adaptive_flags[i]` selects T = |w| + η for it.  fp32
    gradients are overwritten (they become T·g, then ε), so none may share memory with another
    or be expanded (`.grad` never does; autograd.grad's results may); others are left as they are.
    Returns the saved copy of w (for `restore`), or None if ‖T g‖ is not finite: then w is
    untouched and nothing is perturbed.
    """
    params, grads = list(params), list(grads)
    if not params:
        return []
    adaptive_idx = [i for i, a in enumerate(adaptive_flags) if a]
    plain_idx = [i for i, a in enumerate(adaptive_flags) if not a]
    # ε is built in fp32: in place for fp32 gradients, in an fp32 copy for fp16/bf16 ones.
    eps = [g.detach() if g.dtype == torch.float32 else g.detach().float() for g in grads]
    eps_adaptive = [eps[i] for i in adaptive_idx]
    w_adaptive = [params[i].detach() for i in adaptive_idx]

    scale_t = torch._foreach_abs(w_adaptive) if w_adaptive else []
    if scale_t:
        torch._foreach_add_(scale_t, eta)  # T = |w| + η
        torch._foreach_mul_(eps_adaptive, scale_t)  # T g
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(eps)))
    if not torch.isfinite(norm):
        return None
    torch._foreach_mul_(eps, rho / norm.clamp_min(_MIN_NORM))  # ρ T g / ‖T g‖
    if scale_t:
        torch._foreach_mul_(eps_adaptive, scale_t)  # ρ T² g / ‖T g‖ = ε

    # Save w before perturbing it: T's buffers are reused for the adaptive tensors.
    saved: List[Optional[Tensor]] = [None] * len(params)
    if scale_t:
        _copy_(scale_t, w_adaptive)
        for i, buf in zip(adaptive_idx, scale_t):
            saved[i] = buf
    for i in plain_idx:
        saved[i] = params[i].detach().clone()
    torch._foreach_add_([p.detach() for p in params], eps)
    return saved


def restore(params: Sequence[Tensor], saved: Sequence[Tensor]) -> None:
    """Puts back the weights saved by `perturb`, bit for bit."""
    if saved:
        _copy_([p.detach() for p in params], list(saved))
