"""The best-of-n estimator against brute force over every subset, the KL of best-of-n, the CIs and bad input."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from mmalign.eval.overoptimization import (
    best_of_n,
    best_of_n_weights,
    doubling_ns,
    kl_best_of_n,
    overoptimization_curves,
)


def _brute_force(proxy: list[float], values: list[float], n: int) -> float:
    """Mean over every n-subset of the values of the subset's highest-proxy samples (a tie: their mean, the
    expectation of a uniform tie-break)."""
    picks = []
    for subset in itertools.combinations(range(len(proxy)), n):
        best = max(proxy[i] for i in subset)
        picks.append(np.mean([values[i] for i in subset if proxy[i] == best]))
    return float(np.mean(picks))


def test_estimator_matches_every_subset_with_and_without_ties():
    proxy = torch.tensor([[0.3, 1.2, -0.5, 0.7, 0.1, 2.0, 0.9],
                          [1.0, 1.0, 0.2, 0.2, 0.2, 3.0, 1.0],   # ties, one of them at the top rank pair
                          [5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0]])  # all tied: every n gives the mean
    gold = torch.tensor([[0.1, 0.9, 0.0, 0.5, 0.3, 0.2, 1.0],
                         [0.4, 0.8, 0.0, 1.0, 0.5, 0.1, 0.6],
                         [0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 0.3]])
    ns = list(range(1, 8))
    got = best_of_n(proxy, gold, ns)
    for row in range(3):
        for k, n in enumerate(ns):
            expected = _brute_force(proxy[row].tolist(), gold[row].tolist(), n)
            assert got[row, k].item() == pytest.approx(expected, abs=1e-12), (row, n)
    assert torch.allclose(got[2], gold[2].double().mean().expand(7))
    assert torch.allclose(best_of_n_weights(proxy, 3).sum(1), torch.ones(3, dtype=torch.float64))


def test_estimator_at_its_ends_and_on_many_samples():
    """n = 1 is the plain mean, n = N the top sample; with 40 samples the weights still sum to one."""
    gen = torch.Generator().manual_seed(0)
    proxy, gold = torch.randn(5, 40, generator=gen), torch.rand(5, 40, generator=gen)
    out = best_of_n(proxy, gold, [1, 40])
    assert torch.allclose(out[:, 0], gold.double().mean(1))
    assert torch.allclose(out[:, 1], gold.double().gather(1, proxy.argmax(1, keepdim=True))[:, 0])
    weights = best_of_n_weights(proxy, 17)
    assert torch.allclose(weights.sum(1), torch.ones(5, dtype=torch.float64), atol=1e-12)
    ranks = proxy.argsort(1).argsort(1) + 1  # rank 1..40 of each sample
    assert torch.equal(weights > 0, ranks >= 17)  # only ranks that can top a 17-subset


def test_kl_of_best_of_n_and_the_ns():
    assert kl_best_of_n(1) == 0.0
    assert kl_best_of_n(2) == pytest.approx(math.log(2) - 0.5)
    assert kl_best_of_n(64) == pytest.approx(4.158883 - 0.984375, abs=1e-6)  # 6 ln 2 − 63/64
    assert doubling_ns(64) == [1, 2, 4, 8, 16, 32, 64] and doubling_ns(48) == [1, 2, 4, 8, 16, 32, 48]
    with pytest.raises(ValueError, match="n: expected an int >= 1"):
        kl_best_of_n(0)


def test_curves_intervals_peak_and_fall():
    gen = torch.Generator().manual_seed(1)
    gold = torch.rand(12, 8, generator=gen)
    hacked = -gold + 0.01 * torch.randn(12, 8, generator=gen)  # a proxy that prefers what gold dislikes
    result = overoptimization_curves({"oracle": gold, "hacked": hacked}, gold)
    assert result["n"] == [1, 2, 4, 8] and result["kl"][0] == 0 and result["prompts"] == 12
    per_prompt = np.array(result["per_prompt"]["hacked"]["gold"])  # (12, 4)
    for k in range(4):
        ci = result["curves"]["hacked"]["gold"][k]
        half = 1.96 * per_prompt[:, k].std(ddof=1) / math.sqrt(12)  # independently: normal 95% interval
        assert ci["mean"] == pytest.approx(per_prompt[:, k].mean(), abs=1e-6)
        assert ci["ci_high"] - ci["ci_low"] == pytest.approx(2 * half, abs=1e-5) and ci["n"] == 12
    oracle, hacked_curve = result["curves"]["oracle"], result["curves"]["hacked"]
    assert oracle["peak"]["n"] == 8 and oracle["fall"]["mean"] == 0 and oracle["gain"]["ci_low"] > 0
    assert hacked_curve["peak"]["n"] == 1 and hacked_curve["fall"]["ci_high"] < 0
    gains = hacked_curve["proxy_gain"]
    assert gains[0]["mean"] == gains[0]["ci_high"] == pytest.approx(0, abs=1e-9)  # n = 1: each prompt's mean
    assert [g["mean"] for g in gains] == sorted(g["mean"] for g in gains)  # its own score keeps rising
    versus = overoptimization_curves({"oracle": gold, "hacked": hacked}, gold, baselines={"hacked": "oracle"})
    paired = np.array(versus["per_prompt"]["hacked"]["gold"]) - np.array(versus["per_prompt"]["oracle"]["gold"])
    last = versus["curves"]["hacked"]["versus"]["gold"][-1]
    assert last["mean"] == pytest.approx(paired[:, -1].mean(), abs=1e-6)
    assert last["ci_high"] - last["ci_low"] == pytest.approx(2 * 1.96 * paired[:, -1].std(ddof=1) / math.sqrt(12),
                                                             abs=1e-5)
    assert "versus" not in versus["curves"]["oracle"]
    with pytest.raises(ValueError, match="baselines: .*'single'"):
        overoptimization_curves({"oracle": gold}, gold, baselines={"oracle": "single"})


def test_bad_input_is_named():
    proxy, gold = torch.randn(3, 4), torch.rand(3, 4)
    with pytest.raises(ValueError, match=r"n: expected an int with 1 <= n <= 4 .* got 8"):
        best_of_n(proxy, gold, [1, 8])
    missing = proxy.clone()
    missing[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"proxies\['single'\]: 1 of 12 samples have no finite score .*prompt 1, "
                                         r"sample 2"):
        overoptimization_curves({"single": missing}, gold)
    with pytest.raises(ValueError, match=r"proxies\['short'\]: expected shape \(3, 4\), got shape \(3, 3\)"):
        overoptimization_curves({"short": proxy[:, :3]}, gold)
    with pytest.raises(ValueError, match="gold: .*no finite score"):
        overoptimization_curves({"single": proxy}, torch.full((3, 4), float("nan")))
    with pytest.raises(ValueError, match="proxies: expected at least one"):
        overoptimization_curves({}, gold)
