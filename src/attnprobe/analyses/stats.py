"""Intervals and tests whose meaning matches how the samples were drawn.

- Independent yes/no samples (passkey, NIAH, ...): the Wilson score interval of a proportion.
- Samples that come in clusters (the tokens of one copied string): a bootstrap over the clusters,
  never a binomial interval over pooled tokens, whose errors within a string are not independent.
- Random-draw baselines (K random heads, drawn several times): the spread between draws is part of
  the uncertainty, so the interval is a Student t interval over the draws' accuracies.
- Two rows: Fisher's exact test for independent samples, the exact McNemar test when both rows
  answered the same prompts (paired), and a bootstrap interval of the difference.

Everything is pure Python (no scipy): the exact tests sum hypergeometric and binomial terms.
"""
from __future__ import annotations

import math
import random
import sys
from typing import Callable, Sequence

from attnprobe.errors import AttnprobeError

Z95 = 1.96
ALPHA = 0.05
WIDEST_INTERVAL = 0.5  # a 95 % interval wider than this says nothing: refused unless allowed
WARN_BELOW = 100  # on a GPU run, fewer samples per task get a warning line
# Student t 0.975 quantiles for 1-30 degrees of freedom (beyond: the Cornish-Fisher expansion)
_T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
          2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def wilson_interval(correct: int, total: int, z: float = Z95) -> tuple[float, float]:
    """95 % Wilson score interval of a binomial proportion (independent samples)."""
    if total == 0:
        return math.nan, math.nan
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def t_quantile_975(df: int) -> float:
    if df < 1:
        raise ValueError("a t interval needs at least two values")
    if df <= len(_T_975):
        return _T_975[df - 1]
    z = Z95
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df * df)


def mean_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, low, high): the 95 % Student t interval of the mean of independent values, e.g. the
    accuracies of random draws; clipped to 0-1 (accuracies). One value gives no interval (NaN)."""
    values = [float(v) for v in values]
    if not values:
        return math.nan, math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    half = t_quantile_975(len(values) - 1) * sd / math.sqrt(len(values))
    return mean, max(0.0, mean - half), min(1.0, mean + half)


def _percentiles(values: list[float]) -> tuple[float, float]:
    values = sorted(values)
    last = len(values) - 1
    return values[round(0.025 * last)], values[round(0.975 * last)]


def cluster_bootstrap(hits: Sequence[float], sizes: Sequence[float], draws: int = 2000,
                      seed: int = 0) -> tuple[float, float, float]:
    """(sum(hits) / sum(sizes), low, high): a ratio over clusters (tokens right of each string's
    tokens) with a 95 % percentile bootstrap that resamples whole clusters."""
    if len(hits) != len(sizes) or not len(hits):
        return math.nan, math.nan, math.nan
    estimate = sum(hits) / sum(sizes)
    rng, n = random.Random(seed), len(hits)
    ratios = []
    for _ in range(draws):
        picked = [rng.randrange(n) for _ in range(n)]
        ratios.append(sum(hits[i] for i in picked) / sum(sizes[i] for i in picked))
    return (estimate, *_percentiles(ratios))


def bootstrap_difference(first: Sequence[float], second: Sequence[float], paired: bool, draws: int = 2000,
                         seed: int = 0) -> tuple[float, float, float]:
    """(mean(first) - mean(second), low, high), 95 % percentile bootstrap; `paired` resamples the
    pairs together (both rows answered the same prompts), else each row on its own."""
    if not first or not second or (paired and len(first) != len(second)):
        raise AttnprobeError("a paired difference needs the same samples in both rows: compare rows of one seed and sizes")
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    rng, diffs = random.Random(seed), []
    for _ in range(draws):
        if paired:
            picked = [rng.randrange(len(first)) for _ in first]
            diffs.append(mean([first[i] for i in picked]) - mean([second[i] for i in picked]))
        else:
            diffs.append(mean(rng.choices(first, k=len(first))) - mean(rng.choices(second, k=len(second))))
    return (mean(first) - mean(second), *_percentiles(diffs))


def fisher_exact(a: int, b: int, c: int, d: int) -> float:
    """Two-sided p value of Fisher's exact test of the 2x2 table [[a, b], [c, d]] (rows: the two
    rows compared; columns: correct, wrong): the probability, with the margins fixed, of a table no
    more likely than the one seen (relative tolerance 1e-7, as R and scipy)."""
    if min(a, b, c, d) < 0:
        raise ValueError("a contingency table holds counts")
    row, column, total = a + b, a + c, a + b + c + d
    if total == 0:
        return 1.0

    def probability(x: int) -> float:
        return math.comb(column, x) * math.comb(total - column, row - x) / math.comb(total, row)

    seen = probability(a)
    low, high = max(0, row + column - total), min(row, column)
    return min(1.0, sum(p for p in map(probability, range(low, high + 1)) if p <= seen * (1 + 1e-7)))


def mcnemar_exact(only_first: int, only_second: int) -> float:
    """Two-sided exact McNemar p value for paired yes/no samples: of the discordant pairs, `only_first`
    were right in the first row alone and `only_second` in the second alone (binomial, p = 1/2)."""
    n = only_first + only_second
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_first, only_second) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def differ(first: Sequence[bool], second: Sequence[bool], paired: bool = False, alpha: float = ALPHA) -> bool:
    """Whether two rows' accuracies differ at `alpha`: exact McNemar on paired samples (the same
    prompts, in the same order), Fisher's exact test on independent ones."""
    first, second = [bool(x) for x in first], [bool(x) for x in second]
    if paired:
        if len(first) != len(second):
            raise AttnprobeError("paired rows need the same samples: compare rows of one seed and sizes")
        p = mcnemar_exact(sum(x and not y for x, y in zip(first, second)), sum(y and not x for x, y in zip(first, second)))
    else:
        p = fisher_exact(sum(first), len(first) - sum(first), sum(second), len(second) - sum(second))
    return p < alpha


def widest_wilson(n: int) -> float:
    """The widest 95 % Wilson interval n samples can give (about half of them right)."""
    if n <= 0:
        return 1.0
    return max(high - low for low, high in (wilson_interval(k, n) for k in {n // 2, (n + 1) // 2}))


def say(line: str) -> None:
    """Where warnings go by default: one line on stderr."""
    print(line, file=sys.stderr)


def check_sample_size(n: int, what: str, on_gpu: bool, allow_small: bool = False,
                      say: Callable[[str], None] = say) -> None:
    """Refuse `n` samples whose 95 % interval can span more than WIDEST_INTERVAL (unless `allow_small`,
    a smoke run); on a GPU, where samples are cheap, say so when n < WARN_BELOW."""
    width = widest_wilson(n)
    if width > WIDEST_INTERVAL and not allow_small:
        raise AttnprobeError(f"{what}: {n} samples give 95 % intervals up to {width:.2f} wide; use more samples "
                             "(or --allow-small for a smoke run)")
    if width > WIDEST_INTERVAL or (on_gpu and n < WARN_BELOW):
        say(f"warning: {what} has {n} samples; its 95 % intervals are up to {width:.2f} wide")
