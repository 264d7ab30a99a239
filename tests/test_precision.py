"""fairseq_asam_experiments.precision: effective ε under fp16/bf16 rounding, its comparison with
ε, unbiased stochastic rounding, the autocast cast set, and one small end-to-end measurement."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fairseq_asam import perturbation
from fairseq_asam_experiments import precision as P
from fairseq_asam_experiments import recipe
from fairseq_asam_experiments.errors import SettingError

FP16_ULP_AT_1 = 2.0**-10  # spacing of fp16 just above 1.0 (10 mantissa bits)
FP16_ULP_BELOW_1 = 2.0**-11  # spacing just below 1.0
BF16_ULP_AT_1 = 2.0**-7  # 7 stored mantissa bits
# Bound for a mean of Bernoulli-driven draws: |mean − exact| < Z_BOUND · std of the mean
# (a false failure has probability ~6e-7 per check).
Z_BOUND = 5.0
DRAWS = 200_000


def _t(*values):
    return torch.tensor(values, dtype=torch.float32)


# ------------------------------------------------------------------ round to nearest


def test_epsilon_below_half_an_ulp_is_lost_above_is_kept_in_fp16():
    held = [_t(1.0, 1.0, 1.0, 1.0, 1.0)]
    # 4e-4 < ulp/2 = 4.88e-4 (lost); 6e-4 > ulp/2 (kept, becomes a whole ulp);
    # exactly ulp/2 ties to even (1.0, lost); −3e-4: below 1.0 the spacing halves, so −3e-4 is
    # more than half of 2^-11 = 4.88e-4 and is kept as −2^-11.
    eps = [_t(4e-4, 6e-4, FP16_ULP_AT_1 / 2, -3e-4, -1e-4)]
    eff = P.effective_epsilon(held, eps, torch.float16)
    assert eff[0].tolist() == [0.0, FP16_ULP_AT_1, 0.0, -FP16_ULP_BELOW_1, 0.0]


def test_same_epsilon_is_lost_in_bf16_and_kept_in_fp32():
    held = [_t(1.0, 1.0)]
    eps = [_t(6e-4, 5e-3)]  # bf16 half ulp at 1 is 3.9e-3
    assert P.effective_epsilon(held, eps, torch.bfloat16)[0].tolist() == [0.0, BF16_ULP_AT_1]
    fp32 = P.effective_epsilon(held, eps, torch.float32)[0]
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
    expected = P.effective_epsilon([w.float() for w in w16], eps, torch.float16)
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
    with pytest.raises(OverflowError, match="float16"):
        P.stochastic_round(_t(70000.0), torch.float16)


# ------------------------------------------------------------------ comparing ε


def test_compare_epsilon_exact_numbers():
    intended = [_t(6e-4, 4e-4, 0.0), _t(-3e-4)]
    effective = [_t(FP16_ULP_AT_1, 0.0, 0.0), _t(-FP16_ULP_BELOW_1)]
    s = P.compare_epsilon(effective, intended)
    assert (s.numel, s.nonzero, s.lost, s.changed) == (4, 3, 1, 2)
    assert s.lost_fraction == pytest.approx(1 / 3)
    assert s.changed_fraction == pytest.approx(0.5)
    # all from the fp32 values of the inputs (6e-4 etc. are not exact in fp32)
    i = [float(_t(6e-4)), float(_t(4e-4)), float(_t(-3e-4))]
    e = [FP16_ULP_AT_1, 0.0, -FP16_ULP_BELOW_1]
    dot = sum(a * b for a, b in zip(i, e))
    ni, ne = math.sqrt(sum(a * a for a in i)), math.sqrt(sum(b * b for b in e))
    assert s.cosine == pytest.approx(dot / (ni * ne), rel=1e-12)
    # by hand, in units of 1e-4: (6·9.766 + 3·4.883) / (√61 · √(9.766² + 4.883²)) = 73.24 / 85.27
    assert s.cosine == pytest.approx(0.85890, abs=1e-5)
    err = math.sqrt(sum((b - a) ** 2 for a, b in zip(i, e)))
    assert s.relative_l2_error == pytest.approx(err / ni, rel=1e-12)
    assert s.norm_ratio == pytest.approx(ne / ni, rel=1e-12)


def test_compare_epsilon_identical_and_all_lost():
    eps = [_t(1.0, -2.0, 0.0)]
    same = P.compare_epsilon(eps, eps)
    assert (same.lost_fraction, same.cosine, same.relative_l2_error) == (0.0, 1.0, 0.0)
    lost = P.compare_epsilon([torch.zeros(3)], eps)
    assert lost.lost_fraction == 1.0 and lost.relative_l2_error == 1.0 and math.isnan(lost.cosine)


def test_tensor_groups():
    assert P.tensor_group("decoder.embed_tokens.weight") == "embedding"
    assert P.tensor_group("encoder.layers.0.self_attn_layer_norm.bias") == "layer_norm"
    assert P.tensor_group("encoder.layers.0.fc1.bias") == "bias"
    assert P.tensor_group("decoder.layers.1.encoder_attn.q_proj.weight") == "linear_weight"


# ------------------------------------------------------------------ stochastic rounding


@pytest.mark.parametrize(
    "dtype,x,lo,hi",
    [
        (torch.float16, 1.0 + 0.3 * FP16_ULP_AT_1, 1.0, 1.0 + FP16_ULP_AT_1),
        (torch.float16, -(1.0 + 0.7 * FP16_ULP_AT_1), -(1.0 + FP16_ULP_AT_1), -1.0),
        (torch.float16, 3.3e-6, 55 * 2.0**-24, 56 * 2.0**-24),  # subnormal: spacing 2^-24
        (torch.bfloat16, 1.0 + 0.2 * BF16_ULP_AT_1, 1.0, 1.0 + BF16_ULP_AT_1),
    ],
)
def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour(dtype, x, lo, hi):
    x32 = float(_t(x))
    assert lo < x32 < hi
    draws = P.stochastic_round(torch.full((DRAWS,), x32), dtype, torch.Generator().manual_seed(7))
    values = set(draws.unique().tolist())
    assert values == {lo, hi}  # both neighbours occur, nothing else
    p_hi = (x32 - lo) / (hi - lo)
    bound = Z_BOUND * (hi - lo) * math.sqrt(p_hi * (1 - p_hi) / DRAWS)
    assert abs(draws.double().mean().item() - x32) < bound
    # negative control: round to nearest on the same input is biased far beyond that bound
    nearest = P.round_nearest(torch.full((DRAWS,), x32), dtype)
    assert abs(nearest.double().mean().item() - x32) > 10 * bound


def test_stochastic_rounding_of_random_values_returns_a_bracketing_neighbour():
    torch.manual_seed(1)
    x = torch.randn(50_000) * torch.logspace(-6, 2, 50_000)
    for dtype in (torch.float16, torch.bfloat16):
        out = P.stochastic_round(x, dtype, torch.Generator().manual_seed(3))
        assert torch.equal(out.to(dtype).float(), out)  # representable
        below = out <= x
        # one ulp away at most: the bracketing pair of x has no representable value in between
        nxt = torch.nextafter(
            out.to(dtype), torch.where(below, math.inf, -math.inf).to(dtype)
        ).float()
        assert bool(torch.where(below, nxt >= x, nxt <= x).all())
        assert bool(((out - x).abs() < (nxt - out).abs() + 1e-30).all())
        exact = x.to(dtype).float()
        assert torch.equal(P.stochastic_round(exact, dtype), exact)  # representable values stay


def test_stochastic_rounding_keeps_sub_ulp_epsilon_in_expectation():
    """ε = 0.1 ulp on w = 1: round to nearest loses it in every draw, stochastic rounding keeps
    it in the mean over draws (but each draw moves a whole ulp or nothing)."""
    held = [torch.ones(DRAWS)]
    eps = [torch.full((DRAWS,), 0.1 * FP16_ULP_AT_1)]
    nearest = P.effective_epsilon(held, eps, torch.float16, P.NEAREST)
    assert P.compare_epsilon(nearest, eps).lost_fraction == 1.0
    sr = P.effective_epsilon(
        held, eps, torch.float16, P.STOCHASTIC, torch.Generator().manual_seed(0)
    )
    stats = P.compare_epsilon(sr, eps)
    assert set(sr[0].unique().tolist()) == {0.0, FP16_ULP_AT_1}
    assert stats.lost_fraction == pytest.approx(0.9, abs=Z_BOUND * math.sqrt(0.09 / DRAWS))
    assert sr[0].double().mean().item() == pytest.approx(
        0.1 * FP16_ULP_AT_1, rel=Z_BOUND * 3 / math.sqrt(DRAWS)
    )
    # per draw it is noise: ‖ε_eff‖/‖ε‖ = √(p·ulp²)/(0.1 ulp) = √10
    assert stats.norm_ratio == pytest.approx(math.sqrt(10), rel=0.02)


# ------------------------------------------------------------------ autocast


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(5, 4)
        self.lin = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.q_bias = nn.Parameter(torch.zeros(2))
        self.k_bias = nn.Parameter(torch.zeros(2))
        self.proj_weight = nn.Parameter(torch.randn(4, 4))

    def forward(self, tokens):
        x = self.norm(self.embed(tokens))
        bias = torch.cat([self.q_bias, self.k_bias])  # concatenated in fp32, then cast by linear
        return F.linear(self.lin(x).float(), self.proj_weight, bias).float().sum()


def test_autocast_cast_parameters():
    if not P.autocast_supported(torch.bfloat16)[0]:
        pytest.skip("no CPU autocast to bf16 in this torch")
    model = _Tiny()
    cast = P.autocast_cast_parameters(model, lambda: model(torch.tensor([1, 2])), torch.bfloat16)
    assert cast == {"lin.weight", "lin.bias", "proj_weight", "q_bias", "k_bias"}


def test_bad_names_raise_naming_the_flag(tmp_path):
    with pytest.raises(SettingError, match="--precisions"):
        P._dtype("fp8", P.WEIGHT_DTYPES, "--precisions")
    with pytest.raises(SettingError, match="data-bin folder not found: .*nope"):
        P.check_precision_inputs(str(tmp_path / "nope"), None, True, 1, 4096, 1, "train")
    with pytest.raises(SettingError, match="--checkpoint"):
        P.check_precision_inputs(str(tmp_path), str(tmp_path / "c.pt"), False, 1, 4096, 1, "train")
    with pytest.raises(SettingError, match="exactly one"):
        P.check_precision_inputs(str(tmp_path), None, False, 1, 4096, 1, "train")
    with pytest.raises(SettingError, match="--subset train"):
        P.check_precision_inputs(str(tmp_path), None, True, 1, 4096, 1, "train")


# ------------------------------------------------------------------ one small measurement


def test_measure_batch_on_a_tiny_transformer(data_bin):
    loaded = P.init_model(data_bin, 2, (recipe.RECIPE_ARGS, recipe.TINY_OVERRIDES_ARGS))
    batch = P.fixed_batches(loaded, "train", 100, 1, seed=1)[0]
    probe = P.LossProbe(loaded.model, loaded.criterion, batch)
    before = probe.weights()
    result = P.measure_batch(
        probe, weight_precisions=("fp32", "bf16"), sr_seeds=2, autocast_modes=("amp-bf16",)
    )
    assert all(torch.equal(a, b) for a, b in zip(before, probe.weights()))  # weights restored
    rows = {
        (r["optimizer"], r["mode"], r["precision"], r["rounding"], r["seed"]): r
        for r in result["rows"]
    }
    for opt in ("sam", "asam"):
        fp32 = rows[(opt, "weights", "fp32", "nearest", None)]
        assert fp32["cosine"] == pytest.approx(1.0, abs=1e-6) and fp32["lost_fraction"] < 0.05
        assert fp32["increase_a"] == pytest.approx(fp32["target_increase"], rel=1e-3)
        assert fp32["target_increase"] > 0  # one ascent step raises the loss
        bf16 = rows[(opt, "weights", "bf16", "nearest", None)]
        assert bf16["lost_fraction"] > fp32["lost_fraction"] and bf16["cosine"] < fp32["cosine"]
        assert (
            bf16["grad_change_cosine"] < 1.0 and bf16["grad_error"] > 0
        )  # pass 2's gradient is compared
        # Stochastic rounding keeps the direction of pass 2's gradient change (0.996 measured);
        # its sign control, the same noise without ε's direction, does not (0.07–0.54).
        stochastic = rows[(opt, "weights", "bf16", "stochastic", 1)]["grad_change_cosine"]
        control = rows[(opt, "weights", "bf16", "sign-control", 1)]["grad_change_cosine"]
        assert stochastic > 0.9 > control, (stochastic, control)
        noise = rows[(opt, "weights", "bf16", "noise-floor", 0)]
        assert abs(noise["cosine"]) < 0.2  # SR noise of w alone does not point along ε
        assert (opt, "autocast", "amp-bf16", "nearest", None) in rows
    summary = P.summarize_precision_rows(result["rows"])
    sr = next(
        e
        for e in summary
        if e["precision"] == "bf16" and e["rounding"] == "stochastic" and e["optimizer"] == "asam"
    )
    assert sr["count"] == 2 and sr["cosine"]["n"] == 2
    assert "| asam | weights | bf16 | stochastic | 2 |" in P.format_summary(summary)
