"""The DP mechanisms draw from the distributions their docstrings claim, their 95 %
intervals cover 95 % of the time, bad parameters are refused, suppression sees only
noisy values, and diffprivlib's global accountant is never touched.

Every statistical test uses a fixed injected RandomState, so each is deterministic: it
either always passes or always fails (no flakiness), while still checking ~5,000 draws.
"""
from __future__ import annotations

import inspect
import math
import secrets
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from diffprivlib.accountant import BudgetAccountant
from scipy import stats

from policies import dp

DRAWS = 5_000
P_MIN = 0.01  # goodness-of-fit tests must not reject at the 1 % level


def _two_sided_geometric_pmf(k: np.ndarray, ratio: float) -> np.ndarray:
    p = math.exp(-ratio)
    return (1 - p) / (1 + p) * p ** np.abs(k)


def _chi_square_geometric(noise: np.ndarray, ratio: float) -> float:
    """p-value of a chi-square goodness-of-fit test of integer noise against the discrete Laplace.

    KS assumes a continuous distribution: on integer data its statistic does not follow the
    Kolmogorov law (p-values are conservative, the test loses power), so for the discrete
    geometric we compare counts per integer cell instead, pooling each tail into one cell
    so every expected count is ≥ 5 (the chi-square approximation's usual condition).
    """
    n = noise.size
    m = 0
    while n * _two_sided_geometric_pmf(np.array([m + 1]), ratio)[0] >= 5:
        m += 1
    cells = np.arange(-m + 1, m)  # interior cells; ≤ -m and ≥ m are the pooled tails
    p = math.exp(-ratio)
    tail = p**m / (1 + p)  # P(X ≤ -m) = P(X ≥ m)
    expected = np.concatenate([[tail], _two_sided_geometric_pmf(cells, ratio), [tail]]) * n
    observed = np.concatenate([[np.sum(noise <= -m)], [np.sum(noise == c) for c in cells], [np.sum(noise >= m)]])
    assert expected.min() >= 5 and abs(expected.sum() - n) < 1e-6 * n
    return stats.chisquare(observed, expected).pvalue


# --- distributions ---------------------------------------------------------------------------

def test_count_noise_is_two_sided_geometric() -> None:
    rs = np.random.RandomState(11)
    mech = dp.Count(epsilon=0.5)
    noise = np.array([mech.release(40, random_state=rs).value - 40 for _ in range(DRAWS)])
    assert _chi_square_geometric(noise, 0.5) > P_MIN


def test_histogram_bin_noise_scales_with_bins_per_patient() -> None:
    # k = 3 bins per patient: each bin's noise is geometric with p = exp(-ε/3).
    rs = np.random.RandomState(12)
    mech = dp.Histogram(epsilon=1.5, bins=("a", "b", "c"), max_bins_per_patient=3)
    noise = []
    for _ in range(DRAWS // 3 + 1):
        out = mech.release({"a": 30, "b": 7}, random_state=rs)
        noise += [out.bins["a"].value - 30, out.bins["b"].value - 7, out.bins["c"].value]
    assert _chi_square_geometric(np.array(noise), 1.5 / 3) > P_MIN
    # …and not the unscaled one: a histogram that forgot k would pass this instead.
    assert _chi_square_geometric(np.array(noise), 1.5) < 1e-6


def test_sum_noise_is_laplace_with_sensitivity_max_abs_bound() -> None:
    rs = np.random.RandomState(13)
    mech = dp.BoundedSum(epsilon=0.5, lower=-2.0, upper=4.0)
    assert mech.sensitivity == 4.0
    noise = np.array([mech.release(10.0, random_state=rs).value - 10.0 for _ in range(DRAWS)])
    assert stats.kstest(noise, stats.laplace(scale=4.0 / 0.5).cdf).pvalue > P_MIN


def test_mean_matches_its_noise_model(monkeypatch: pytest.MonkeyPatch) -> None:
    # The mean has no closed-form law; compare (two-sample KS) against a large sample of the
    # documented model: clip((S + Laplace(Δ/(ε/2))) / max(N + Geometric(ε/2), 1), lower, upper).
    monkeypatch.setattr(dp, "MEAN_SIMULATIONS", 100)  # the interval is not under test here
    rs = np.random.RandomState(14)
    n, total, eps, lower, upper = 30, 1200.0, 1.0, 0.0, 100.0
    mech = dp.BoundedMean(epsilon=eps, lower=lower, upper=upper)
    draws = np.array([mech.release(total, n, random_state=rs).value for _ in range(DRAWS)])
    model_rng = np.random.default_rng(15)
    size = 200_000
    p = math.exp(-eps / 2)
    count_noise = model_rng.geometric(1 - p, size) - model_rng.geometric(1 - p, size)
    sum_noise = model_rng.laplace(0.0, upper / (eps / 2), size)
    model = np.clip((total + sum_noise) / np.maximum(n + count_noise, 1), lower, upper)
    assert stats.ks_2samp(draws, model).pvalue > P_MIN


def _exponential_quantile_cdf(values: np.ndarray, q: float, eps: float, lower: float, upper: float):
    """The exact output CDF of Smith's mechanism as documented in dp.Quantile (independent code)."""
    k = values.size
    knots = np.sort(np.concatenate([np.clip(values, lower, upper), [lower, upper]]))
    lengths = np.diff(knots)
    weights = lengths * np.exp(-eps * np.abs(np.arange(k + 1) - q * k) / 2)
    cumulative = np.concatenate([[0.0], np.cumsum(weights / weights.sum())])
    return lambda x: np.interp(x, knots, cumulative)


def test_quantile_follows_the_exponential_mechanism() -> None:
    data = np.random.default_rng(16).uniform(0, 100, 60)
    rs = np.random.RandomState(17)
    mech = dp.Quantile(epsilon=0.5, q=0.3, lower=0.0, upper=100.0)
    draws = np.array([mech.release(data, random_state=rs).value for _ in range(DRAWS)])
    assert stats.kstest(draws, _exponential_quantile_cdf(data, 0.3, 0.5, 0.0, 100.0)).pvalue > P_MIN


# --- intervals -------------------------------------------------------------------------------

def _coverage(release, truth: float, rs: np.random.RandomState) -> float:
    hits = 0
    for _ in range(DRAWS):
        lo, hi = release(rs).interval
        hits += lo <= truth <= hi
    return hits / DRAWS


def test_geometric_interval_is_the_shortest_reaching_95_percent() -> None:
    for eps in (0.01, 0.1, 0.5, 1.0, 3.0, 20.0):
        for sensitivity in (1, 2, 5):
            ratio = eps / sensitivity
            t = dp.geometric_half_width(eps, sensitivity)
            assert dp.geometric_tail(t, ratio) <= dp.ALPHA
            assert t == 0 or dp.geometric_tail(t - 1, ratio) > dp.ALPHA


def test_count_interval_coverage() -> None:
    rs = np.random.RandomState(21)
    # ε = 0.1: the discrete interval's exact coverage is 95.3 %.
    assert 0.93 <= _coverage(lambda r: dp.Count(0.1).release(100, random_state=r), 100, rs) <= 0.97
    # ε = 1: noise is so narrow that the shortest interval reaching 95 % covers 97.3 %; the
    # empirical coverage matches that exact value.
    exact = 1 - dp.geometric_tail(dp.geometric_half_width(1.0, 1), 1.0)
    assert abs(_coverage(lambda r: dp.Count(1.0).release(100, random_state=r), 100, rs) - exact) < 0.01


def test_sum_interval_coverage() -> None:
    rs = np.random.RandomState(22)
    mech = dp.BoundedSum(epsilon=0.3, lower=0.0, upper=10.0)
    assert 0.93 <= _coverage(lambda r: mech.release(523.5, random_state=r), 523.5, rs) <= 0.97


def test_mean_interval_coverage() -> None:
    rs = np.random.RandomState(23)
    mech = dp.BoundedMean(epsilon=1.0, lower=0.0, upper=100.0)
    assert 0.93 <= _coverage(lambda r: mech.release(200 * 37.25, 200, random_state=r), 37.25, rs) <= 0.97


def test_quantile_has_no_interval_and_stays_in_bounds() -> None:
    rs = np.random.RandomState(24)
    out = dp.Quantile(1.0, 0.5, 10.0, 20.0).release([1.0, 15.0, 99.0], random_state=rs)
    assert out.interval is None and 10.0 <= out.value <= 20.0
    assert out.mechanism == "exponential-quantile" and out.epsilon == 1.0


def test_mean_is_clipped_and_carries_its_noisy_count() -> None:
    rs = np.random.RandomState(25)
    mech = dp.BoundedMean(epsilon=0.05, lower=0.0, upper=1.0)
    for _ in range(200):
        out = mech.release(1.0, 2, random_state=rs)
        assert 0.0 <= out.interval[0] <= out.value <= out.interval[1] <= 1.0
        assert isinstance(out.noisy_count, int)


# --- parameters ------------------------------------------------------------------------------

BAD_EPSILONS = [0, 0.0, -1.0, math.nan, math.inf, True, "1", 1e-300, 5e-324, dp.EPSILON_FLOOR / 2]


@pytest.mark.parametrize("eps", BAD_EPSILONS)
def test_every_mechanism_refuses_a_bad_epsilon(eps) -> None:
    for make in (lambda: dp.Count(eps), lambda: dp.Histogram(eps, ("a",)), lambda: dp.BoundedSum(eps, 0, 1),
                 lambda: dp.BoundedMean(eps, 0, 1), lambda: dp.Quantile(eps, 0.5, 0, 1)):
        with pytest.raises(dp.MechanismError):
            make()


def _within(seconds: float, work: Callable[[], Any]) -> Any:
    """Run `work` in a thread; fail if it has not returned after `seconds` (a daemon thread is left behind)."""
    outcome: list[Any] = []
    thread = threading.Thread(target=lambda: outcome.append(work()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"still running after {seconds} s"
    return outcome[0]


@pytest.mark.parametrize("eps", [1e-300, 1e-50, 1e-20])
def test_the_geometric_interval_takes_constant_work_whatever_epsilon(eps) -> None:
    """ε = 1e-300 once looped for ever inside the budget's write transaction (issue 9)."""
    t = _within(2.0, lambda: dp.geometric_half_width(eps, 1))
    assert t > 1e19


def test_every_mechanism_releases_at_once_at_the_smallest_epsilon_it_accepts() -> None:
    eps, rs = dp.EPSILON_FLOOR, np.random.RandomState(7)
    releases = {
        "count": lambda: dp.Count(eps).release(10, random_state=rs),
        "histogram": lambda: dp.Histogram(eps, ("a", "b"), 2).release({"a": 3}, random_state=rs),
        "sum": lambda: dp.BoundedSum(eps, 0.0, 1.0).release(3.0, random_state=rs),
        "mean": lambda: dp.BoundedMean(eps, 0.0, 1.0).release(3.0, 10, random_state=rs),
        "quantile": lambda: dp.Quantile(eps, 0.5, 0.0, 1.0).release([0.2, 0.4], random_state=rs),
    }
    for name, release in releases.items():
        assert _within(5.0, release) is not None, name


@pytest.mark.parametrize("lower, upper", [(1.0, 0.0), (1.0, 1.0), (-math.inf, 1.0), (0.0, math.nan), (None, 1.0)])
def test_bounded_mechanisms_refuse_bad_bounds(lower, upper) -> None:
    for cls in (dp.BoundedSum, dp.BoundedMean):
        with pytest.raises(dp.MechanismError):
            cls(1.0, lower, upper)
    with pytest.raises(dp.MechanismError):
        dp.Quantile(1.0, 0.5, lower, upper)


@pytest.mark.parametrize("q", [0, 0.0, 1, 1.0, -0.1, 1.5, math.nan, True])
def test_quantile_refuses_q_outside_the_open_unit_interval(q) -> None:
    with pytest.raises(dp.MechanismError):
        dp.Quantile(1.0, q, 0.0, 1.0)


def test_other_bad_parameters_and_inputs() -> None:
    with pytest.raises(dp.MechanismError):
        dp.Count(1.0, per_patient=0)
    with pytest.raises(dp.MechanismError):
        dp.Histogram(1.0, ("a", "b"), max_bins_per_patient=1.5)
    with pytest.raises(dp.MechanismError):
        dp.Histogram(1.0, ("a", "a"))
    with pytest.raises(dp.MechanismError):
        dp.Histogram(1.0, ())
    with pytest.raises(dp.MechanismError):  # a bin that was not declared by the query
        dp.Histogram(1.0, ("a",)).release({"a": 1, "b": 2})
    with pytest.raises(dp.MechanismError):
        dp.Count(1.0).release(-1)
    with pytest.raises(dp.MechanismError):
        dp.Count(1.0).release(2.5)
    with pytest.raises(dp.MechanismError):
        dp.BoundedSum(1.0, 0, 1).release(math.nan)
    with pytest.raises(dp.MechanismError):  # the sum of 3 values clipped to [0, 1] cannot be 5
        dp.BoundedMean(1.0, 0, 1).release(5.0, 3)
    with pytest.raises(dp.MechanismError):
        dp.Quantile(1.0, 0.5, 0, 1).release([0.5, math.inf])
    # Bad parameters are client errors: the error handler renders them as 400.
    assert issubclass(dp.MechanismError, ValueError) and dp.MechanismError.status == 400


# --- suppression -----------------------------------------------------------------------------

def test_suppression_threshold_applies_to_the_noisy_value() -> None:
    assert dp.suppress(10) and not dp.suppress(11) and dp.suppress(-3)
    assert dp.suppress(4, threshold=5) and not dp.suppress(5, threshold=5)
    # The function cannot see a true count: its only data argument is the noisy one.
    assert list(inspect.signature(dp.suppress).parameters) == ["noisy_count", "threshold"]


def test_suppression_decides_on_noise_not_truth() -> None:
    rs = np.random.RandomState(31)
    mech = dp.Count(0.05)  # noise of scale ~20 makes both outcomes easy to find
    small_shown = next(r for r in (mech.release(5, random_state=rs) for _ in range(1000)) if r.value >= 11)
    large_hidden = next(r for r in (mech.release(30, random_state=rs) for _ in range(1000)) if r.value < 11)
    assert not dp.suppress(small_shown)   # true count 5, released because the noisy value is ≥ 11
    assert dp.suppress(large_hidden)      # true count 30, withheld because the noisy value is < 11
    mean = dp.BoundedMean(1.0, 0.0, 10.0).release(50.0, 10, random_state=rs)
    assert dp.suppress(mean) == (mean.noisy_count < 11)
    with pytest.raises(dp.MechanismError):  # a sum carries no count to decide on
        dp.suppress(dp.BoundedSum(1.0, 0, 1).release(3.0, random_state=rs))


# --- randomness and accounting ---------------------------------------------------------------

def test_production_noise_uses_the_system_csprng() -> None:
    assert isinstance(dp._geometric(1.0, 1, None)._rng, secrets.SystemRandom)
    assert isinstance(dp._laplace(1.0, 1.0, None)._rng, secrets.SystemRandom)
    # …and two unseeded releases are not replays of each other.
    values = {dp.BoundedSum(1.0, 0, 1).release(0.0).value for _ in range(5)}
    assert len(values) == 5


def test_global_diffprivlib_accountant_is_untouched() -> None:
    default = BudgetAccountant.load_default(None)
    before = list(default.spent_budget)
    data = np.linspace(0, 10, 50)
    for _ in range(3):
        dp.Quantile(0.5, 0.5, 0.0, 10.0).release(data)
        dp.Count(0.5).release(3)
        dp.BoundedMean(0.5, 0.0, 10.0).release(20.0, 4)
        dp.Histogram(0.5, ("x", "y")).release({"x": 1})
    assert BudgetAccountant.load_default(None) is default
    assert default.spent_budget == before == []
