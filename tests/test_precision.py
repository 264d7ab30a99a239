"""fairseq_asam_experiments.precision: effective ε under fp16/bf16 rounding, its comparison with
ε, the autocast cast set, a whole measurement on a linear model against the equations, and the
command on a tiny Transformer."""

import functools
import json
import math

import pytest
import torch
from torch import nn

from fairseq_asam import perturbation
from fairseq_asam_experiments import loading, recipe
from fairseq_asam_experiments import precision as P

FP16_ULP_AT_1 = 2.0**-10  # spacing of fp16 just above 1.0 (10 mantissa bits)
FP16_ULP_BELOW_1 = 2.0**-11  # spacing just below 1.0
BF16_ULP_AT_1 = 2.0**-7  # 7 stored mantissa bits


def _t(*values):
    return torch.tensor(values, dtype=torch.float32)


# ------------------------------------------------------------------ round to nearest


def test_epsilon_below_half_an_ulp_is_lost_above_is_kept_in_fp16():
    held = [_t(1.0, 1.0, 1.0, 1.0, 1.0)]
    # 4e-4 < ulp/2 = 4.88e-4 (lost); 6e-4 > ulp/2 (kept, becomes a whole ulp);
    # exactly ulp/2 ties to even (1.0, lost); −3e-4: below 1.0 the spacing halves, so −3e-4 is
    # more than half of 2^-11 = 4.88e-4 and is kept as −2^-11.
    eps = [_t(4e-4, 6e-4, FP16_ULP_AT_1 / 2, -3e-4, -1e-4)]
    eff = P.effective_epsilon(held, eps, [torch.float16])
    assert eff[0].tolist() == [0.0, FP16_ULP_AT_1, 0.0, -FP16_ULP_BELOW_1, 0.0]


def test_same_epsilon_is_lost_in_bf16_and_kept_in_fp32():
    held = [_t(1.0, 1.0)]
    eps = [_t(6e-4, 5e-3)]  # bf16 half ulp at 1 is 3.9e-3
    assert P.effective_epsilon(held, eps, [torch.bfloat16])[0].tolist() == [0.0, BF16_ULP_AT_1]
    fp32 = P.effective_epsilon(held, eps, [torch.float32])[0]
    assert torch.allclose(
        fp32, eps[0], rtol=1e-3, atol=0
    )  # kept, up to fp32's own rounding of 1 + ε


def test_effective_epsilon_matches_what_perturb_does_to_fp16_parameters():
    """The measurement's round_p(w_p + ε) − w_p is exactly what the plugin's in-place add does
    to fp16 parameters (fp32 ε), entry for entry."""
    torch.manual_seed(0)
    w16 = [(torch.randn(257) * 0.1).half(), (torch.randn(64) * 0.02).half()]
    grads = [torch.randn(257), torch.randn(64)]
    names = ["fc.weight", "fc.bias"]
    eps = P.sharpness_epsilon(names, [w.float() for w in w16], grads, P.ASAM)
    expected = P.effective_epsilon([w.float() for w in w16], eps, [torch.float16] * 2)
    params = [w.clone() for w in w16]
    saved = perturbation.perturb(
        params, [g.clone() for g in grads], [True, False], P.ASAM.rho, P.ASAM.eta
    )
    assert saved is not None
    for after, before, exp in zip(params, w16, expected):
        assert torch.equal(after.float() - before.float(), exp)
    assert sum(int((e == 0).sum()) for e in expected) > 0  # the case is not vacuous: some ε is lost


def test_sharpness_epsilon_against_hand_computed_values():
    names = ["a.weight", "a.bias"]
    weights = [_t(1.0, -2.0), _t(0.5)]
    grads = [_t(3.0, 4.0), _t(1.0)]
    # ASAM, ρ 0.2, η 0.01: T = |w| + η on the weight only; Tg = (3.03, 8.04), bias g = 1.
    norm = math.sqrt(3.03**2 + 8.04**2 + 1.0)
    eps = P.sharpness_epsilon(names, weights, grads, P.ASAM)
    assert eps[0].tolist() == pytest.approx(
        [0.2 * 1.01**2 * 3 / norm, 0.2 * 2.01**2 * 4 / norm], rel=1e-6
    )
    assert eps[1].tolist() == pytest.approx([0.2 * 1.0 / norm], rel=1e-6)
    # SAM, ρ 0.1: ε = ρ g / ‖g‖ with ‖g‖ = √26.
    eps = P.sharpness_epsilon(names, weights, grads, P.SAM)
    assert eps[0].tolist() == pytest.approx([0.3 / math.sqrt(26), 0.4 / math.sqrt(26)], rel=1e-6)
    assert grads[0].tolist() == [3.0, 4.0]  # the caller's gradients are left alone


def test_overflow_raises():
    with pytest.raises(OverflowError, match="float16"):
        P.round_nearest(_t(70000.0), torch.float16)


# ------------------------------------------------------------------ comparing ε


def test_compare_epsilon_exact_numbers():
    intended = [_t(6e-4, 4e-4, 0.0), _t(-3e-4)]
    effective = [_t(FP16_ULP_AT_1, 0.0, 0.0), _t(-FP16_ULP_BELOW_1)]
    s = P.compare_epsilon(effective, intended)
    assert s["lost"] == 1 / 3  # 4e-4 lost of three non-zero entries; the zero entry not counted
    # all from the fp32 values of the inputs (6e-4 etc. are not exact in fp32)
    i = [float(_t(6e-4)), float(_t(4e-4)), float(_t(-3e-4))]
    e = [FP16_ULP_AT_1, 0.0, -FP16_ULP_BELOW_1]
    dot = sum(a * b for a, b in zip(i, e))
    ni, ne = math.sqrt(sum(a * a for a in i)), math.sqrt(sum(b * b for b in e))
    # float64 sums of fp32 inputs: equal to the Python-float reference up to 1e-12 relative
    assert s["cosine"] == pytest.approx(dot / (ni * ne), rel=1e-12)
    # by hand, in units of 1e-4: (6·9.766 + 3·4.883) / (√61 · √(9.766² + 4.883²)) = 73.24 / 85.27
    assert s["cosine"] == pytest.approx(0.85890, abs=1e-5)
    err = math.sqrt(sum((b - a) ** 2 for a, b in zip(i, e)))
    assert s["l2_error"] == pytest.approx(err / ni, rel=1e-12)


def test_compare_epsilon_identical_and_all_lost():
    eps = [_t(1.0, -2.0, 0.0)]
    same = P.compare_epsilon(eps, eps)
    assert (same["lost"], same["cosine"], same["l2_error"]) == (0.0, 1.0, 0.0)
    lost = P.compare_epsilon([torch.zeros(3)], eps)
    assert lost["lost"] == 1.0 and lost["l2_error"] == 1.0 and math.isnan(lost["cosine"])


# ------------------------------------------------------------------ autocast


class _RawParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.q_bias = nn.Parameter(torch.zeros(4))


def test_autocast_cast_set_refuses_a_module_it_has_no_rule_for():
    with pytest.raises(P.SettingError, match=r"no cast rule for  \(_RawParameter\)"):
        P.autocast_cast_parameters(_RawParameter())


def test_autocast_casts_exactly_the_named_parameters_of_a_transformer(data_bin):
    """On the tiny preset's Transformer with bf16-representable weights, under bf16 autocast: a
    nudge of a tensor by less than half a bf16 step leaves the loss bit for bit the same exactly
    when autocast casts that tensor (the nudge is rounded away), and changes it otherwise."""
    if not P.autocast_supported(torch.bfloat16)[0]:
        pytest.skip("no CPU autocast to bf16 in this torch")
    loaded = P.init_model(data_bin, 1, args_files=(recipe.RECIPE_ARGS, recipe.TINY_OVERRIDES_ARGS))
    model, options = loaded.model.eval(), dict(max_tokens=200, seed=1)
    (sample,) = loading.split_batches(loaded, "train", 1, **options)
    cast = P.autocast_cast_parameters(model)
    shared = "decoder.embed_tokens.weight"  # the output projection's: cast there, not in lookups
    assert shared in cast and any("layer_norm" in n for n, _ in model.named_parameters())

    def loss():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return loaded.criterion(model, sample)[0].item()

    with torch.no_grad():
        for p in model.parameters():  # no zeros: a relative nudge moves every entry
            p.copy_((torch.randn_like(p) * 0.1 + 0.5).bfloat16().float())
    base = loss()
    for name, p in model.named_parameters():
        with torch.no_grad():
            saved = p.clone()
            p.mul_(1 + 2**-10)  # a bf16 step is 2^-8 to 2^-7 of the value
            changed = loss() != base
            p.copy_(saved)
        assert changed == (name not in cast or name == shared), name


# ------------------------------------------------------------------ a whole measurement


class _Regression(nn.Module):
    """y = X θ̃ (θ̃ = weight and bias) under the summed squared error: ∇L in closed form."""

    def __init__(self, inputs):
        super().__init__()
        self.fc = nn.Linear(inputs, 1)

    def forward(self, x):
        return self.fc(x).squeeze(-1)


class _SquaredError(nn.Module):
    def forward(self, model, batch):
        x, y = batch
        return ((model(x) - y) ** 2).sum(), len(y), {}


def _regression(seed=0, inputs=64, samples=32):
    """Input columns of scales 1e-5 to 1, so that ε on the small ones falls below half an ulp."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, inputs, generator=g) * torch.logspace(-5, 0, inputs)
    model = _Regression(inputs)
    with torch.no_grad():
        model.fc.weight.copy_(torch.randn(1, inputs, generator=g) + 2.0)
        model.fc.bias.fill_(0.3)
    y = x @ torch.randn(inputs, generator=g) + torch.randn(samples, generator=g)
    return model, (x, y)


def _reference(model, batch, setting, dtype, autocast=False):
    """Lost, cosine and kept of the row, in float64 from the equations: L(θ) = Σ(X̃θ − y)²/n,
    ∇L = 2X̃ᵀ(X̃θ − y), ε = ρT²g/‖Tg‖ (T = |w| + η on the weight only)."""
    x, y = (t.double() for t in batch)
    xt = torch.cat([x, torch.ones(len(y), 1, dtype=torch.float64)], 1)
    theta = torch.cat([model.fc.weight.detach().flatten(), model.fc.bias.detach()])

    def loss(t):
        return float(((xt @ t.double() - y) ** 2).sum()) / len(y)

    def rnd(t):  # fp32 values rounded to `dtype`
        return t.float().to(dtype).double()

    held = theta.double() if autocast else rnd(theta)
    g = 2 * xt.T @ (xt @ held - y)
    scale = torch.ones_like(held)
    if setting.adaptive:
        scale[:-1] = held[:-1].abs() + setting.eta
    eps = setting.rho * scale**2 * g / torch.linalg.norm(scale * g)
    # the code adds ε to the weights in fp32, then rounds
    if autocast:  # fp32 weights, both linear tensors cast per op: rounded before and after
        eff = rnd(theta + eps.float()) - rnd(theta)
        target, base_weights = loss(theta + eps.float()) - loss(theta), rnd(theta)
    else:
        eff = rnd(held.float() + eps.float()) - held
        target, base_weights = loss(held + eps) - loss(held), held
    return dict(
        lost=float(((eps != 0) & (eff == 0)).sum()) / float((eps != 0).sum()),
        cosine=float(eff @ eps / (eff.norm() * eps.norm())),
        kept=(loss(base_weights + eff) - loss(base_weights)) / target,
    )


# fp32 losses of size ~1 whose differences are ~1e-2 of them: about 1e-5 relative error after
# cancellation; ε from fp32 against float64: 1e-6.
MEASURE_REL = 1e-4


@pytest.mark.parametrize("setting", [P.SAM, P.ASAM], ids=["sam", "asam"])
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_weight_row_against_the_equations(setting, precision):
    model, batch = _regression()
    probe = P.LossProbe(model, _SquaredError(), batch)
    before = [p.detach().clone() for p in probe.params]
    (row,) = P.measure_batch(probe, (precision,), (setting,))["rows"]
    assert all(torch.equal(a, b) for a, b in zip(before, probe.params))  # weights put back
    expected = _reference(model, batch, setting, P.WEIGHT_DTYPES[precision])
    assert 0 < expected["lost"] < 1  # some of ε is lost, not all
    assert {k: row[k] for k in expected} == pytest.approx(expected, rel=MEASURE_REL)


def test_autocast_row_against_the_equations():
    if not P.autocast_supported(torch.bfloat16)[0]:
        pytest.skip("no CPU autocast to bf16 in this torch")
    model, batch = _regression(seed=1)
    result = P.measure_batch(P.LossProbe(model, _SquaredError(), batch), ("amp-bf16",), (P.ASAM,))
    assert result["autocast"]["amp-bf16"] == "2 of 2 tensors cast"  # addmm: weight and bias
    (row,) = result["rows"]
    expected = _reference(model, batch, P.ASAM, torch.bfloat16, autocast=True)
    assert {k: row[k] for k in expected} == pytest.approx(expected, rel=MEASURE_REL)


def test_fp32_row_keeps_all_of_epsilon():
    """Negative control of the rounding: fp32 weights keep ε (kept 1, cosine 1) on this model."""
    model, batch = _regression()
    probe = P.LossProbe(model, _SquaredError(), batch)
    (row,) = P.measure_batch(probe, ("fp32",), (P.ASAM,))["rows"]
    assert row["kept"] == pytest.approx(1, rel=MEASURE_REL) and row["cosine"] > 1 - 1e-6


# ------------------------------------------------------------------ the command


@pytest.fixture
def tiny_init(monkeypatch):
    """--init builds the tiny preset's model (the recipe's own is 31.6 M parameters)."""
    files = (recipe.RECIPE_ARGS, recipe.TINY_OVERRIDES_ARGS)
    monkeypatch.setattr(P, "init_model", functools.partial(P.init_model, args_files=files))


def test_command_on_a_tiny_transformer(data_bin, tiny_init, tmp_path, capsys):
    out = tmp_path / "precision.json"
    flags = ["--init", "--data-bin", data_bin, "--max-tokens", "100", "--batches", "2"]
    flags += ["--precisions", "fp32,bf16", "--autocast", "amp-bf16", "--seed", "2"]
    assert P.main(flags + ["--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {(r["batch"], r["optimizer"], r["precision"]): r for r in result["rows"]}
    assert len(rows) == len(result["rows"]) == 2 * 2 * 3  # batches × optimizers × modes
    for batch in (0, 1):
        for opt in ("sam", "asam"):
            fp32, bf16 = rows[(batch, opt, "fp32")], rows[(batch, opt, "bf16")]
            amp = rows[(batch, opt, "amp-bf16")]
            assert fp32["cosine"] == pytest.approx(1.0, abs=1e-6) and fp32["lost"] < 0.05
            assert fp32["kept"] == pytest.approx(1.0, rel=1e-3) and fp32["target"] > 0
            assert bf16["lost"] > fp32["lost"] and bf16["cosine"] < fp32["cosine"]
            assert amp["mode"] == "autocast" and 0 < amp["lost"] < 1
    printed = capsys.readouterr().out
    assert "| 1 | asam | autocast | amp-bf16 |" in printed
    assert "amp-bf16: 33 of 44 tensors cast" in printed  # the Linear layers' weights and biases


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--data-bin", "{tmp}/nope"], "--data-bin: folder not found"),
        (["--checkpoint", "{tmp}/c.pt"], "--checkpoint: file not found"),
        (["--subset", "test"], "--subset test: no such split"),
        (["--batches", "0"], "--batches is too small: 0"),
    ],
)
def test_bad_input_is_one_line_naming_the_flag(data_bin, tmp_path, capsys, flags, message):
    argv = ["--data-bin", data_bin] + [f.format(tmp=tmp_path) for f in flags]
    argv += [] if "--checkpoint" in flags else ["--init"]
    assert P.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"fairseq-asam-precision: error: {message}") and err.count("\n") == 1


def test_unknown_precision_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        P.parser().parse_args(["--init", "--data-bin", "d", "--precisions", "fp16,fp8"])
    assert "choose from fp32, fp16, bf16" in capsys.readouterr().err
