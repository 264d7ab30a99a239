"""Sharpness as a measurement (experiments/sharpness.py, fairseq-asam-sharpness).

Scale invariance (Kwon et al., 2021, Table 1 / Figure 3): f(x) = (1/a) W₁ ReLU(a W₂ x) is the
same function for every a > 0; its adaptive sharpness with η = 0 does not depend on a, its
plain sharpness does.  The estimator is checked against a brute-force maximum on a quadratic
and against the closed form of a linear loss.
"""

import copy
import json
import math
import os
import re

import fairseq.checkpoint_utils
import numpy as np
import pytest
import torch

from fairseq_asam import perturbation
from fairseq_asam_experiments import correlation, evaluation, sharpness
from fairseq_asam_experiments.errors import SettingError
from fairseq_asam_experiments.sharpness import main as sharpness_main

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one thread

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS_DOC = os.path.join(REPO_ROOT, "docs", "tools.md")  # its "Measuring sharpness" figures
SCALES = (0.1, 1.0, 10.0)
INVARIANCE_TOLERANCE = 0.01  # adaptive sharpness equal within 1% across SCALES
PLAIN_SPREAD = 2.0  # plain sharpness changes by more than this factor across SCALES
TRAIN_UPDATES = 3


def spread(values):
    return max(values) / min(values)


# ---------------------------------------------------------------- a ReLU network, rescaled


MLP_INPUTS, MLP_HIDDEN, MLP_SAMPLES = 4, 8, 64


def mlp_batches(count=2):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(MLP_SAMPLES, MLP_INPUTS, dtype=torch.float64, generator=generator)
    y = torch.randn(MLP_SAMPLES, 1, dtype=torch.float64, generator=generator)
    return list(zip(x.chunk(count), y.chunk(count)))


def squared_error(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).sum(), len(x)


def rescaled_mlp(scale, bias):
    """(1/a) W₁ ReLU(a (W₂ x + b₂)) + b₁, as W₂ ← a W₂, b₂ ← a b₂, W₁ ← W₁ / a."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Linear(MLP_INPUTS, MLP_HIDDEN, bias=bias),
        torch.nn.ReLU(),
        torch.nn.Linear(MLP_HIDDEN, 1, bias=bias),
    ).double()
    with torch.no_grad():
        model[0].weight.mul_(scale)
        model[2].weight.div_(scale)
        if bias:
            model[0].bias.mul_(scale)
    return model


@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("bias", [False, True], ids=["bias-free", "biases-normalized"])
def test_relu_network_adaptive_sharpness_is_scale_invariant(bias, steps):
    batches = mlp_batches()
    losses, adaptive, plain = [], [], []
    for scale in SCALES:
        model = rescaled_mlp(scale, bias)
        estimate = sharpness.estimate_sharpness(
            model, batches, squared_error, rho=0.1, eta=0.0, normalize_biases=bias, steps=steps
        )
        losses.append(estimate.loss)
        adaptive.append(estimate.sharpness)
        plain.append(
            sharpness.estimate_sharpness(
                model, batches, squared_error, 0.1, adaptive=False, steps=steps
            ).sharpness
        )
    assert losses == pytest.approx([losses[0]] * len(SCALES), rel=1e-12)
    assert min(adaptive) > 0
    assert spread(adaptive) < 1 + INVARIANCE_TOLERANCE, adaptive
    assert spread(plain) > PLAIN_SPREAD, plain


def readme_figures(pattern):
    """The figures that `pattern` (a regular expression, one group per figure) finds in the
    docs' "Measuring sharpness" section, as printed; the section's whitespace is collapsed."""
    with open(TOOLS_DOC, encoding="utf-8") as f:
        section = f.read().split("## Measuring sharpness", 1)[1].split("\n## ", 1)[0]
    found = re.search(pattern, " ".join(section.split()))
    assert found, f"docs/tools.md's 'Measuring sharpness' no longer says {pattern!r}"
    return found.groups()


def printed_as(value, printed, rounding):
    """Whether `value` prints as the README's `printed` figure: within half a unit of its last
    decimal, plus `rounding`, what the arithmetic that computed `value` can promise."""
    decimals = len(printed.split(".")[1])
    return abs(value - float(printed)) <= 0.5 * 10**-decimals + rounding


def test_relu_network_figures_of_the_readme():
    """docs/tools.md, "Measuring sharpness": ρ = 0.1, η = 0, bias-free, one step."""
    *quoted_plain, quoted_factor, quoted_adaptive = readme_figures(
        r"plain sharpness is (\S+) / (\S+) / (\S+) \(it changes (\d+)×\), "
        r"adaptive sharpness (\S+) for all three"
    )
    batches = mlp_batches()
    plain = [
        sharpness.estimate_sharpness(
            rescaled_mlp(a, False), batches, squared_error, 0.1, adaptive=False, steps=1
        ).sharpness
        for a in SCALES
    ]
    adaptive = [
        sharpness.estimate_sharpness(
            rescaled_mlp(a, False), batches, squared_error, 0.1, eta=0.0, steps=1
        ).sharpness
        for a in SCALES
    ]
    # fp64 from fp64 inputs: ~1e-12 relative is all the arithmetic adds to the printed rounding.
    assert all(printed_as(x, q, 1e-12 * x) for x, q in zip(plain, quoted_plain)), plain
    assert round(plain[2] / plain[1]) == int(quoted_factor)
    assert all(printed_as(x, quoted_adaptive, 1e-12 * x) for x in adaptive), adaptive


# ---------------------------------------------------------------- a tiny fairseq Transformer


def train_tiny_checkpoint(data_bin, folder, language_pair=True):
    """A checkpoint of the tiny Transformer after a few Adam updates, saved by fairseq's Trainer."""
    from harness import batches, build_trainer

    argv = ["--optimizer", "adam", "--save-dir", str(folder)]
    trainer = build_trainer(data_bin, argv, language_pair=language_pair)
    for sample in batches(trainer, TRAIN_UPDATES):
        trainer.train_step([sample])
    trainer.consolidate_optimizer()
    return trainer.save_checkpoint(str(folder / "checkpoint_last.pt"), {})


@pytest.fixture(scope="module")
def tiny_checkpoint(data_bin, tmp_path_factory):
    return train_tiny_checkpoint(data_bin, tmp_path_factory.mktemp("sharpness-checkpoint"))


@pytest.fixture(scope="module")
def unpaired_checkpoint(data_bin, tmp_path_factory):
    """tiny_checkpoint trained without -s/-t, as fairseq's IWSLT'14 example trains."""
    folder = tmp_path_factory.mktemp("unpaired-checkpoint")
    return train_tiny_checkpoint(data_bin, folder, language_pair=False)


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint, data_bin):
    return sharpness.load_subset(tiny_checkpoint, data_bin, "valid", 10, torch.device("cpu"))


@pytest.mark.parametrize("steps", [1, 3])
def test_transformer_adaptive_sharpness_is_scale_invariant(loaded, steps):
    model, batches, loss_fn = loaded
    losses, adaptive, plain = [], [], []
    for scale in SCALES:
        rescaled = correlation.rescale_ffn(model, scale)
        estimate = sharpness.estimate_sharpness(
            rescaled, batches, loss_fn, rho=0.05, eta=0.0, normalize_biases=True, steps=steps
        )
        losses.append(estimate.loss)
        adaptive.append(estimate.sharpness)
        plain.append(
            sharpness.estimate_sharpness(
                rescaled, batches, loss_fn, 0.05, adaptive=False, steps=steps
            ).sharpness
        )
    # The rescaled weights carry fp32 rounding (~6e-8 relative) and L is reduced in fp32.
    assert losses == pytest.approx([losses[0]] * len(SCALES), rel=1e-6)
    assert min(adaptive) > 0
    assert spread(adaptive) < 1 + INVARIANCE_TOLERANCE, adaptive
    assert spread(plain) > PLAIN_SPREAD, plain


def test_transformer_figures_of_the_readme(loaded):
    """docs/tools.md, "Measuring sharpness": the tiny Transformer's FFN rescaled, ρ = 0.05, η = 0,
    K = 1."""
    quoted = readme_figures(
        r"plain (\S+) / (\S+) / (\S+), adaptive with biases normalized (\S+) / (\S+) / (\S+)\. "
        r".*the invariance \((\S+) / (\S+) / (\S+)\)"
    )
    model, batches, loss_fn = loaded
    rescaled = [correlation.rescale_ffn(model, a) for a in SCALES]
    estimates = [
        sharpness.estimate_sharpness(m, batches, loss_fn, rho=0.05, steps=1, **settings)
        for settings in (dict(adaptive=False), dict(eta=0.0, normalize_biases=True), dict(eta=0.0))
        for m in rescaled
    ]
    for estimate, printed in zip(estimates, quoted):
        # L(w + ε) − L(w) of two losses reduced in fp32 (~1e-6 relative each, L ≈ 4.3): about
        # 1e-5 absolute, more than the sixth decimal the README prints for the adaptive row.
        rounding = 1e-6 * (abs(estimate.perturbed_loss) + abs(estimate.loss))
        assert printed_as(estimate.sharpness, printed, rounding), (estimate.sharpness, printed)


def test_transformer_biases_left_unnormalized_break_the_invariance(loaded):
    """fc1's bias is rescaled too; with T = 1 on it (the optimizer's default) ε on it is not."""
    model, batches, loss_fn = loaded
    adaptive = [
        sharpness.estimate_sharpness(
            correlation.rescale_ffn(model, s), batches, loss_fn, rho=0.05, eta=0.0, steps=1
        ).sharpness
        for s in SCALES
    ]
    assert spread(adaptive) > 1.2, adaptive


def test_one_step_equals_the_optimizers_perturbation(loaded):
    """K = 1: L(w + ε), ε = ρ T² g / ‖T g‖ from perturbation.perturb, g the subset's gradient."""
    model, batches, loss_fn = loaded
    rho, eta = 0.3, 0.01
    estimate = sharpness.estimate_sharpness(model, batches, loss_fn, rho, eta=eta, steps=1)

    model = copy.deepcopy(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    total = [torch.zeros_like(p) for p in params]
    size = 0.0
    for batch in batches:
        loss, batch_size = loss_fn(model, batch)
        for t, g in zip(total, torch.autograd.grad(loss, params, allow_unused=True)):
            if g is not None:
                t += g
        size += batch_size
    grads = [t / size for t in total]
    with torch.no_grad():
        saved = perturbation.perturb(
            params, grads, [perturbation.is_adaptive(n, True) for n, _ in named], rho, eta
        )
        perturbed = sum(float(loss_fn(model, b)[0]) for b in batches) / size
        perturbation.restore(params, saved)
    # L and ‖T⁻¹ε‖ are reduced in fp32 (the estimator sums ‖T g‖ in fp64, perturb in fp32).
    assert estimate.perturbed_loss == pytest.approx(perturbed, rel=1e-6)
    assert estimate.scaled_epsilon_norm == pytest.approx(rho, rel=1e-6)


def test_parameters_mode_and_grads_are_restored(loaded):
    model, batches, loss_fn = loaded
    model = copy.deepcopy(model)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sentinel = next(model.parameters())
    sentinel.grad = torch.full_like(sentinel, 7.0)
    sharpness.estimate_sharpness(model, batches, loss_fn, rho=0.5, steps=2)
    assert model.training
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert torch.equal(sentinel.grad, torch.full_like(sentinel, 7.0))


# ---------------------------------------------------------------- the estimator, in closed form


class Quadratic(torch.nn.Module):
    """L(w) = ½ (w − c)ᵀ A (w − c) + bᵀw on one 2-D tensor named `weight`."""

    def __init__(self, w, c, a, b=(0.0, 0.0)):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor(w, dtype=torch.float64))
        self.register_buffer("c", torch.tensor(c, dtype=torch.float64))
        self.register_buffer("a", torch.tensor(a, dtype=torch.float64))
        self.register_buffer("b", torch.tensor(b, dtype=torch.float64))

    def value(self, w):
        d = w - self.c
        return 0.5 * d @ self.a @ d + self.b @ w


def quadratic_loss(model, _batch):
    return model.value(model.weight), 1


def rotated(eigenvalues, degrees):
    angle = math.radians(degrees)
    r = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return (r @ np.diag(eigenvalues) @ r.T).tolist()


def brute_force_maximum(model, rho, scale):
    """max over ‖δ‖ = ρ (a convex L peaks on the sphere) of L(w + T δ) − L(w), on a fine grid."""
    angles = torch.linspace(0, 2 * math.pi, 200_001, dtype=torch.float64)
    delta = rho * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    with torch.no_grad():
        w = model.weight.detach()
        d = w + delta * scale - model.c
        values = 0.5 * torch.einsum("ni,ij,nj->n", d, model.a, d) + (w + delta * scale) @ model.b
        return float(values.max() - model.value(w))


@pytest.mark.parametrize("adaptive", [False, True], ids=["plain", "adaptive"])
def test_ascent_approaches_the_brute_force_maximum(adaptive):
    # w − c lies mostly along A's flat direction: the first step goes the wrong way.
    model = Quadratic(w=[0.8, -1.5], c=[0.85, -1.6], a=rotated([5.0, 0.5], 30.0))
    rho, eta = 0.6, 0.1
    scale = model.weight.detach().abs() + eta if adaptive else torch.ones(2, dtype=torch.float64)
    best = brute_force_maximum(model, rho, scale)
    values = [
        sharpness.estimate_sharpness(
            model, [None], quadratic_loss, rho, adaptive=adaptive, eta=eta, steps=k
        ).sharpness
        for k in (1, 2, 5, 30)
    ]
    g = model.a.double() @ (model.weight.detach() - model.c)
    epsilon = rho * scale**2 * g / torch.linalg.vector_norm(scale * g)
    with torch.no_grad():
        one_step = float(model.value(model.weight + epsilon) - model.value(model.weight))
    assert values[0] == pytest.approx(one_step, rel=1e-12)  # K = 1 is SAM/ASAM's ε
    assert values[0] < 0.7 * best  # so that the later steps have something to find
    assert values == sorted(values)
    # The grid's angle step (3e-5 rad) can miss the maximum by ~f''·(step/2)²/2 ≈ 3e-10
    # relative (measured 2e-10); fp64 rounding is far smaller.
    assert values[-1] <= best * (1 + 1e-9)
    assert values[-1] == pytest.approx(best, rel=1e-4)


@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.parametrize("adaptive", [False, True], ids=["plain", "adaptive"])
def test_linear_loss_one_step_is_optimal(adaptive, steps):
    """L = bᵀw: max over ‖T⁻¹ε‖ <= ρ of bᵀε is ρ ‖T b‖, reached by the first step."""
    model = Quadratic(w=[0.5, -2.0], c=[0.0, 0.0], a=[[0.0, 0.0], [0.0, 0.0]], b=[3.0, -1.0])
    rho, eta = 0.4, 0.05
    scale = model.weight.detach().abs() + eta if adaptive else torch.ones(2, dtype=torch.float64)
    estimate = sharpness.estimate_sharpness(
        model, [None], quadratic_loss, rho, adaptive=adaptive, eta=eta, steps=steps
    )
    assert estimate.sharpness == pytest.approx(
        rho * float(torch.linalg.vector_norm(scale * model.b)), rel=1e-12
    )
    assert estimate.scaled_epsilon_norm == pytest.approx(rho, rel=1e-12)
    assert estimate.epsilon_norm == pytest.approx(
        rho
        * float(
            torch.linalg.vector_norm(scale**2 * model.b) / torch.linalg.vector_norm(scale * model.b)
        ),
        rel=1e-12,
    )


def test_loss_is_summed_over_batches_then_divided_by_total_sample_size():
    model = rescaled_mlp(1.0, bias=True)
    batches = mlp_batches(count=4)
    uneven = [
        (torch.cat([x for x, _ in batches[:3]]), torch.cat([y for _, y in batches[:3]])),
        batches[3],
    ]
    whole = [(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))]
    estimates = [
        sharpness.estimate_sharpness(model, b, squared_error, 0.2, steps=3) for b in (uneven, whole)
    ]
    # fp64 throughout: the grouping of the batches changes only the order of fp64 sums; the
    # sharpness, a difference of two losses after 3 steps, is given room for the cancellation.
    assert estimates[0].loss == pytest.approx(estimates[1].loss, rel=1e-12)
    assert estimates[0].sharpness == pytest.approx(estimates[1].sharpness, rel=1e-9)
    assert estimates[0].sample_size == estimates[1].sample_size == MLP_SAMPLES


def test_zero_gradient_gives_zero_perturbation():
    model = Quadratic(w=[1.0, 2.0], c=[1.0, 2.0], a=[[1.0, 0.0], [0.0, 1.0]])
    estimate = sharpness.estimate_sharpness(model, [None], quadratic_loss, 0.5, steps=3)
    assert (
        estimate.sharpness,
        estimate.epsilon_norm,
        estimate.best_step,
        estimate.step_losses,
    ) == (0.0, 0.0, 0, [])


def test_non_finite_loss_or_gradient_raises():
    infinite_loss = Quadratic(
        w=[1.0, 2.0], c=[0.0, 0.0], a=[[1.0, 0.0], [0.0, 1.0]], b=[math.inf, 0.0]
    )
    with pytest.raises(FloatingPointError, match="loss is not finite at ascent step 0"):
        sharpness.estimate_sharpness(infinite_loss, [None], quadratic_loss, 0.5)

    def infinite_gradient(model, _batch):  # + √(w₁ − w₁ at w): adds 0 to L and ∞ to ∂L/∂w₁
        w = model.weight
        return model.value(w) + torch.sqrt(w[0] - w[0].detach()), 1

    finite_loss = Quadratic(w=[1.0, 2.0], c=[0.0, 0.0], a=[[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(FloatingPointError, match="gradient is not finite at ascent step 1"):
        sharpness.estimate_sharpness(finite_loss, [None], infinite_gradient, 0.5)


# ---------------------------------------------------------------- inputs, report and CLI


def bad_inputs(checkpoint, data_bin):
    """(the command's arguments, words its one-line error must contain)."""
    good = [checkpoint, data_bin, "--rho", "0.1"]
    return [
        ([os.path.join(data_bin, "missing.pt"), data_bin, "--rho", "0.1"], "missing.pt"),
        (good + ["--rho", "0.0"], "--rho"),
        (good + ["--rho", "-1.0"], "--rho"),
        (good + ["--subset", "test"], "--subset test"),
        (good + ["--max-batches", "0"], "--max-batches"),
        (good + ["--steps", "0"], "--steps"),
        (good + ["--eta", "-0.1"], "--eta"),
        ([checkpoint, os.path.join(data_bin, "nowhere"), "--rho", "0.1"], "nowhere"),
        (good + ["--max-tokens", "0"], "--max-tokens must be >= 1"),
        (good + ["--device", "cuda:99"], "--device cuda:99: this machine has"),
    ]


def test_bad_input_raises_before_any_work(tiny_checkpoint, data_bin, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before the inputs were checked")

    monkeypatch.setattr(sharpness, "load_subset", no_work)
    for argv, words in bad_inputs(tiny_checkpoint, data_bin):
        with pytest.raises(SettingError, match=words):
            sharpness.work(sharpness.parser().parse_args(argv))


def test_cli_bad_input_prints_one_line_and_exits_1(tiny_checkpoint, data_bin, capsys):
    for argv, words in bad_inputs(tiny_checkpoint, data_bin):
        assert sharpness_main(argv) == 1
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err.count("\n") == 1 and words in captured.err, captured.err
        assert captured.err.startswith("fairseq-asam-sharpness: error: ")


def test_cli_end_to_end(tiny_checkpoint, data_bin, tmp_path, capsys):
    """--steps 1: the printed and written sharpness is the one-step ε's, computed here."""
    from harness import one_step_reference

    rho, eta, max_batches = 0.05, 0.01, 2
    report_path = tmp_path / "sharpness.json"
    argv = [tiny_checkpoint, data_bin, "--rho", str(rho), "--eta", str(eta), "--steps", "1"]
    argv += ["--max-batches", str(max_batches), "--device", "cpu", "--json", str(report_path)]
    assert sharpness_main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[2:]] == ["adaptive", "plain"]
    report = json.loads(report_path.read_text())
    assert [e["measure"] for e in report["estimates"]] == ["adaptive", "plain"]
    model, batches, loss_fn = sharpness.load_subset(
        tiny_checkpoint, data_bin, "valid", max_batches, torch.device("cpu")
    )
    for estimate in report["estimates"]:
        loss, perturbed = one_step_reference(
            model, batches, loss_fn, rho, eta, estimate["measure"] == "adaptive"
        )
        assert estimate["num_batches"] == max_batches and estimate["steps"] == 1
        # Losses reduced in fp32 (other code than the reference's): ~1e-6 relative each.
        assert estimate["loss"] == pytest.approx(loss, rel=1e-6)
        assert estimate["perturbed_loss"] == pytest.approx(perturbed, rel=1e-6)
        # The sharpness is their difference: that rounding, in absolute terms, twice.
        rounding = 1e-6 * (abs(loss) + abs(perturbed))
        assert estimate["sharpness"] == pytest.approx(perturbed - loss, abs=rounding)
        # ‖T⁻¹ε‖ is reduced in fp32 from fp32 weights: its rounding (kernels, thread count)
        # allows ~1e-7 relative per operation, so 1e-6, not tighter.
        assert estimate["scaled_epsilon_norm"] == pytest.approx(rho, rel=1e-6)
        printed = next(line for line in lines if line.startswith(estimate["measure"])).split()
        # The table prints the sharpness with 5 significant digits (5e-5 relative at most).
        printing = 5e-5 * abs(perturbed - loss)
        assert float(printed[6]) == pytest.approx(perturbed - loss, abs=rounding + printing)
    assert os.listdir(tmp_path) == ["sharpness.json"]  # no temporary file left behind
    assert sharpness_main([tiny_checkpoint, data_bin, "--rho", "-1"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "fairseq-asam-sharpness: error: --rho must be a finite number > 0, got -1.0"
    ]


# ---------------------------------------------------------------- checkpoint and data do not fit


def _preprocess(argv):
    from fairseq import options
    from fairseq_cli import preprocess

    preprocess.main(options.get_preprocessing_parser().parse_args(argv))


@pytest.fixture(scope="module")
def unfitting_data_bins(tmp_path_factory):
    """Data folders the tiny translation checkpoint (de-en) does not fit, by what is wrong."""
    from fairseq_asam_experiments import synthetic_data

    root = tmp_path_factory.mktemp("unfitting")
    text = synthetic_data.write_corpus(str(root / "text"), {"train": 120, "valid": 24})
    language_model = str(root / "lm-bin")
    _preprocess(
        [
            "--only-source",
            "--trainpref",
            os.path.join(text, "train.de"),
            "--validpref",
            os.path.join(text, "valid.de"),
            "--destdir",
            language_model,
        ]
    )
    other_pair_text = synthetic_data.write_corpus(
        str(root / "fr-es"), {"train": 120, "valid": 24}, src="fr", tgt="es"
    )
    other_pair = synthetic_data.binarize(
        other_pair_text, str(root / "fr-es-bin"), src="fr", tgt="es"
    )
    small_text = synthetic_data.write_corpus(str(root / "small"), {"train": 3, "valid": 24})
    small_vocabulary = synthetic_data.binarize(small_text, str(root / "small-bin"))
    return {
        "no language pair": (language_model, "no valid split for the pair de-en"),
        "another pair": (other_pair, "no valid split for the pair de-en"),
        "another vocabulary": (small_vocabulary, "source dictionary has"),
    }


@pytest.mark.parametrize("case", ["no language pair", "another pair", "another vocabulary"])
def test_checkpoint_and_data_that_do_not_fit_give_one_line(
    tiny_checkpoint, unfitting_data_bins, case, capsys, monkeypatch
):
    folder, words = unfitting_data_bins[case]

    def no_work(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before the pairing was checked")

    monkeypatch.setattr(fairseq.checkpoint_utils, "load_model_ensemble_and_task", no_work)
    assert sharpness_main([tiny_checkpoint, folder, "--rho", "0.1"]) == 1
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith("fairseq-asam-sharpness: error: checkpoint ")
    assert tiny_checkpoint in captured.err and folder in captured.err and words in captured.err


def test_what_the_pairing_check_cannot_see_is_one_line_too(
    tiny_checkpoint, data_bin, capsys, monkeypatch
):
    """A failure inside fairseq's loading (here: injected) still names the checkpoint and data."""

    def fails(*args, **kwargs):
        raise RuntimeError("Error(s) in loading state_dict for TransformerModel:\n size mismatch")

    monkeypatch.setattr(fairseq.checkpoint_utils, "load_model_ensemble_and_task", fails)
    assert sharpness_main([tiny_checkpoint, data_bin, "--rho", "0.1"]) == 1
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and tiny_checkpoint in err
        and data_bin in err
        and "size mismatch" in err
    )


# ---------------------------------------------------------------- a checkpoint without -s/-t


def test_a_checkpoint_trained_without_a_language_pair_is_measured(
    tiny_checkpoint, unpaired_checkpoint, data_bin, tmp_path
):
    """fairseq-train without -s/-t records no pair; fairseq's task infers de-en from the data
    folder, and so does the tool: the same weights give the same report as tiny_checkpoint's."""
    paired = torch.load(tiny_checkpoint, map_location="cpu", weights_only=False)
    unpaired = torch.load(unpaired_checkpoint, map_location="cpu", weights_only=False)
    assert (unpaired["cfg"]["task"]["source_lang"], unpaired["cfg"]["task"]["target_lang"]) == (
        None,
        None,
    )
    assert all(torch.equal(unpaired["model"][k], w) for k, w in paired["model"].items())
    reports = []
    for checkpoint in (tiny_checkpoint, unpaired_checkpoint):
        path = tmp_path / f"report{len(reports)}.json"
        argv = [checkpoint, data_bin, "--rho", "0.05", "--steps", "2", "--max-batches", "2"]
        assert sharpness_main(argv + ["--device", "cpu", "--json", str(path)]) == 0
        reports.append(json.loads(path.read_text())["estimates"])
    assert reports[1] == reports[0] and reports[0][0]["sharpness"] > 0
    # what the evaluation reads of it
    assert evaluation.checkpoint_position(unpaired_checkpoint)["num_updates"] == TRAIN_UPDATES
    os.symlink(unpaired_checkpoint, tmp_path / "checkpoint_best.pt")  # selected by loss
    best_loss = evaluation.parse_checkpoint_choice("best-loss")
    assert evaluation.resolve_checkpoint(str(tmp_path), best_loss)[0].endswith("_best.pt")


def test_no_pair_in_the_checkpoint_nor_in_the_data_is_one_line(
    unpaired_checkpoint, unfitting_data_bins, capsys
):
    folder, _ = unfitting_data_bins["no language pair"]
    assert sharpness_main([unpaired_checkpoint, folder, "--rho", "0.1"]) == 1
    assert capsys.readouterr().err == (
        f"fairseq-asam-sharpness: error: checkpoint {unpaired_checkpoint} (translation, None-None) "
        f"does not fit {folder}: neither names a language pair to translate\n"
    )
