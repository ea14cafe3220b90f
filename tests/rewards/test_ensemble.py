import math

import numpy as np
import pytest
import torch

from mmalign import MediaBatch
from mmalign.rewards import Reward, RewardOutput
from mmalign.rewards.ensemble import Ensemble, UncertaintyWeighted
from mmalign.rewards.jpeg import JpegCompressibility

nan, inf = math.nan, math.inf


class Seq(Reward):
    """Returns the next row of ``rows`` on each call (a stochastic or drifting reward)."""

    def __init__(self, name, *rows, uncertainty=None, scope="sample", differentiable=False):
        super().__init__()
        self.name, self.scope, self.differentiable = name, scope, differentiable
        self.rows, self.calls, self.unc = [torch.tensor(r, dtype=torch.float32) for r in rows], 0, uncertainty

    def forward(self, batch):
        row = self.rows[self.calls % len(self.rows)]
        self.calls += 1
        unc = None if self.unc is None else torch.tensor(self.unc)
        return RewardOutput(row, {"twice": 2 * row}, unc, {"calls": self.calls})


class PixelMean(Reward):
    """Differentiable: ``scale`` × the mean pixel, NaN for the samples in ``bad``."""

    differentiable = True

    def __init__(self, name, scale, bad=()):
        super().__init__()
        self.name, self.scale, self.bad = name, scale, list(bad)

    def forward(self, batch):
        scores = self.scale * batch.pixels.flatten(1).mean(1)
        mask = torch.zeros(len(batch), dtype=torch.bool)
        mask[self.bad] = True
        return RewardOutput(torch.where(mask, nan, scores))


def batch(n):
    return MediaBatch(torch.rand(n, 3, 4, 4), [""] * n)


@pytest.mark.parametrize(
    "mode, lam, expected",
    [("mean", 0.5, [2.0, 2.0]), ("uwo", 0.5, [2.0 - 0.5 * 1.0, 2.0 - 0.5 * 4.0]), ("wco", 0.5, [1.0, 0.0])],
)
def test_modes_on_raw_scores(mode, lam, expected):
    ensemble = Ensemble([Seq("a", [1.0, 4.0]), Seq("b", [3.0, 0.0])], mode=mode, lam=lam, standardize=False)
    out = ensemble(batch(2))
    torch.testing.assert_close(out.scores, torch.tensor(expected))
    torch.testing.assert_close(out.uncertainty, torch.tensor([1.0, 2.0]))  # population std across members
    assert set(out.components) == {"a", "a/twice", "b", "b/twice"}
    assert out.info == {}


def test_running_standardization_pools_batches_and_skips_non_finite():
    a_rows, b_rows = ([1.0, 2.0, 3.0], [5.0, nan, 7.0]), ([10.0, 30.0, 20.0], [0.0, 4.0, inf])
    ensemble = Ensemble([Seq("a", *a_rows), Seq("b", *b_rows)], mode="uwo", lam=0.5)
    for call in range(2):
        out = ensemble(batch(3))
        seen_a = np.concatenate(a_rows[: call + 1])
        seen_b = np.concatenate(b_rows[: call + 1])
        seen_a, seen_b = seen_a[np.isfinite(seen_a)], seen_b[np.isfinite(seen_b)]
        z = np.stack(
            [
                (np.array(a_rows[call]) - seen_a.mean()) / seen_a.std(),
                (np.array(b_rows[call]) - seen_b.mean()) / seen_b.std(),
            ]
        )
        finite = np.isfinite(z).all(0)
        expected = np.full(3, nan)
        expected[finite] = z[:, finite].mean(0) - 0.5 * z[:, finite].var(0)
        torch.testing.assert_close(out.scores, torch.tensor(expected, dtype=torch.float32), equal_nan=True)
        torch.testing.assert_close(out.components["b/z"], torch.tensor(z[1], dtype=torch.float32))
        torch.testing.assert_close(out.components["a"], torch.tensor(a_rows[call]), equal_nan=True)
        assert out.info["a/mean"] == pytest.approx(seen_a.mean()) and out.info["b/std"] == pytest.approx(
            seen_b.std()
        )
    torch.testing.assert_close(ensemble.count, torch.tensor([5.0, 5.0]))
    assert out.finite_mask().tolist() == [True, False, False]
    assert math.isnan(out.uncertainty[1]) and math.isnan(out.uncertainty[2])


def test_ema_statistics():
    ensemble = Ensemble([Seq("a", [0.0, 2.0], [4.0, 4.0])], momentum=0.5)
    ensemble(batch(2))  # first batch initialises: mean 1, var 1
    torch.testing.assert_close(ensemble.running_mean, torch.tensor([1.0]))
    torch.testing.assert_close(ensemble.running_var, torch.tensor([1.0]))
    out = ensemble(batch(2))  # mean 0.5·1 + 0.5·4, var 0.5·1 + 0.5·0
    torch.testing.assert_close(ensemble.running_mean, torch.tensor([2.5]))
    torch.testing.assert_close(ensemble.running_var, torch.tensor([0.5]))
    torch.testing.assert_close(out.scores, torch.full((2,), 1.5 / math.sqrt(0.5)))


def test_state_dict_round_trip_resumes_standardization():
    def make():
        return Ensemble([Seq("a", [1.0, 3.0], [2.0, 6.0]), Seq("b", [0.0, 8.0], [4.0, 4.0])], mode="wco")

    original = make()
    original(batch(2))
    state = original.state_dict()
    assert {"count", "running_mean", "running_var"} <= set(state)
    resumed = make()
    resumed.load_state_dict(state)
    for member in resumed.members:
        member.calls = 1  # the second batch, as the original will see it
    expected = original(batch(2))
    torch.testing.assert_close(resumed(batch(2)).scores, expected.scores)
    fresh = make()
    for member in fresh.members:
        member.calls = 1
    assert not torch.allclose(fresh(batch(2)).scores, expected.scores)  # the statistics did matter


def test_gradients_skip_statistics_and_stay_finite_next_to_nan():
    lam = 0.5
    ensemble = Ensemble([PixelMean("one", 1.0), PixelMean("two", 2.0, bad=[1])], mode="uwo", lam=lam)
    assert ensemble.differentiable
    data = batch(3)
    pixels = data.pixels.clone().requires_grad_(True)
    out = ensemble(MediaBatch(pixels, data.prompts))
    assert out.finite_mask().tolist() == [True, False, True]
    out.scores[out.finite_mask()].sum().backward()
    assert torch.isfinite(pixels.grad).all() and not ensemble.running_mean.requires_grad
    # score = mean(z) − λ·var(z) over 2 members: ∂/∂z_k = 1/2 − λ·(z_k − mean(z)); z_k = (scale_k·p̄ − μ_k)/σ_k
    z = torch.stack([out.components["one/z"][0], out.components["two/z"][0]]).detach()
    dz = 0.5 - lam * (z - z.mean())
    per_pixel = (dz * torch.tensor([1.0, 2.0]) / ensemble.running_var.sqrt()).sum() / pixels[0].numel()
    torch.testing.assert_close(pixels.grad[0], torch.full_like(pixels[0], float(per_pixel)))
    torch.testing.assert_close(pixels.grad[1], torch.zeros_like(pixels[1]))


def test_members_from_specs_names_scope_and_errors():
    ensemble = Ensemble(["jpeg_compressibility", {"name": "jpeg_compressibility", "quality": 50}])
    assert all(isinstance(m, JpegCompressibility) for m in ensemble.members)
    assert ensemble.member_names == ["jpeg_compressibility", "jpeg_compressibility_2"]
    assert not ensemble.differentiable and ensemble.scope == "sample"
    assert Ensemble([Seq("a", [0.0]), Seq("b", [0.0], scope="group")]).scope == "group"
    with pytest.raises(ValueError, match="members: expected a non-empty list"):
        Ensemble([])
    with pytest.raises(ValueError, match="members: expected a non-empty list"):
        Ensemble("clip")
    with pytest.raises(ValueError, match="mode: expected one of mean, uwo, wco, got 'max'"):
        Ensemble([Seq("a", [0.0])], mode="max")
    with pytest.raises(ValueError, match="lam: expected a finite number >= 0"):
        Ensemble([Seq("a", [0.0])], lam=-1)
    with pytest.raises(ValueError, match=r"momentum: expected None .* or a number in \(0, 1\]"):
        Ensemble([Seq("a", [0.0])], momentum=0.0)


def test_uncertainty_weighted_from_an_ensemble():
    inner = Ensemble(
        [Seq("a", [1.0, 4.0]), Seq("b", [3.0, 0.0])], standardize=False
    )  # r = [2, 2], U = [1, 2]
    out = UncertaintyWeighted(inner, lam=0.1)(batch(2))
    u = torch.tensor([1.0, 2.0])
    torch.testing.assert_close(out.scores, torch.exp(-u) * 2.0 - 0.1 * u)
    torch.testing.assert_close(out.uncertainty, u)
    torch.testing.assert_close(out.components["weight"], torch.exp(-u))
    torch.testing.assert_close(out.components["ensemble"], torch.tensor([2.0, 2.0]))
    assert {"ensemble/a", "ensemble/b/twice"} <= set(out.components)


@pytest.mark.parametrize(
    "scores, uncertainty, lam, expected",
    [
        ([1.0, -1.0], [0.0, 0.0], 0.5, [1.0, -1.0]),  # certain: unchanged
        ([-2.0], [math.log(2.0)], 0.0, [-1.0]),  # uncertain negative rewards shrink towards 0
        ([1.0, nan, 1.0], [0.0, 0.0, nan], 0.1, [1.0, nan, nan]),
        ([1.0], [inf], 0.1, [nan]),  # infinite uncertainty is not a finite score
    ],
)
def test_uncertainty_weighted_values_and_non_finite(scores, uncertainty, lam, expected):
    out = UncertaintyWeighted(Seq("r", scores, uncertainty=uncertainty), lam=lam)(batch(len(scores)))
    assert torch.isfinite(out.scores).tolist() == [math.isfinite(e) for e in expected]
    torch.testing.assert_close(
        out.scores[out.finite_mask()], torch.tensor([e for e in expected if math.isfinite(e)])
    )


def test_uncertainty_weighted_from_repeats_and_errors():
    stochastic = Seq("noisy", [1.0, 2.0], [3.0, 2.0])
    out = UncertaintyWeighted(stochastic, lam=0.5, repeats=2)(batch(2))  # r = [2, 2], U = [1, 0]
    torch.testing.assert_close(out.scores, torch.tensor([2.0 * math.exp(-1.0) - 0.5, 2.0]))
    assert stochastic.calls == 2 and out.info == {"noisy/calls": 1}
    with pytest.raises(
        ValueError, match="reward: noisy reports no uncertainty; wrap an Ensemble or pass repeats"
    ):
        UncertaintyWeighted(Seq("noisy", [1.0]))(batch(1))
    with pytest.raises(ValueError, match="repeats: expected None .* or an int >= 2, got 1"):
        UncertaintyWeighted(Seq("noisy", [1.0]), repeats=1)
    wrapped = UncertaintyWeighted({"name": "jpeg_compressibility"}, repeats=2)
    assert isinstance(wrapped.reward, JpegCompressibility) and not wrapped.differentiable
