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
leave plain, take one plain pass, which still joins the DDP sync.
The logged `loss` is pass 1's; `sharpness` is pass 2's loss minus pass 1's.
"""
import contextlib
import functools
import math

from fairseq import metrics
from fairseq.tasks import FairseqTask

from . import perturbation
from .optim import find_sharpness_aware

SHARPNESS_KEY = "sharpness"
_INSTALLED_MARK = "_fairseq_asam_wrapped"


def _no_sync(model):
    return model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext()


def sharpness_aware_train_step(train_step, task, sample, model, criterion, optimizer, update_num,
                               ignore_grad=False, **kwargs):
    """Runs `train_step` (the task's plain step) twice, at w and at w + ε."""
    sam = find_sharpness_aware(optimizer)
    if sam is None:
        return train_step(task, sample, model, criterion, optimizer, update_num, ignore_grad, **kwargs)
    sam.two_pass_micro_batches += 1
    sam.sharpness_aware_update = sam.perturbs_at(update_num)
    if ignore_grad or not sam.sharpness_aware_update:
        return train_step(task, sample, model, criterion, optimizer, update_num, ignore_grad, **kwargs)

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    accumulated = [p.grad for _, p in named]
    for _, p in named:
        p.grad = None
    with _no_sync(model):
        loss, sample_size, logging_output = train_step(
            task, sample, model, criterion, optimizer, update_num, False, **kwargs
        )

    # fairseq's zero_grad sets .grad to None: all None means this is the update's first micro-batch.
    sam.record_plain_gradient([p for _, p in named], all(acc is None for acc in accumulated))
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
        for (_, p), acc in zip(named, accumulated):
            if acc is not None:
                p.grad = acc if p.grad is None else p.grad.add_(acc)
    else:
        for (_, p), acc in zip(named, accumulated):
            p.grad = acc
    try:
        _, _, perturbed_output = train_step(
            task, sample, model, criterion, optimizer, update_num, False, **kwargs
        )
    finally:
        if saved is not None:
            perturbation.restore(params, saved)

    logging_output = dict(logging_output)
    logging_output[SHARPNESS_KEY] = perturbed_output["loss"] - logging_output["loss"]
    return loss, sample_size, logging_output


def log_sharpness(logging_outputs) -> None:
    """Logs `sharpness` normalized like fairseq's cross-entropy `loss` (per sample unit, base 2)."""
    if not any(SHARPNESS_KEY in log for log in logging_outputs):
        return
    total = sum(float(log.get(SHARPNESS_KEY, 0)) for log in logging_outputs)
    sample_size = sum(float(log.get("sample_size", 0)) for log in logging_outputs)
    metrics.log_scalar(
        SHARPNESS_KEY, total / (sample_size or 1.0) / math.log(2), sample_size, round=4
    )


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
    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False, **kwargs):
        return sharpness_aware_train_step(
            plain_train_step, self, sample, model, criterion, optimizer, update_num, ignore_grad, **kwargs
        )

    @functools.wraps(plain_reduce_metrics)
    def reduce_metrics(self, logging_outputs, criterion):
        plain_reduce_metrics(self, logging_outputs, criterion)
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
