"""The two-pass train step, installed on fairseq's `FairseqTask`.

fairseq's Trainer calls `task.train_step` once per micro-batch, inside its own `no_sync()` for
all but the last micro-batch of an update.  With `--optimizer sam/asam` the wrapped step does:

1. move the gradient accumulated by earlier micro-batches aside (a reference, no copy);
2. pass 1 under `model.no_sync()`: g = ∇L_B(w) of this worker's micro-batch, never reduced;
3. w ← w + ε (perturbation.py), then put the accumulated gradient back in `.grad`;
4. pass 2 in the Trainer's own sync context: ∇L_B(w + ε) is added to the accumulated
   gradient, so DDP all-reduces the whole update's sum once, on the last micro-batch;
5. restore w from the saved copy, also when pass 2 raises.

A non-finite ‖T g‖ (fp16 overflow) perturbs nothing; pass 2 then runs at w on top of the
non-finite g, so the overflow reaches fairseq's loss scaler through the all-reduce on every
rank.  Dummy batches (`ignore_grad`), and updates that `--sam-interval`/`--sam-start-update`
leave plain, take one plain pass, which still joins the DDP sync.  Parameters of the criterion
get pass 2's gradient like the model's, and are not perturbed.

The logged `loss` is pass 1's; `sharpness` is pass 2's loss minus pass 1's, each under its own
dropout mask; `sharpness_eval` (--sharpness-eval-interval) is the same difference with dropout
off, measured without touching the update.  Both travel in the logging outputs under private
keys that the criterion's own reduce_metrics never sees.
"""

import contextlib
import functools
import logging
import math

import torch
from fairseq import metrics
from fairseq.optim.amp_optimizer import AMPOptimizer
from fairseq.optim.bmuf import FairseqBMUF
from fairseq.tasks import FairseqTask

from . import perturbation
from .optim import find_sharpness_aware

logger = logging.getLogger(__name__)

# The metrics, as fairseq logs them.
SHARPNESS_KEY = "sharpness"
EVAL_SHARPNESS_KEY = "sharpness_eval"
# The logging-output keys that carry them, apart from any key a criterion logs itself (and
# hidden from the criterion's reduce_metrics).  Each metric's sum over micro-batches travels
# with the Σ sample_size of the micro-batches that measured it, so it is averaged over those
# only (not over dummy batches, nor over the plain updates of --sam-interval).
LOGGING_PREFIX = "fairseq_asam_"
WEIGHT_SUFFIX = "_sample_size"
_INSTALLED_MARK = "_fairseq_asam_wrapped"


def _no_sync(module):
    return module.no_sync() if hasattr(module, "no_sync") else contextlib.nullcontext()


def _with_metrics(logging_output, loss, metric_names, measured):
    """`logging_output` plus, for every metric in `metric_names`, its private key and weight:
    the measured (value, sample_size) from `measured`, zeros where nothing was measured.

    Invariant: with a sharpness-aware optimizer, every micro-batch of every update on every
    worker — perturbed, plain (--sam-interval) or dummy — logs the same keys, as values of the
    same kind (a 0-dim fp32 tensor on the loss's device, or a float).  fairseq all-reduces the
    statistics as one packed buffer keyed by each worker's first logging output, so a key
    present on one worker and missing on another would misalign the buffer (or hang it).
    """
    logging_output = dict(logging_output)
    for metric in metric_names:
        value, weight = measured.get(metric, (0.0, 0.0))
        if torch.is_tensor(loss):
            value, weight = (
                x.detach().float().reshape(()).to(loss.device)
                if torch.is_tensor(x)
                else torch.tensor(float(x), dtype=torch.float32, device=loss.device)
                for x in (value, weight)
            )
        else:
            value, weight = float(value), float(weight)
        key = LOGGING_PREFIX + metric
        logging_output[key], logging_output[key + WEIGHT_SUFFIX] = value, weight
    return logging_output


def _metric_names(sam):
    return (SHARPNESS_KEY, EVAL_SHARPNESS_KEY) if sam.sharpness_eval_interval else (SHARPNESS_KEY,)


def _loss_scale(optimizer) -> float:
    """The current loss scale of fairseq's optimizer wrappers (1 without one), as fairseq's
    Trainer reads it: `scaler` is fairseq's DynamicLossScaler (FP16Optimizer,
    MemoryEfficientFP16Optimizer) or torch's GradScaler (AMPOptimizer; 1.0 when disabled).
    Under --use-bmuf, the scaler of the optimizer BMUF wraps."""
    if isinstance(optimizer, FairseqBMUF):
        optimizer = optimizer._optimizer
    scaler = getattr(optimizer, "scaler", None)
    if scaler is None:
        return 1.0
    return float(scaler.get_scale() if hasattr(scaler, "get_scale") else scaler.loss_scale)


def eval_mode_sharpness(sample, named, model, criterion, sam, optimizer):
    """L(w + ε) − L(w) without dropout: both losses and ε's gradient in eval mode.

    A measurement only: `.grad`, the weights (restored bit for bit), DDP (no_sync, nothing
    accumulated) and the random number generators (forked: LayerDrop draws in eval mode too)
    are left as they were, so the training update is the same with or without it.
    `named`: the model's trainable (name, parameter) pairs.  Returns (L(w + ε) − L(w),
    sample_size), the losses summed like the criterion's, or None if the gradient is not finite.
    """
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda else []):
        return _eval_mode_sharpness(sample, named, model, criterion, sam, optimizer)


def _eval_mode_sharpness(sample, named, model, criterion, sam, optimizer):
    # As fairseq's train_step: AMP's autocast around the criterion (CUDA only).
    amp = isinstance(optimizer, AMPOptimizer) and torch.cuda.is_available()
    was_training = model.training
    model.eval()
    try:
        with _no_sync(model), _no_sync(criterion):
            with torch.autocast("cuda", enabled=amp):  # the forward only, as fairseq's
                loss, sample_size, _ = criterion(model, sample)
            # The loss scale keeps fp16 gradients from underflowing; ε does not depend on it.
            grads = torch.autograd.grad(
                loss * _loss_scale(optimizer), [p for _, p in named], allow_unused=True
            )
        reached = [(n, p, g) for (n, p), g in zip(named, grads) if g is not None]
        params = [p for _, p, _ in reached]
        saved = perturbation.perturb(
            params,
            [g for _, _, g in reached],
            [perturbation.is_adaptive(n, sam.adaptive) for n, _, _ in reached],
            sam.rho,
            sam.eta,
        )
        if saved is None:
            return None
        try:
            with torch.no_grad(), torch.autocast("cuda", enabled=amp):
                perturbed_loss, _, _ = criterion(model, sample)
        finally:
            perturbation.restore(params, saved)
    finally:
        model.train(was_training)
    return perturbed_loss.detach() - loss.detach(), sample_size


def sharpness_aware_train_step(
    train_step, task, sample, model, criterion, optimizer, update_num, ignore_grad=False, **kwargs
):
    """Runs `train_step` (the task's plain step) twice, at w and at w + ε."""
    sam = find_sharpness_aware(optimizer)
    if sam is None:
        return train_step(
            task, sample, model, criterion, optimizer, update_num, ignore_grad, **kwargs
        )
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # LookSAM's G restarts with each update.  fairseq's zero_grad sets every .grad to None when
    # an update begins (an update skipped for an fp16 overflow never reaches the optimizer's
    # step, so the step cannot mark it).
    if sam.looksam_alpha and all(p.grad is None for _, p in named):
        sam.start_update()
    sam.two_pass_micro_batches += 1
    sam.sharpness_aware_update = sam.perturbs_at(update_num)
    metric_names, measured = _metric_names(sam), {}
    if not ignore_grad and sam.measures_eval_sharpness_at(update_num):
        result = eval_mode_sharpness(sample, named, model, criterion, sam, optimizer)
        if result is not None:
            measured[EVAL_SHARPNESS_KEY] = result
    if ignore_grad or not sam.sharpness_aware_update:
        loss, sample_size, logging_output = train_step(
            task, sample, model, criterion, optimizer, update_num, ignore_grad, **kwargs
        )
        return loss, sample_size, _with_metrics(logging_output, loss, metric_names, measured)

    # The criterion's own parameters (e.g. a learnable temperature) take pass 2's gradient like
    # the model's, but are not perturbed: ε is defined on the model's weights.
    in_model = {id(p) for _, p in named}
    criterion_params = [
        p for p in criterion.parameters() if p.requires_grad and id(p) not in in_model
    ]
    every = [p for _, p in named] + criterion_params
    accumulated = [p.grad for p in every]
    for p in every:
        p.grad = None
    # fairseq wraps a criterion with parameters in DDP too: pass 1 must not sync either.
    with _no_sync(model), _no_sync(criterion):
        loss, sample_size, logging_output = train_step(
            task, sample, model, criterion, optimizer, update_num, False, **kwargs
        )

    sam.record_plain_gradient([p for _, p in named])
    # Parameters that pass 1 did not reach have a zero gradient: they are not perturbed.
    reached = [(n, p) for n, p in named if p.grad is not None]
    params = [p for _, p in reached]
    saved = perturbation.perturb(
        params,
        [p.grad for p in params],
        [perturbation.is_adaptive(n, sam.adaptive) for n, _ in reached],
        sam.rho,
        sam.eta,
    )
    if saved is None:  # non-finite: keep g in .grad so the overflow is reduced and detected
        for p, acc in zip(every, accumulated):
            if acc is not None:
                p.grad = acc if p.grad is None else p.grad.add_(acc)
    else:  # pass 1's gradient is dropped, for the model's and the criterion's parameters
        for p, acc in zip(every, accumulated):
            p.grad = acc
    try:
        perturbed_loss, _, _ = train_step(
            task, sample, model, criterion, optimizer, update_num, False, **kwargs
        )
    finally:
        if saved is not None:
            perturbation.restore(params, saved)

    # Pass 2's loss minus pass 1's, each under its own dropout mask (as the authors' code).
    sharpness = (
        perturbed_loss.detach() - loss.detach() if torch.is_tensor(loss) else perturbed_loss - loss
    )
    measured[SHARPNESS_KEY] = (sharpness, sample_size)
    return loss, sample_size, _with_metrics(logging_output, loss, metric_names, measured)


def without_plugin_keys(logging_outputs):
    """The logging outputs as the criterion made them (some criteria, e.g. wav2vec's, log every
    key they are given)."""
    return [
        {k: v for k, v in log.items() if not k.startswith(LOGGING_PREFIX)}
        for log in logging_outputs
    ]


_SHADOWED = set()  # metrics a criterion logs itself (warned once per process)


def log_sharpness(logging_outputs) -> None:
    """Logs `sharpness` (and `sharpness_eval`) normalized like fairseq's cross-entropy `loss`
    (per sample unit, base 2), over the micro-batches that measured it; an update with none
    logs nothing."""
    if not logging_outputs:
        return
    for metric in (SHARPNESS_KEY, EVAL_SHARPNESS_KEY):
        key = LOGGING_PREFIX + metric
        sharpness_aware = any(key + WEIGHT_SUFFIX in log for log in logging_outputs)
        if any(metric in log for log in logging_outputs):
            # The criterion logs a metric of that name itself: its meter is not ours to fill
            # (one meter would average the two) or to remove.
            if sharpness_aware and metric not in _SHADOWED:
                _SHADOWED.add(metric)
                logger.warning(
                    f"the criterion logs its own '{metric}': fairseq-asam's is not logged"
                )
            continue
        weight = sum(float(log.get(key + WEIGHT_SUFFIX, 0)) for log in logging_outputs)
        if weight > 0:
            total = sum(float(log.get(key, 0)) for log in logging_outputs)
            metrics.log_scalar(metric, total / weight / math.log(2), weight, round=4)
        _drop_empty_meters(metric, keep_filled=sharpness_aware)


def _drop_empty_meters(key: str, keep_filled: bool) -> None:
    """Removes the meter `key` where it would print `key=None` or a stale value.

    fairseq prints every meter of an aggregator, also one that got no value since its last
    reset (a log interval with no sharpness-aware update) or one restored from a checkpoint of
    a sharpness-aware run that now trains without.  Without the metric in this update's
    logging outputs (`keep_filled` False: no sharpness-aware optimizer), the meter goes from
    every active aggregator.
    """
    for aggregator in metrics.get_active_aggregators():
        meter = aggregator.get(key)
        if meter is None or (keep_filled and getattr(meter, "count", 0) > 0):
            continue
        del aggregator[key]
        # MetersDict keeps its key order in `priorities`; a stale entry there breaks later inserts.
        priorities = getattr(aggregator, "priorities", None)
        if priorities is not None:
            priorities[:] = [entry for entry in priorities if entry[2] != key]


def install() -> None:
    """Wraps FairseqTask.train_step, optimizer_step and reduce_metrics (idempotent).

    Every task that inherits train_step, or calls it through super(), gets the two-pass step
    when the optimizer is sam/asam, and is untouched otherwise.
    """
    if getattr(FairseqTask.train_step, _INSTALLED_MARK, False):
        return
    plain_train_step = FairseqTask.train_step
    plain_reduce_metrics = FairseqTask.reduce_metrics
    plain_optimizer_step = FairseqTask.optimizer_step

    @functools.wraps(plain_train_step)
    def train_step(
        self, sample, model, criterion, optimizer, update_num, ignore_grad=False, **kwargs
    ):
        return sharpness_aware_train_step(
            plain_train_step,
            self,
            sample,
            model,
            criterion,
            optimizer,
            update_num,
            ignore_grad,
            **kwargs,
        )

    @functools.wraps(plain_reduce_metrics)
    def reduce_metrics(self, logging_outputs, criterion):
        plain_reduce_metrics(self, without_plugin_keys(logging_outputs), criterion)
        log_sharpness(logging_outputs)

    @functools.wraps(plain_optimizer_step)
    def optimizer_step(self, optimizer, model, update_num):
        sam = find_sharpness_aware(optimizer)
        if sam is not None:  # checked here too, where the task's name is known
            sam.ensure_two_pass(f"'{type(self).__name__}'")
        plain_optimizer_step(self, optimizer, model, update_num)

    setattr(train_step, _INSTALLED_MARK, True)
    FairseqTask.train_step = train_step
    FairseqTask.reduce_metrics = reduce_metrics
    FairseqTask.optimizer_step = optimizer_step
