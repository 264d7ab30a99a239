"""The logged `sharpness` and `sharpness_eval` metrics against their definitions, computed here
from the equations: Σ_B (L_B(w + ε_B) − L_B(w)) / Σ_B sample_size, in base 2 like `loss`."""

import copy

import pytest
import torch
from fairseq import metrics
from fairseq.criterions.label_smoothed_cross_entropy import LabelSmoothedCrossEntropyCriterion
from harness import batches, build_trainer, reference_logged_sharpness, sharpness_aware_args

SETTINGS = {"asam": (0.5, 0.01, True), "sam": (0.05, 0.0, False)}


def _train_and_read(trainer, samples):
    """One update; the raw (unrounded) averages of the sharpness meters."""
    with metrics.aggregate(new_root=True) as agg:
        trainer.train_step(samples)
    return {k: float(agg[k].avg) for k in ("sharpness", "sharpness_eval") if k in agg}


def _flags(optimizer, extra=()):
    rho, eta, adaptive = SETTINGS[optimizer]
    return sharpness_aware_args(optimizer, rho, eta if adaptive else None) + list(extra)


@pytest.mark.parametrize("optimizer", ["asam", "sam"])
@pytest.mark.parametrize("update_freq", [1, 2])
def test_logged_sharpness_matches_equations(data_bin, optimizer, update_freq):
    rho, eta, adaptive = SETTINGS[optimizer]
    trainer = build_trainer(data_bin, _flags(optimizer, ["--update-freq", str(update_freq)]))
    samples = batches(trainer, update_freq)
    model0 = copy.deepcopy(trainer.get_model())
    logged = _train_and_read(trainer, samples)
    expected = reference_logged_sharpness(model0, trainer.criterion, samples, rho, eta, adaptive)
    assert logged["sharpness"] == pytest.approx(expected, rel=1e-4)
    assert "sharpness_eval" not in logged  # off by default
    # Controls: half the radius, or the other kind of ball, gives a visibly different value.
    half = reference_logged_sharpness(model0, trainer.criterion, samples, rho / 2, eta, adaptive)
    other = reference_logged_sharpness(model0, trainer.criterion, samples, rho, 0.01, not adaptive)
    assert abs(logged["sharpness"] - half) > 0.1 * abs(expected)
    assert abs(logged["sharpness"] - other) > 0.1 * abs(expected)


def test_eval_sharpness_is_sharpness_without_dropout(data_bin):
    """With dropout 0, train and eval mode compute the same losses: the two metrics agree."""
    trainer = build_trainer(data_bin, _flags("asam", ["--sharpness-eval-interval", "1"]))
    logged = _train_and_read(trainer, batches(trainer, 1))
    assert logged["sharpness_eval"] == pytest.approx(logged["sharpness"], rel=1e-5)


@pytest.mark.parametrize("layerdrop", [False, True])
def test_eval_sharpness_leaves_training_unchanged(data_bin, layerdrop):
    """Dropout 0.1 (and LayerDrop, which draws random numbers in eval mode too): `sharpness_eval`
    is the eval-mode value from the equations, measured on updates 0 and 2 only, and the
    weights after 4 updates are bit for bit those of a run without it (its random numbers come
    from a forked generator; it touches no gradient)."""
    rho, eta, _ = SETTINGS["asam"]
    dropout = ["--dropout", "0.1", "--update-freq", "2"]
    if layerdrop:
        dropout += ["--encoder-layers", "3", "--encoder-layerdrop", "0.5"]
    runs = {}
    for interval in (0, 2):
        trainer = build_trainer(
            data_bin, _flags("asam", dropout + ["--sharpness-eval-interval", str(interval)])
        )
        samples = batches(trainer, 8)
        logs = []
        for update in range(4):
            model0 = copy.deepcopy(trainer.get_model())
            micro = samples[2 * update : 2 * update + 2]
            logged = _train_and_read(trainer, micro)
            expected = reference_logged_sharpness(
                model0, trainer.criterion, micro, rho, eta, True, train_mode=False
            )
            logs.append((logged, expected))
        runs[interval] = (trainer, logs)
    plain_weights = [p.detach() for p in runs[0][0].model.parameters()]
    measured_weights = [p.detach() for p in runs[2][0].model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(plain_weights, measured_weights))
    for update, (logged, expected) in enumerate(runs[2][1]):
        if update % 2 == 0:
            assert logged["sharpness_eval"] == pytest.approx(expected, rel=1e-4)
            # Under dropout the train-mode metric is another (noisy) number.
            assert logged["sharpness"] != pytest.approx(logged["sharpness_eval"], rel=1e-3)
        else:
            assert "sharpness_eval" not in logged


class LogsEveryKey(LabelSmoothedCrossEntropyCriterion):
    """Like wav2vec's and data2vec's criteria: reduce_metrics logs every key of the logging
    outputs that it does not know; `extra` adds keys of its own to every logging output."""

    extra = {}

    def forward(self, model, sample, reduce=True):
        loss, sample_size, logging_output = super().forward(model, sample, reduce=reduce)
        return loss, sample_size, {**logging_output, **self.extra}

    @classmethod
    def reduce_metrics(cls, logging_outputs):
        super().reduce_metrics(logging_outputs)
        known = {"loss", "nll_loss", "ntokens", "nsentences", "sample_size"}
        for key in logging_outputs[0]:
            if key not in known:
                total = sum(float(log.get(key, 0)) for log in logging_outputs)
                metrics.log_scalar(key, total / len(logging_outputs))


def test_criterion_that_logs_every_key_sees_none_of_the_plugins(data_bin):
    rho, eta, adaptive = SETTINGS["asam"]
    trainer = build_trainer(
        data_bin,
        _flags("asam", ["--sam-interval", "2"]),
        make_criterion=lambda task: LogsEveryKey(task, sentence_avg=False, label_smoothing=0.1),
    )
    samples = batches(trainer, 2)
    model0 = copy.deepcopy(trainer.get_model())
    with metrics.aggregate(new_root=True) as agg:
        trainer.train_step(samples[:1])
    expected = reference_logged_sharpness(
        model0, trainer.criterion, samples[:1], rho, eta, adaptive
    )
    assert float(agg["sharpness"].avg) == pytest.approx(expected, rel=1e-4)
    assert [k for k in agg if "sharpness" in k or k.startswith("fairseq_asam")] == ["sharpness"]
    with metrics.aggregate(new_root=True) as agg:
        trainer.train_step(samples[1:])  # a plain update of --sam-interval 2
    assert not [k for k in agg if "sharpness" in k or k.startswith("fairseq_asam")]


def test_a_criterions_own_sharpness_metric_is_left_alone(data_bin):
    class OwnSharpness(LogsEveryKey):
        extra = {"sharpness": 0.5}

    trainer = build_trainer(
        data_bin,
        ["--optimizer", "adam"],
        make_criterion=lambda task: OwnSharpness(task, sentence_avg=False, label_smoothing=0.1),
    )
    with metrics.aggregate(new_root=True) as agg:
        trainer.train_step(batches(trainer, 1))
    assert float(agg["sharpness"].avg) == 0.5


def test_a_criterions_own_sharpness_metric_is_not_mixed_with_the_plugins(
    data_bin, caplog, monkeypatch
):
    from fairseq_asam import two_pass

    monkeypatch.setattr(two_pass, "_SHADOWED", set())  # warned once per process: not yet here

    class OwnSharpness(LogsEveryKey):
        extra = {"sharpness": 0.5}

    trainer = build_trainer(
        data_bin,
        _flags("asam", []),
        make_criterion=lambda task: OwnSharpness(task, sentence_avg=False, label_smoothing=0.1),
    )
    with metrics.aggregate(new_root=True) as agg, caplog.at_level("WARNING"):
        trainer.train_step(batches(trainer, 1))
        trainer.train_step(batches(trainer, 1))
    assert float(agg["sharpness"].avg) == 0.5  # the criterion's alone, not averaged with ours
    warnings = [r for r in caplog.records if "logs its own 'sharpness'" in r.getMessage()]
    assert len(warnings) == 1  # said once


def _summed(a, b, c, x):  # autograd.grad hands a and b one and the same tensor
    return ((a + b) * c[:3] * x[:3]).sum()


def _overlapping(a, b, c, x):  # a's and b's gradients: overlapping views of one tensor
    zero = a.new_zeros(1)
    return ((torch.cat([a, zero]) + torch.cat([zero, b])) * c * x).sum()


def _expanded(a, b, c, x):  # b's gradient: one number expanded (stride 0)
    return (a * c[:3] * x[:3]).sum() * b.sum()


SHARED_GRADIENTS = {"summed": _summed, "overlapping": _overlapping, "expanded": _expanded}


class ThreeWeights(torch.nn.Module):
    def __init__(self, loss):
        super().__init__()
        self.loss = loss
        self.a_weight = torch.nn.Parameter(torch.tensor([0.3, -0.7, 1.1]))
        self.b_weight = torch.nn.Parameter(torch.tensor([0.5, 0.2, -0.4]))
        self.c_weight = torch.nn.Parameter(torch.tensor([1.5, -0.6, 0.9, 0.4]))

    def forward(self, x):
        return self.loss(self.a_weight, self.b_weight, self.c_weight, x)


@pytest.mark.parametrize("shape", SHARED_GRADIENTS)
def test_eval_sharpness_when_parameters_share_gradient_memory(shape):
    """`sharpness_eval` is L(w + ε) − L(w) with ε = ρ T² g / ‖T g‖ per parameter, also when
    autograd.grad returns gradients that share memory (ε built in place in them would be
    scaled twice where they overlap, or fail to write an expanded one)."""
    from types import SimpleNamespace

    from fairseq_asam.two_pass import eval_mode_sharpness

    model, x = ThreeWeights(SHARED_GRADIENTS[shape]), torch.tensor([1.0, 2.0, -1.5, 0.7])
    named = list(model.named_parameters())
    grads = torch.autograd.grad(model(x), [p for _, p in named])
    # The case under test; fp32 gradients, which perturb builds ε in, in place.
    a, b = grads[0], grads[1]
    assert (
        a.dtype == torch.float32
        and {
            "summed": a.data_ptr() == b.data_ptr(),
            "overlapping": a.data_ptr() != b.data_ptr()
            and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr(),
            "expanded": b.stride() == (0,),
        }[shape]
    )

    def criterion(model_, sample):
        loss = model_(sample)
        return loss, 1, {"loss": loss.detach()}

    rho, eta = 0.5, 0.01
    sam = SimpleNamespace(rho=rho, eta=eta, adaptive=True)
    rise, sample_size = eval_mode_sharpness(x, named, model, criterion, sam, optimizer=None)
    # The reference, from the equations in fp64 (every tensor is named *weight: T = |w| + η).
    with torch.no_grad():
        w = [p.detach().clone() for _, p in named]
        w64, g64, x64 = [wi.double() for wi in w], [gi.double() for gi in grads], x.double()
        t = [wi.abs() + eta for wi in w64]
        norm = torch.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi in zip(t, g64)))
        moved = [wi + rho * ti * ti * gi / norm for wi, ti, gi in zip(w64, t, g64)]
        expected = float(model.loss(*moved, x64) - model.loss(*w64, x64))
    assert sample_size == 1
    # A rise of order 1 from fp32 losses of order 1: within 1e-5 relative of the fp64 value.
    assert float(rise) == pytest.approx(expected, rel=1e-5)
    assert all(torch.equal(p, wi) for (_, p), wi in zip(named, w))  # restored bit for bit
