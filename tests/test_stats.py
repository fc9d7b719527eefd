"""Intervals and tests on planted data with published answers."""
from __future__ import annotations

import math
import random

import pytest

from attnprobe.analyses import stats
from attnprobe.errors import AttnprobeError


def test_fisher_exact_matches_published_p_values():
    # scipy.stats.fisher_exact's documented example [[6, 2], [1, 4]]: p = 0.10256 (two-sided)
    assert stats.fisher_exact(6, 2, 1, 4) == pytest.approx(0.1025641, abs=1e-6)
    # Fisher's lady tasting tea, [[3, 1], [1, 3]]: p = 0.4857 (two-sided, R's fisher.test)
    assert stats.fisher_exact(3, 1, 1, 3) == pytest.approx(0.4857143, abs=1e-6)
    assert stats.fisher_exact(10, 0, 0, 10) == pytest.approx(2 / math.comb(20, 10))
    assert stats.fisher_exact(5, 5, 5, 5) == 1.0


def test_mcnemar_exact_and_wilson_known_values():
    assert stats.mcnemar_exact(1, 9) == pytest.approx(2 * 11 / 1024)  # binomial tail of 1 in 10
    assert stats.mcnemar_exact(0, 0) == 1.0
    low, high = stats.wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    low, high = stats.wilson_interval(8, 10)
    assert (low, high) == pytest.approx((0.4902, 0.9433), abs=1e-4)


def test_t_interval_over_draws():
    mean, low, high = stats.mean_interval([0.5, 0.6, 0.7])  # sd 0.1, t(2) = 4.303
    assert mean == pytest.approx(0.6) and high - mean == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    assert stats.t_quantile_975(40) == pytest.approx(2.021, abs=2e-3) and stats.t_quantile_975(1000) == pytest.approx(1.962, abs=1e-3)
    assert math.isnan(stats.mean_interval([0.4])[1])


def test_cluster_bootstrap_is_wider_than_pooled_tokens_for_clustered_errors():
    """Strings copied wholly right or wholly wrong: 20 strings of 50 tokens, 10 right. A binomial
    interval over the 1,000 pooled tokens would be +-0.03; the strings give about +-0.2."""
    hits, sizes = [50.0] * 10 + [0.0] * 10, [50.0] * 20
    estimate, low, high = stats.cluster_bootstrap(hits, sizes, seed=1)
    token_low, token_high = stats.wilson_interval(500, 1000)
    assert estimate == 0.5 and low < token_low - 0.1 and high > token_high + 0.1
    assert stats.cluster_bootstrap(hits, sizes, seed=1) == (estimate, low, high)  # seeded


def test_differ_says_which_rows_differ():
    assert stats.differ([True] * 30 + [False] * 0, [True] * 10 + [False] * 20)
    assert not stats.differ([True] * 6 + [False] * 2, [True] * 1 + [False] * 4)  # p = 0.10
    first = [True] * 40
    second = [True] * 30 + [False] * 10  # the same prompts: 10 lost, none gained
    assert stats.differ(first, second, paired=True)
    with pytest.raises(AttnprobeError, match="same samples"):
        stats.differ(first, second[:5], paired=True)
    rng = random.Random(0)
    diff, low, high = stats.bootstrap_difference([float(x) for x in first], [float(x) for x in second], paired=True, seed=rng.randrange(99))
    assert diff == pytest.approx(0.25) and 0 < low < diff < high


def test_too_few_samples_are_refused_and_few_on_a_gpu_are_said(capsys):
    assert stats.widest_wilson(11) > stats.WIDEST_INTERVAL > stats.widest_wilson(12)
    with pytest.raises(AttnprobeError, match="11 samples .* --allow-small"):
        stats.check_sample_size(11, "passkey", on_gpu=False)
    said = []
    stats.check_sample_size(11, "passkey", on_gpu=False, allow_small=True, say=said.append)
    stats.check_sample_size(50, "niah", on_gpu=True, say=said.append)
    stats.check_sample_size(50, "niah", on_gpu=False, say=said.append)
    stats.check_sample_size(100, "niah", on_gpu=True, say=said.append)
    assert len(said) == 2 and said[0].startswith("warning: passkey has 11 samples") and "niah has 50" in said[1]
