"""The two-pass train step, installed on fairseq's `FairseqTask`.

fairseq's Trainer calls `task.train_step` once per micro-batch, inside its own `no_sync()` for
all but the last micro-batch of an update.  With `--optimizer sam/asam` the wrapped step does:

1. move the gradient accumulated by earlier micro-batches aside (a reference, no copy);
2. pass 1 under `model.no_sync()`: g = ∇L_B(w) of this worker's micro-batch, never reduced;
3. w ← w + ε (perturbation.py), then put the accumulated gradient back in `.grad`;
4. pass 2 in the Trainer's own sync context: ∇L_B(w + ε) is added to the accumulated
   gradient, so DDP all-reduces the whole update's sum once, on the last micro-batch;
5. restore w from the saved copy, also when pass 2 raises.

Pass 1 goes through the task's own step, not torch.autograd.grad on the criterion's loss: what
fairseq does around the criterion (set_num_updates, autocast, the loss scaling of its fp16 and
AMP wrappers, free of host syncs there) stays fairseq's, for every task and wrapper.

A non-finite ‖T g‖ (fp16 overflow) perturbs nothing; pass 2 then runs at w on top of the
non-finite g, so the overflow reaches fairseq's loss scaler through the all-reduce on every
rank.  Dummy batches (`ignore_grad`), and updates that `--sam-interval`/`--sam-start-update`
leave plain, take one plain pass, which still joins the DDP sync.  Parameters of the criterion
get pass 2's gradient like the model's, and are not perturbed.

The logged `loss` is pass 1's; `sharpness` is pass 2's logged loss minus pass 1's, each under
its own dropout mask; `sharpness_eval` (--sharpness-eval-interval) is the same difference with
dropout off, measured without touching the update.  Both travel in the logging outputs under
private keys that the criterion's own reduce_metrics never sees, and are reduced by that
reduce_metrics, so that they come out in the units of the criterion's `loss`.

Host syncs: one per perturbed micro-batch (is ‖T g‖ finite?), none on a plain one.
"""

import contextlib
import functools
import logging

import numpy
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
# Built once: pickle (criteria whose statistics are gathered) then stores each name only once.
PRIVATE_KEYS = {
    m: (LOGGING_PREFIX + m, LOGGING_PREFIX + m + WEIGHT_SUFFIX)
    for m in (SHARPNESS_KEY, EVAL_SHARPNESS_KEY)
}
# Σ sample_size of all micro-batches, measured or not (see _reduce_like_loss).
TOTAL_WEIGHT_KEY = LOGGING_PREFIX + "sample_size"
_INSTALLED_MARK = "_fairseq_asam_wrapped"


@contextlib.contextmanager
def _no_sync(module):
    """`module.no_sync()`, with legacy_ddp's flag restored also when the body raises: fairseq's
    LegacyDistributedDataParallel restores it only on a clean exit, and a flag left set after a
    recovered OOM would keep that worker out of every later all-reduce."""
    if not hasattr(module, "no_sync"):
        yield
        return
    owner = module  # the flag's owner, under fairseq's ModuleProxyWrapper
    while owner is not None and "accumulate_grads" not in vars(owner):
        owner = getattr(owner, "module", None)
    accumulate_grads = None if owner is None else owner.accumulate_grads
    try:
        with module.no_sync():
            yield
    finally:
        if owner is not None:
            owner.accumulate_grads = accumulate_grads


def _with_metrics(logging_output, sample_size, metric_names, measured):
    """`logging_output` plus, for every metric in `metric_names`, its private key and weight:
    the measured (value, sample_size) from `measured`, zeros where nothing was measured.

    Invariant: with a sharpness-aware optimizer, every micro-batch of every update on every
    worker — perturbed, plain (--sam-interval) or dummy — logs the same keys, as values of the
    same kind.  fairseq all-reduces the statistics as one packed buffer keyed by each worker's
    first logging output, so a key present on one worker and missing on another would misalign
    the buffer (or hang it).  Where the criterion logs a float `loss` (its statistics may be
    gathered by pickling, which tensors would bloat), all are floats; otherwise values are 0-dim
    tensors made on the device without a host sync, and weights take the kind of sample_size.
    """
    logging_output = dict(logging_output)
    loss_kind = logging_output.get("loss", 0.0)
    weight_kind = sample_size if torch.is_tensor(loss_kind) else 0.0
    for metric in metric_names:
        value, weight = measured.get(metric, (0.0, 0.0))
        key, weight_key = PRIVATE_KEYS[metric]
        logging_output[key] = _of_kind(value, loss_kind)
        logging_output[weight_key] = _of_kind(weight, weight_kind)
    logging_output[TOTAL_WEIGHT_KEY] = _of_kind(sample_size, weight_kind)
    return logging_output


def _of_kind(x, like):
    """`x` as a float, or as a 0-dim fp32 tensor on `like`'s device if `like` is a tensor."""
    if not torch.is_tensor(like):
        return float(x)
    if torch.is_tensor(x):
        return x.detach().float().reshape(())
    return like.new_full((), x, dtype=torch.float32)


def _logged_loss_rise(perturbed_log, log):
    """L(w + ε) − L(w) as the criterion logs its `loss` (in its units, on its device)."""
    perturbed, plain = perturbed_log["loss"], log["loss"]
    if torch.is_tensor(plain):
        return perturbed.detach().float() - plain.detach().float()
    return float(perturbed) - float(plain)


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
    accumulated) and the random number generators (torch's forked, numpy's global state put
    back: LayerDrop draws from either, in eval mode too) are left as they were, so the training
    update is the same with or without it.  `named`: the model's trainable (name, parameter)
    pairs.  Returns (the rise of the logged loss, sample_size), or None if the gradient is not
    finite.
    """
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    numpy_state = numpy.random.get_state()
    try:
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda else []):
            return _eval_mode_sharpness(sample, named, model, criterion, sam, optimizer)
    finally:
        numpy.random.set_state(numpy_state)


def _unshared(grads):
    """`grads`, each one contiguous in memory of its own (else a copy): perturb builds ε in fp32
    gradients in place, and autograd.grad can return one buffer for two parameters (w = a + b),
    views of one (concatenated parameters), or an expanded number (a parameter's `.sum()`)."""
    seen = set()
    for g in grads:
        if g is not None:
            storage = g.untyped_storage().data_ptr()
            if storage in seen or not g.is_contiguous():
                g = g.clone(memory_format=torch.contiguous_format)
            else:
                seen.add(storage)
        yield g


def _eval_mode_sharpness(sample, named, model, criterion, sam, optimizer):
    # As fairseq's train_step: AMP's autocast around the criterion (CUDA only).
    amp = isinstance(optimizer, AMPOptimizer) and torch.cuda.is_available()
    was_training = model.training
    model.eval()
    try:
        with _no_sync(model), _no_sync(criterion):
            with torch.autocast("cuda", enabled=amp):  # the forward only, as fairseq's
                loss, sample_size, log = criterion(model, sample)
            # The loss scale keeps fp16 gradients from underflowing; ε does not depend on it.
            grads = torch.autograd.grad(
                loss * _loss_scale(optimizer), [p for _, p in named], allow_unused=True
            )
        reached = [(n, p, g) for (n, p), g in zip(named, _unshared(grads)) if g is not None]
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
                _, _, perturbed_log = criterion(model, sample)
        finally:
            perturbation.restore(params, saved)
    finally:
        model.train(was_training)
    return _logged_loss_rise(perturbed_log, log), sample_size


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

    def run(ignore):
        return train_step(task, sample, model, criterion, optimizer, update_num, ignore, **kwargs)

    if ignore_grad or not sam.sharpness_aware_update:
        loss, sample_size, logging_output = run(ignore_grad)
    else:
        loss, sample_size, logging_output, rise = _two_passes(run, named, criterion, model, sam)
        if rise is not None:
            measured[SHARPNESS_KEY] = (rise, sample_size)
    return loss, sample_size, _with_metrics(logging_output, sample_size, metric_names, measured)


def _two_passes(run, named, criterion, model, sam):
    """Pass 1 at w (its gradient kept out of .grad and DDP), w ← w + ε, pass 2 at w + ε into
    .grad, w restored.  Returns pass 1's (loss, sample_size, logging output) and the rise of
    the logged loss, None if ‖T g‖ was not finite (then nothing was perturbed)."""
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
        loss, sample_size, logging_output = run(False)

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
    if saved is None:
        # Non-finite: pass 1's gradient joins the rest, so fairseq's overflow check fires on
        # every rank (an fp32 .grad may hold T·g by now: perturb scales it in place, and a
        # norm that overflows from finite entries overflows fairseq's own norm too).
        for p, acc in zip(every, accumulated):
            if acc is not None:
                p.grad = acc if p.grad is None else p.grad.add_(acc)
    else:  # pass 1's gradient is dropped
        for p, acc in zip(every, accumulated):
            p.grad = acc
    try:  # at w + ε; at w after an overflow, still joining the workers' all-reduce
        _, _, perturbed_log = run(False)
    finally:
        if saved is not None:
            perturbation.restore(params, saved)
    if saved is None:
        return loss, sample_size, logging_output, None
    # Pass 2's loss minus pass 1's, each under its own dropout mask (as the authors' code).
    return loss, sample_size, logging_output, _logged_loss_rise(perturbed_log, logging_output)


def without_plugin_keys(logging_outputs):
    """The logging outputs as the criterion made them (some criteria, e.g. wav2vec's, log every
    key they are given)."""
    return [
        {k: v for k, v in log.items() if not k.startswith(LOGGING_PREFIX)}
        for log in logging_outputs
    ]


_SHADOWED = set()  # metrics a criterion logs itself (warned once per process)


def log_sharpness(logging_outputs, criterion, logged_by_criterion) -> None:
    """Logs `sharpness` (and `sharpness_eval`) over the micro-batches that measured it, in the
    units of the criterion's `loss`; an update with none logs nothing.  `logged_by_criterion`:
    the metrics the criterion logged itself this update, never ours to fill or to remove."""
    if not logging_outputs:
        return
    for metric, (key, weight_key) in PRIVATE_KEYS.items():
        sharpness_aware = any(weight_key in log for log in logging_outputs)
        if metric in logged_by_criterion:
            if sharpness_aware and metric not in _SHADOWED:
                _SHADOWED.add(metric)
                logger.warning(
                    f"the criterion logs its own '{metric}': fairseq-asam's is not logged"
                )
            continue
        if sharpness_aware:
            # A float, except after a DDP all-reduce: then a host sync per update (and the
            # replay repeats any of the criterion's reduce_metrics), not per micro-batch.
            weight = float(sum(log[weight_key] for log in logging_outputs))
            value = _reduce_like_loss(logging_outputs, key, weight, criterion) if weight else None
            if value is not None:
                metrics.log_scalar(metric, value, weight, round=4)
        _drop_empty_meters(metric, keep_filled=sharpness_aware)


def _reduce_like_loss(logging_outputs, key, weight, criterion):
    """The rises under `key`, normalized as the criterion normalizes its `loss` (per token in
    base 2 for fairseq's cross-entropies, in nats or as averages for others): its
    reduce_metrics runs, in an aggregator of its own, on the logging outputs with `loss`
    replaced by the rise.  It normalizes over every micro-batch; the factor Σ sample_size /
    Σ measured sample_size makes that the mean over the measured ones (exact where the
    criterion divides its loss by sample_size, as fairseq's do, or all were measured)."""
    replay = [
        {**plain, "loss": log[key]}
        for plain, log in zip(without_plugin_keys(logging_outputs), logging_outputs)
    ]
    with metrics.aggregate(new_root=True) as replayed:
        criterion.__class__.reduce_metrics(replay)
    if "loss" not in replayed:  # a criterion without a `loss`: no unit to follow
        if "loss" not in _SHADOWED:
            _SHADOWED.add("loss")
            logger.warning("the criterion logs no 'loss': fairseq-asam logs no sharpness")
        return None
    total = sum(log[TOTAL_WEIGHT_KEY] for log in logging_outputs)
    return replayed["loss"].avg * (total / weight)


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
        with metrics.aggregate() as logged:  # sees what the task and criterion log
            plain_reduce_metrics(self, without_plugin_keys(logging_outputs), criterion)
        log_sharpness(logging_outputs, criterion, set(logged))

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
