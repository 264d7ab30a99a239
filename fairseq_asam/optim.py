"""The registered optimizers `sam` and `asam`: fairseq's Adam plus a sharpness-aware gradient.

The optimizer itself only carries the perturbation settings and steps like Adam; the two
forward-backward passes run in the task's train step (see `two_pass.py`), because only there
are the batch, the model and the criterion at hand.
"""

import logging
import math
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.distributed as dist
from fairseq.optim import register_optimizer
from fairseq.optim.adam import FairseqAdam, FairseqAdamConfig
from omegaconf import DictConfig
from torch import Tensor

from . import looksam
from .errors import ConfigError, TaskBypassError


@dataclass
class SharpnessAwareConfig(FairseqAdamConfig):
    rho: float = field(
        default=0.1,
        metadata={"help": "radius ρ of the neighbourhood in which the worst-case loss is sought"},
    )
    sam_interval: int = field(
        default=1,
        metadata={
            "help": "take the sharpness-aware gradient on every K-th update only and Adam's "
            "plain gradient on the others (cost ≈ 1 + 1/K passes per update)"
        },
    )
    sam_start_update: int = field(
        default=0,
        metadata={"help": "plain Adam before this update, sharpness-aware from it on"},
    )
    looksam_alpha: float = field(
        default=0.0,
        metadata={
            "help": "LookSAM: on the updates --sam-interval leaves plain, add α‖g‖/‖g_v‖·g_v, "
            "g_v being the last sharpness-aware gradient's part orthogonal to the "
            "plain one (0: off; costs two fp32 gradient-sized buffers)"
        },
    )
    sharpness_eval_interval: int = field(
        default=0,
        metadata={
            "help": "every N updates, also log `sharpness_eval`: L(w+ε) − L(w) with dropout "
            "off (eval mode, ε from the eval-mode gradient) on each micro-batch — the "
            "noise-free counterpart of `sharpness`; the training update is unchanged "
            "(cost: one forward-backward and one forward per micro-batch, every N "
            "updates; 0: off)"
        },
    )


@dataclass
class FairseqSAMConfig(SharpnessAwareConfig):
    pass


@dataclass
class FairseqASAMConfig(SharpnessAwareConfig):
    rho: float = field(
        default=0.2,
        metadata={"help": "radius ρ of the adaptive neighbourhood ‖T⁻¹ε‖₂ <= ρ"},
    )
    eta: float = field(
        default=0.01,
        metadata={"help": "η in T = |w| + η, keeps the neighbourhood open where weights are 0"},
    )


def _validate(cfg, adaptive: bool, name: str) -> None:
    rho = float(cfg.rho)
    if not (math.isfinite(rho) and rho > 0):
        raise ConfigError(
            f"--rho must be a finite number > 0 for --optimizer {name}, got {cfg.rho}"
        )
    if adaptive:
        eta = float(cfg.eta)
        if not (math.isfinite(eta) and eta >= 0):
            raise ConfigError(
                f"--eta must be a finite number >= 0 for --optimizer {name}, got {cfg.eta}"
            )
    if int(cfg.sam_interval) < 1:
        raise ConfigError(f"--sam-interval must be an integer >= 1, got {cfg.sam_interval}")
    if int(cfg.sam_start_update) < 0:
        raise ConfigError(f"--sam-start-update must be an integer >= 0, got {cfg.sam_start_update}")
    if int(cfg.sharpness_eval_interval) < 0:
        raise ConfigError(
            f"--sharpness-eval-interval must be an integer >= 0, got {cfg.sharpness_eval_interval}"
        )
    alpha = float(cfg.looksam_alpha)
    if not (math.isfinite(alpha) and alpha >= 0):
        raise ConfigError(f"--looksam-alpha must be a finite number >= 0, got {cfg.looksam_alpha}")
    if alpha > 0 and int(cfg.sam_interval) < 2:
        raise ConfigError(
            "--looksam-alpha reuses g_v between sharpness-aware updates: "
            "it needs --sam-interval >= 2"
        )
    if alpha > 0 and _run_setting(cfg, "distributed_training", "zero_sharding") == "os":
        raise ConfigError(  # fairseq swaps in fairscale's OSS after the hooks saving g_v are set
            "--looksam-alpha does not support --zero-sharding os: g_v would be left out of "
            "checkpoints; use --zero-sharding none or --looksam-alpha 0"
        )
    if _run_setting(cfg, "distributed_training", "ddp_backend") == "fully_sharded":
        raise ConfigError(
            f"--optimizer {name} does not support --ddp-backend fully_sharded (the perturbation "
            "needs whole parameters on every worker); use --ddp-backend pytorch_ddp or legacy_ddp"
        )


def _run_setting(cfg, section: str, key: str):
    """A setting of the whole run (cfg is a node of the run's config when fairseq builds the
    optimizer); None when the optimizer is built from a bare config."""
    root = cfg._get_root() if isinstance(cfg, DictConfig) else None
    return root.get(section, {}).get(key) if root is not None else None


logger = logging.getLogger(__name__)

G_V_KEY = "fairseq_asam_looksam_g_v"  # LookSAM's g_v, in the optimizer's state dict

# Share of the loss increase L(w + ε) − L(w) that survives when w + ε is stored in low precision,
# measured on transformer_iwslt_de_en at initialisation and after 175 Adam updates
# (`fairseq-asam-precision`; docs/mixed-precision.md).  --amp keeps fp32 weights: 99.9–100%.
LOSS_INCREASE_KEPT = {
    ("asam", "fp16"): "86–94%",
    ("asam", "bf16"): "72–80%",
    ("sam", "fp16"): "98%",
    ("sam", "bf16"): "52–73%",
}


def low_precision_weights(cfg) -> Optional[str]:
    """ "fp16" or "bf16" when the run keeps its model weights in that precision (--fp16,
    --memory-efficient-fp16, common.bf16), None for fp32 weights (also --amp)."""
    if _run_setting(cfg, "common", "amp"):
        return None
    if _run_setting(cfg, "common", "bf16") or _run_setting(cfg, "common", "memory_efficient_bf16"):
        return "bf16"
    if _run_setting(cfg, "common", "fp16") or _run_setting(cfg, "common", "memory_efficient_fp16"):
        return "fp16"
    return None


class SharpnessAware:
    """Mixin that turns a FairseqOptimizer into its sharpness-aware version.

    Subclasses set `adaptive` (ASAM: True, SAM: False) and list the mixin before the base
    optimizer; any FairseqOptimizer can be the base.
    """

    adaptive: bool = False
    optimizer_name: str = ""

    def __init__(self, cfg, params):
        _validate(cfg, self.adaptive, self.optimizer_name)
        super().__init__(cfg, params)
        precision = low_precision_weights(cfg)
        if precision is not None:
            logger.warning(
                f"--optimizer {self.optimizer_name} with {precision} weights: w + ε is rounded to "
                f"{precision}, which drops most entries of ε; on transformer_iwslt_de_en this kept "
                f"{LOSS_INCREASE_KEPT[(self.optimizer_name, precision)]} of the loss increase ε "
                "should cause. --amp keeps the weights, and ε, in fp32 (100%): see "
                "docs/mixed-precision.md"
            )
        self.rho = float(cfg.rho)
        self.eta = float(cfg.eta) if self.adaptive else 0.0
        self.sam_interval = int(cfg.sam_interval)
        self.sam_start_update = int(cfg.sam_start_update)
        self.looksam_alpha = float(cfg.looksam_alpha)
        self.sharpness_eval_interval = int(cfg.sharpness_eval_interval)
        self.two_pass_micro_batches = 0  # micro-batches seen by the two-pass step this update
        self.sharpness_aware_update = False  # whether this update's micro-batches were perturbed
        self._plain_sum = None  # LookSAM: Σ of this worker's pass-1 gradients, this update
        self._g_v = None  # LookSAM: flat fp32 g_v of the last sharpness-aware update
        # --use-bmuf: every worker steps with its own gradient between block syncs, so LookSAM's
        # plain gradient G must stay this worker's own too (G_s is never all-reduced).
        self._gradients_are_local = bool(_run_setting(cfg, "optimization", "use_bmuf"))
        # g_v goes with torch's optimizer state dict, which every fairseq wrapper (AMP directly)
        # saves and loads.
        self.optimizer.register_state_dict_post_hook(self._save_g_v)
        self.optimizer.register_load_state_dict_pre_hook(self._load_g_v)

    def _save_g_v(self, optimizer, state_dict) -> None:
        if self._g_v is not None:
            state_dict[G_V_KEY] = self._g_v

    def _load_g_v(self, optimizer, state_dict) -> None:
        if self.looksam_alpha and G_V_KEY in state_dict:  # fairseq loads to the CPU
            self._g_v = state_dict[G_V_KEY].to(optimizer.param_groups[0]["params"][0].device)

    def perturbs_at(self, update_num: int) -> bool:
        """Whether update `update_num` (0-based) takes the sharpness-aware gradient."""
        since_start = update_num - self.sam_start_update
        return since_start >= 0 and since_start % self.sam_interval == 0

    def measures_eval_sharpness_at(self, update_num: int) -> bool:
        """Whether update `update_num` (0-based) also measures `sharpness_eval`."""
        return self.sharpness_eval_interval > 0 and update_num % self.sharpness_eval_interval == 0

    def ensure_two_pass(self, task_name: str = "the task") -> None:
        """Raises unless some micro-batch of this update went through the two-pass step."""
        if self.two_pass_micro_batches == 0:
            raise TaskBypassError(
                f"--optimizer {self.optimizer_name} cannot train with task {task_name}: "
                "it replaces "
                "train_step without calling FairseqTask.train_step, so no sharpness-aware pass ran "
                "and the update would be plain Adam"
            )

    def start_update(self) -> None:
        """LookSAM: a new update begins (with its first micro-batch, dummy or not): G restarts."""
        self._plain_sum = None

    def record_plain_gradient(self, params: List[Tensor]) -> None:
        """LookSAM: adds one micro-batch's pass-1 gradient (model parameter order) to G."""
        if not self.looksam_alpha:
            return
        if self._plain_sum is None:
            self._plain_sum = self._flat_zeros()
        grads, parts = zip(*_with_grad(params, self._plain_sum))
        torch._foreach_add_(parts, grads)  # no flat copy

    def step(self, closure=None, scale=1.0, groups=None):
        self.ensure_two_pass()
        self.two_pass_micro_batches = 0
        if self.looksam_alpha:
            self._looksam()
        super().step(closure, scale=scale, groups=groups)

    def _flat_zeros(self) -> Tensor:
        """G's buffer, zeros (G itself after dummy batches only).  Optimizer parameters are the
        model's (fp32/fp16 copies, maybe flattened) followed by the criterion's, which pass 1
        does not see: G is 0 for those."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        return torch.zeros(sum(p.numel() for p in params), device=params[0].device)

    def _looksam(self) -> None:
        """Keeps g_v after a sharpness-aware update; adds the reuse term after a plain one (its
        one flat fp32 transient besides the buffers g_v and G)."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if self.sharpness_aware_update:
            plain = self._flat_zeros() if self._plain_sum is None else self._plain_sum
            if (
                not self._gradients_are_local
                and dist.is_available()
                and dist.is_initialized()
                and dist.get_world_size() > 1
            ):
                dist.all_reduce(plain)  # G is global like G_s; its scale does not matter
            # G_s overwrites the last g_v, then becomes the new g_v in place.
            self._g_v = looksam.orthogonalize_(_flat_gradient(params, out=self._g_v), plain)
            self._plain_sum = None
        elif self._g_v is not None:
            grads, parts = zip(*_with_grad(params, self._g_v))
            scale = looksam.reuse_scale(grads, self._g_v, self.looksam_alpha)
            torch._foreach_add_(grads, torch._foreach_mul(parts, scale))


def _with_grad(params: List[Tensor], flat: Tensor):
    """(gradient, its part of `flat`) of each of `params` with a gradient, parts in order."""
    sizes = [p.numel() for p in params]
    parts = flat[: sum(sizes)].split(sizes)
    return [(p.grad, v.view_as(p)) for p, v in zip(params, parts) if p.grad is not None]


def _flat_gradient(params: List[Tensor], out: Optional[Tensor] = None) -> Tensor:
    """All gradients as one flat fp32 vector (in `out` if given), zeros where there is none."""
    return torch.cat(
        [
            (p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel())).float()
            for p in params
        ],
        out=out,
    )


@register_optimizer("sam", dataclass=FairseqSAMConfig)
class FairseqSAM(SharpnessAware, FairseqAdam):
    """SAM (Foret et al., 2021) with Adam as the base optimizer."""

    adaptive = False
    optimizer_name = "sam"


@register_optimizer("asam", dataclass=FairseqASAMConfig)
class FairseqASAM(SharpnessAware, FairseqAdam):
    """ASAM (Kwon et al., 2021) with Adam as the base optimizer."""

    adaptive = True
    optimizer_name = "asam"


# Where fairseq's wrappers keep the optimizer they wrap: FP16Optimizer and AMPOptimizer
# (fp32_optimizer), MemoryEfficientFP16Optimizer (wrapped_optimizer), FairseqBMUF (_optimizer).
_WRAPPED_OPTIMIZER_ATTRIBUTES = ("fp32_optimizer", "wrapped_optimizer", "_optimizer")
_MAX_WRAPPER_DEPTH = 4


def find_sharpness_aware(optimizer) -> "SharpnessAware | None":
    """The SAM/ASAM optimizer inside fairseq's fp16/AMP/BMUF wrappers, or None."""
    for _ in range(_MAX_WRAPPER_DEPTH):
        if optimizer is None or isinstance(optimizer, SharpnessAware):
            return optimizer
        optimizer = next(
            (
                getattr(optimizer, a)
                for a in _WRAPPED_OPTIMIZER_ATTRIBUTES
                if getattr(optimizer, a, None) is not None
            ),
            None,
        )
    return None
