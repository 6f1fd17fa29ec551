"""The statistics of a study: spread over seeds, paired differences, tokens to reach a perplexity.

- Spread: mean and sample standard deviation (n - 1 in the denominator) of the final val PPL over seeds.
- Difference to the baseline: paired by seed (``d_s = ppl_method(s) - ppl_baseline(s)`` over the seeds
  both finished), mean ± ``t_{0.975, n-1} · sd(d) / sqrt(n)``: a two-sided 95% Student-t interval.
  Pairing removes what a seed does to both runs (data order and init), so it is narrower than an
  unpaired interval whenever the seeds' effects agree.
- Tokens to match: the first point where a method's mean eval curve (mean over seeds at each eval
  step) reaches the baseline's final val PPL, linearly interpolated between the two evaluations
  around it (tokens and PPL both linear) — the paper's "fewer tokens to reach NTP" measure.
"""
from __future__ import annotations

import math
from typing import NamedTuple

#: two-sided 95% quantiles t_{0.975, df} of Student's t for df = 1..30
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
Z975 = 1.959964


class Spread(NamedTuple):
    """Mean and sample standard deviation (None below two values) of ``n`` values."""

    mean: float
    std: float | None
    n: int


class Interval(NamedTuple):
    """A paired difference: its mean and 95% t-interval (``low``/``high`` None below two pairs)."""

    mean: float
    low: float | None
    high: float | None
    n: int


class Reach(NamedTuple):
    """Where a curve first reaches a target PPL: tokens (None: never), and whether that is only an
    upper bound (the first evaluation was already at or below the target)."""

    tokens: float | None
    at_most: bool


def t975(df: int) -> float:
    """t_{0.975, df}: the table up to 30 degrees of freedom, then the Cornish-Fisher expansion (error < 1e-3)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(T975):
        return T975[df - 1]
    z = Z975
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def spread(values: list[float]) -> Spread:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return Spread(mean, std, n)


def paired_interval(values: dict[int, float], baseline: dict[int, float]) -> Interval | None:
    """``values - baseline`` paired by seed; None when no seed has both."""
    seeds = sorted(set(values) & set(baseline))
    if not seeds:
        return None
    diffs = [values[s] - baseline[s] for s in seeds]
    s = spread(diffs)
    if s.std is None:
        return Interval(s.mean, None, None, 1)
    half = t975(s.n - 1) * s.std / math.sqrt(s.n)
    return Interval(s.mean, s.mean - half, s.mean + half, s.n)


def mean_curve(curves: list[list[tuple[float, float]]]) -> list[tuple[float, float, float | None]]:
    """(tokens, mean PPL, std PPL) at the token counts every curve has (seeds of one method share them)."""
    common = sorted(set.intersection(*(set(t for t, _ in c) for c in curves))) if curves else []
    points = []
    for tokens in common:
        s = spread([dict(c)[tokens] for c in curves])
        points.append((tokens, s.mean, s.std))
    return points


def tokens_to_reach(curve: list[tuple[float, float]], target: float) -> Reach:
    """First crossing of ``target`` by a (tokens, ppl) curve, linearly interpolated."""
    for i, (tokens, ppl) in enumerate(curve):
        if ppl > target:
            continue
        if i == 0:
            return Reach(tokens, True)
        t0, p0 = curve[i - 1]
        return Reach(t0 + (p0 - target) / (p0 - ppl) * (tokens - t0), False)
    return Reach(None, False)
