"""Over-optimisation curves: best-of-n picked by a proxy, scored by gold, against the KL that n costs.

Gao et al. (2023) and Coste et al. (2024) measure reward over-optimisation as gold against
``KL = log n − (n−1)/n``, the KL of best-of-n from the policy. One draw of n samples per prompt per n would be
noisy and costly; the unbiased estimator instead averages over *every* n-subset of N ≥ n samples drawn once:
sorted by the proxy, the sample of rank i (1 = lowest of N) is the pick of a uniformly random n-subset with
probability ``C(i−1, n−1) / C(N, n)``, so the expected gold (or proxy) of the pick is a weighted sum, exact.

Ties in the proxy: the pick among tied samples is uniform, so each tied sample gets the mean of the tied ranks'
weights (the expectation over random tie-breaks). Tables are ``(prompts, samples)``; every number over prompts
comes with its mean and 95% interval (``mean_ci``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from mmalign.eval.generator import mean_ci

__all__ = ["best_of_n", "best_of_n_weights", "check_table", "doubling_ns", "kl_best_of_n", "overoptimization_curves"]


def kl_best_of_n(n: int) -> float:
    """``log n − (n−1)/n``: the KL divergence (nats) of best-of-n sampling from the policy it samples."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n: expected an int >= 1, got {n!r}")
    return math.log(n) - (n - 1) / n


def doubling_ns(samples: int) -> list[int]:
    """1, 2, 4, … up to ``samples``, and ``samples`` itself when it is not a power of two."""
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples: expected an int >= 1, got {samples!r}")
    ns = [2**i for i in range(samples.bit_length()) if 2**i <= samples]
    return ns if ns[-1] == samples else [*ns, samples]


def check_table(name: str, table: torch.Tensor, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """``table`` as a float64 ``(prompts, samples)`` tensor with a finite score for every sample, else a
    ``ValueError`` naming ``name``, what came and what was expected."""
    table = torch.as_tensor(table)
    if table.ndim != 2 or table.shape[1] < 1 or (shape is not None and tuple(table.shape) != tuple(shape)):
        expected = f"shape {tuple(shape)}" if shape is not None else "a (prompts, samples) table"
        raise ValueError(f"{name}: expected {expected}, got shape {tuple(table.shape)}")
    table = table.double()
    missing = ~torch.isfinite(table)
    if missing.any():
        prompt, sample = (int(v) for v in missing.nonzero()[0])
        raise ValueError(f"{name}: {int(missing.sum())} of {table.numel()} samples have no finite score (first: "
                         f"prompt {prompt}, sample {sample}); best-of-n needs every sample scored")
    return table


def best_of_n_weights(proxy: torch.Tensor, n: int) -> torch.Tensor:
    """``(prompts, samples)`` float64: the probability that each sample is the proxy's pick of a uniformly random
    n-subset of its prompt's samples (rows sum to 1; ties share their weight equally)."""
    proxy = check_table("proxy", proxy)
    prompts, samples = proxy.shape
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= samples:
        raise ValueError(f"n: expected an int with 1 <= n <= {samples} (the samples per prompt), got {n!r}")
    rank = torch.arange(1, samples + 1, dtype=torch.float64)  # 1 = lowest proxy score
    log_total = math.lgamma(samples + 1) - math.lgamma(n + 1) - math.lgamma(samples - n + 1)
    usable = rank >= n
    top = rank.clamp_min(n)
    log_w = torch.lgamma(top) - math.lgamma(n) - torch.lgamma(top - n + 1) - log_total
    weight = torch.where(usable, log_w.exp(), 0.0).expand(prompts, samples)
    order = proxy.argsort(dim=1, stable=True)
    ordered = proxy.gather(1, order)
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    group = starts.long().cumsum(1) - 1  # tie group of each sorted position
    sums = torch.zeros_like(ordered).scatter_add(1, group, weight)
    counts = torch.zeros_like(ordered).scatter_add(1, group, torch.ones_like(ordered))
    shared = (sums / counts.clamp_min(1)).gather(1, group)
    return torch.zeros_like(ordered).scatter(1, order, shared)


def best_of_n(proxy: torch.Tensor, values: torch.Tensor, ns: Sequence[int]) -> torch.Tensor:
    """``(prompts, len(ns))``: for each prompt and n, the expected ``values`` (gold, or the proxy itself) of the
    sample the ``proxy`` picks from a uniformly random n-subset of that prompt's samples."""
    proxy = check_table("proxy", proxy)
    values = check_table("values", values, tuple(proxy.shape))
    return torch.stack([(best_of_n_weights(proxy, n) * values).sum(1) for n in ns], 1)


def _interval(values: torch.Tensor) -> dict[str, float]:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in mean_ci(values).items()}


def overoptimization_curves(proxies: Mapping[str, torch.Tensor], gold: torch.Tensor,
                            ns: Sequence[int] | None = None, baselines: Mapping[str, str] | None = None) -> dict:
    """Best-of-n curves of every proxy (``{name: (prompts, samples)}``) scored by ``gold`` (same shape).

    Returns ``n``, ``kl`` and, per proxy, the mean and 95% CI over prompts at each n of ``gold`` (the pick's gold),
    ``proxy`` (its own score) and ``proxy_gain`` (its own score above its prompt's mean, in within-prompt standard
    deviations of that proxy: 0 at n = 1, and on one axis for proxies of any scale); ``peak`` (the n of the
    highest mean gold) and two paired changes over prompts: ``gain`` (gold at the largest n − at n = 1) and
    ``fall`` (gold at the largest n − at the peak). With ``baselines`` (``{name: baseline name}``), ``versus``
    holds the paired difference of gold from the baseline's at each n (same samples, so far tighter than the two
    intervals). ``per_prompt`` holds each proxy's per-prompt gold and proxy values, ``(prompts, len(ns))``.
    """
    if not proxies:
        raise ValueError("proxies: expected at least one proxy table, got none")
    gold = check_table("gold", gold)
    ns = doubling_ns(gold.shape[1]) if ns is None else list(ns)
    if not ns:
        raise ValueError("ns: expected at least one n, got none")
    baselines = dict(baselines or {})
    unknown = sorted({*baselines, *baselines.values()} - set(proxies))
    if unknown:
        raise ValueError(f"baselines: {unknown} are not proxies (expected names among {sorted(proxies)})")
    result: dict = {"prompts": gold.shape[0], "samples": gold.shape[1], "n": ns,
                    "kl": [round(kl_best_of_n(n), 6) for n in ns], "curves": {}, "per_prompt": {}}
    picked = {}
    for name, table in proxies.items():
        table = check_table(f"proxies[{name!r}]", table, tuple(gold.shape))
        centred = table - table.mean(1, keepdim=True)
        spread = float(centred.pow(2).mean().sqrt())  # within-prompt SD, pooled over prompts
        picked[name] = best_of_n(table, gold, ns)
        picked_proxy = best_of_n(table, table, ns)
        picked_gain = best_of_n(table, centred / (spread if spread > 0 else 1.0), ns)
        means = picked[name].mean(0)
        peak = int(means.argmax())
        result["curves"][name] = {
            "gold": [_interval(picked[name][:, k]) for k in range(len(ns))],
            "proxy": [_interval(picked_proxy[:, k]) for k in range(len(ns))],
            "proxy_gain": [_interval(picked_gain[:, k]) for k in range(len(ns))],
            "peak": {"n": ns[peak], "kl": result["kl"][peak], "gold": round(float(means[peak]), 6)},
            "gain": _interval(picked[name][:, -1] - picked[name][:, 0]),
            "fall": _interval(picked[name][:, -1] - picked[name][:, peak]),
        }
        result["per_prompt"][name] = {"gold": picked[name].tolist(), "proxy": picked_proxy.tolist()}
    for name, baseline in baselines.items():
        difference = picked[name] - picked[baseline]
        result["curves"][name]["versus"] = {"baseline": baseline,
                                            "gold": [_interval(difference[:, k]) for k in range(len(ns))]}
    return result
