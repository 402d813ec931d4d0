"""Differential-privacy mechanisms for aggregates: one small class per mechanism.

The unit of privacy is the patient and neighbouring databases differ by adding or
removing one patient's data ("unbounded" DP). Every guarantee below holds only if the
caller has bounded each patient's contribution *in SQL, before calling*: one value per
patient clipped to the declared bounds, or at most the declared number of rows or bins.
Bounds come from the query or the profile, never from the data.

Each mechanism is a frozen dataclass whose parameters are checked once, in
`__post_init__`, by the shared checkers below; `release(true_value)` draws the noise with
diffprivlib and returns a `Released`. Spending the budget is not done here: the caller
reserves `mechanism.epsilon` with `policies.budget.reserve` *before* calling `release`.

Randomness: production passes no `random_state`, so diffprivlib draws from
`secrets.SystemRandom` (its secure default). A seed is for tests only. diffprivlib's
global default `BudgetAccountant` is never touched: `tools.quantile` gets a throwaway
accountant per call, and the database ledger is the only budget that counts.

95 % intervals are computed from the mechanism's noise distribution and the released
value only, never from the data, so publishing them is free post-processing.

Work is bounded: no mechanism loops a number of times that depends on ε or on a value
(only on the declared bins, the fixed simulation count, or the number of patients), and
none accepts ε below `EPSILON_FLOOR`.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import TYPE_CHECKING, Any

from service.errors import InvalidRequest

if TYPE_CHECKING:
    import numpy as np
    from diffprivlib.mechanisms import Geometric, Laplace

    RandomState = np.random.RandomState | None

#: Every interval is a 95 % interval: P(true value outside) ≤ ALPHA.
ALPHA = 0.05
#: Noise draws used to simulate the sampling distribution of a noisy mean.
MEAN_SIMULATIONS = 10_000
#: Small-cell rule: a noisy count below this is not released.
SUPPRESSION_THRESHOLD = 11
#: No mechanism takes a smaller ε: its noise would dwarf any count a database holds, and
#: interval arithmetic at that scale loses float precision (deployments set a higher minimum).
EPSILON_FLOOR = 1e-9
#: Declared bounds beyond this are refused: sums of them could overflow, and no clinical value needs them.
MAX_BOUND = 1e9


class MechanismError(InvalidRequest, ValueError):
    """A mechanism parameter or input is invalid (ε ≤ 0, inverted bounds, q outside (0, 1), …)."""


@dataclass(frozen=True)
class Released:
    """One differentially private value, ready to publish.

    `epsilon`/`delta` are what the release cost; `interval` is a 95 % interval for the
    true value derived from the noise distribution only (None where no data-free interval
    exists, see `Quantile`). `noisy_count` is the noisy count small-cell suppression is
    decided on (counts and means); `sensitivity` is that of the noised statistic (the
    sum's, for a mean).
    """

    value: float
    epsilon: float
    delta: float
    mechanism: str
    interval: tuple[float, float] | None
    sensitivity: float
    noisy_count: int | None = None

    def as_json(self) -> dict[str, Any]:
        """JSON-ready; every field is DP output or a public parameter, so all may be published."""
        out = {"value": self.value, "epsilon": self.epsilon, "delta": self.delta, "mechanism": self.mechanism,
               "interval": list(self.interval) if self.interval is not None else None,
               "sensitivity": self.sensitivity}
        if self.noisy_count is not None and self.noisy_count != self.value:
            out["noisy_count"] = self.noisy_count
        return out


@dataclass(frozen=True)
class ReleasedHistogram:
    """Noisy counts for every declared bin. The whole histogram costs `epsilon`, not ε × bins."""

    bins: dict[str, Released]
    epsilon: float
    delta: float
    mechanism: str
    max_bins_per_patient: int


# --- parameter checks: the one place every mechanism validates its inputs ---------------

def _check_epsilon(epsilon: Any) -> float:
    if isinstance(epsilon, bool) or not isinstance(epsilon, Real) or not math.isfinite(epsilon) \
            or not epsilon >= EPSILON_FLOOR:
        raise MechanismError(f"epsilon must be a finite number ≥ {EPSILON_FLOOR:g}, got {epsilon!r}")
    return float(epsilon)


def _check_bounds(lower: Any, upper: Any) -> tuple[float, float]:
    for name, bound in (("lower", lower), ("upper", upper)):
        if isinstance(bound, bool) or not isinstance(bound, Real) or not math.isfinite(bound):
            raise MechanismError(f"{name} bound must be a finite number, got {bound!r}")
    if not lower < upper:
        raise MechanismError(f"bounds must satisfy lower < upper, got [{lower}, {upper}]")
    return float(lower), float(upper)


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise MechanismError(f"{name} must be an integer ≥ 1, got {value!r}")
    return int(value)


def _check_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
        raise MechanismError(f"{name} must be an integer ≥ 0, got {value!r}")
    return int(value)


def _check_finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise MechanismError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _check_quantile_level(q: Any) -> float:
    if isinstance(q, bool) or not isinstance(q, Real) or not 0 < q < 1:
        raise MechanismError(f"q must be strictly between 0 and 1, got {q!r}")
    return float(q)


# --- noise distributions: exact interval half-widths ------------------------------------

def geometric_tail(t: int, ratio: float) -> float:
    """P(|X| > t) for two-sided geometric noise with p = exp(-ratio), ratio = ε / sensitivity.

    P(X = k) = (1 - p) / (1 + p) · p^|k|, so P(|X| > t) = 2 p^(t+1) / (1 + p).
    """
    return 2.0 * math.exp(-ratio * (t + 1)) / (1.0 + math.exp(-ratio))


def geometric_half_width(epsilon: float, sensitivity: int, alpha: float = ALPHA) -> int:
    """The smallest integer t with P(|X| ≤ t) ≥ 1 - alpha for `Geometric(epsilon, sensitivity)` noise.

    The noise is discrete, so the interval's exact coverage is 1 - geometric_tail(t) ≥ 95 %
    (e.g. 97.3 % at ε = 1, 95.3 % at ε = 0.1): it is the shortest symmetric interval that
    reaches 95 %, never shorter.

    Constant work whatever ε: the closed form, then one step if rounding landed it one off
    (exact while t < 2^52, i.e. far below any ε a mechanism accepts).
    """
    ratio = epsilon / sensitivity
    # Closed form from 2 p^(t+1) / (1 + p) ≤ alpha.
    t = max(0, math.ceil((math.log(2 / alpha) - math.log1p(math.exp(-ratio))) / ratio) - 1)
    if t > 0 and geometric_tail(t - 1, ratio) <= alpha:
        return t - 1
    return t + 1 if geometric_tail(t, ratio) > alpha else t


def laplace_half_width(epsilon: float, sensitivity: float, alpha: float = ALPHA) -> float:
    """b · ln(1/alpha) with b = sensitivity / ε: P(|Laplace(b)| > b ln(1/alpha)) = alpha exactly."""
    return sensitivity / epsilon * math.log(1 / alpha)


# diffprivlib (with scikit-learn, SciPy and NumPy) takes a second to import: the mechanisms
# import it, and NumPy, when they draw noise, so processes that never release an aggregate
# (every CLI command) never load them.

def _geometric(epsilon: float, sensitivity: int, random_state: RandomState) -> Geometric:
    from diffprivlib.mechanisms import Geometric

    return Geometric(epsilon=epsilon, sensitivity=sensitivity, random_state=random_state)


def _laplace(epsilon: float, sensitivity: float, random_state: RandomState) -> Laplace:
    # diffprivlib's sampler (Holohan & Braghin 2021) combines four uniforms rather than
    # inverting one, which resists the floating-point attack on naive Laplace sampling.
    from diffprivlib.mechanisms import Laplace

    return Laplace(epsilon=epsilon, delta=0.0, sensitivity=sensitivity, random_state=random_state)


# --- mechanisms ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Count:
    """Noisy count with the geometric mechanism (two-sided geometric = discrete Laplace).

    Guarantee: ε-DP (δ = 0). Sensitivity = `per_patient`: 1 when counting patients (one
    patient changes the count by at most 1); k when counting rows and SQL keeps at most k
    rows per patient. Noise P(X = k) ∝ p^|k| with p = exp(-ε / sensitivity); it is
    unbiased and integer-valued, so counts stay integers. The released value may be
    negative: suppression hides small values, clamping is the presenter's choice.
    """

    epsilon: float
    per_patient: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "epsilon", _check_epsilon(self.epsilon))
        object.__setattr__(self, "per_patient", _check_positive_int("per_patient", self.per_patient))

    def release(self, true_count: int, *, random_state: RandomState = None) -> Released:
        true_count = _check_count("count", true_count)
        noisy = _geometric(self.epsilon, self.per_patient, random_state).randomise(true_count)
        t = geometric_half_width(self.epsilon, self.per_patient)
        return Released(noisy, self.epsilon, 0.0, "geometric", (noisy - t, noisy + t), self.per_patient, noisy)


@dataclass(frozen=True)
class Histogram:
    """One noisy geometric count per *declared* bin; the whole histogram costs ε.

    Guarantee: ε-DP (δ = 0). Adding or removing one patient changes at most
    `max_bins_per_patient` = k bins by 1 each (L1 sensitivity k), so each bin gets
    Geometric(ε, sensitivity k): the product of the per-bin noise densities changes by at
    most exp(ε·k/k). With k = 1 (each patient in one bin, e.g. age bands) this is parallel
    composition: every bin at ε, total ε. With k > 1 (a patient with several codes) SQL
    must keep at most k bins per patient. Bins come from the query, never from the data:
    a bin absent from `counts` is released as a noisy 0, so the set of bins leaks nothing.
    """

    epsilon: float
    bins: tuple[str, ...]
    max_bins_per_patient: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "epsilon", _check_epsilon(self.epsilon))
        bins = tuple(self.bins)
        if not bins or len(set(bins)) != len(bins) or not all(isinstance(b, str) for b in bins):
            raise MechanismError("bins must be a non-empty list of distinct names")
        object.__setattr__(self, "bins", bins)
        k = _check_positive_int("max_bins_per_patient", self.max_bins_per_patient)
        object.__setattr__(self, "max_bins_per_patient", k)

    def release(self, counts: Mapping[str, int], *, random_state: RandomState = None) -> ReleasedHistogram:
        undeclared = set(counts) - set(self.bins)
        if undeclared:
            raise MechanismError(f"counts for undeclared bins: {sorted(undeclared)}")
        k = self.max_bins_per_patient
        mech = _geometric(self.epsilon, k, random_state)
        t = geometric_half_width(self.epsilon, k)
        released = {}
        for name in self.bins:
            noisy = mech.randomise(_check_count(f"count of bin {name!r}", counts.get(name, 0)))
            released[name] = Released(noisy, self.epsilon, 0.0, "geometric", (noisy - t, noisy + t), k, noisy)
        return ReleasedHistogram(released, self.epsilon, 0.0, "geometric", k)


@dataclass(frozen=True)
class _Bounded:
    """ε and declared bounds [lower, upper] on one value per patient, checked once.

    Sensitivity under add/remove-one-patient: max(|lower|, |upper|), the most one
    patient's clipped value can change a sum.
    """

    epsilon: float
    lower: float
    upper: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "epsilon", _check_epsilon(self.epsilon))
        lower, upper = _check_bounds(self.lower, self.upper)
        object.__setattr__(self, "lower", lower)
        object.__setattr__(self, "upper", upper)

    @property
    def sensitivity(self) -> float:
        return max(abs(self.lower), abs(self.upper))


@dataclass(frozen=True)
class BoundedSum(_Bounded):
    """Noisy sum of one value per patient clipped to [lower, upper], Laplace mechanism.

    Guarantee: ε-DP (δ = 0). Sensitivity = max(|lower|, |upper|): adding or removing one
    patient changes the sum by their clipped value. (Under replace-one it would be
    upper - lower; Passerelle's counts are add/remove, so sums are too.)

    Plain Laplace rather than `LaplaceBoundedDomain`: the sum's natural domain
    [n·lower, n·upper] depends on n, itself private; a truncated output is biased and
    breaks the analytic interval. Laplace noise is unbiased with interval ± b·ln 20.
    """

    def release(self, clipped_sum: float, *, random_state: RandomState = None) -> Released:
        """`clipped_sum` = Σ over patients of min(max(value, lower), upper), one value per patient."""
        clipped_sum = _check_finite("sum", clipped_sum)
        noisy = float(_laplace(self.epsilon, self.sensitivity, random_state).randomise(clipped_sum))
        h = laplace_half_width(self.epsilon, self.sensitivity)
        return Released(noisy, self.epsilon, 0.0, "laplace", (noisy - h, noisy + h), self.sensitivity)


@dataclass(frozen=True)
class BoundedMean(_Bounded):
    """Noisy mean = noisy sum / noisy count of one clipped value per patient.

    Guarantee: ε-DP (δ = 0) by sequential composition: ε/2 for the count (geometric,
    sensitivity 1) and ε/2 for the sum (Laplace, sensitivity max(|lower|, |upper|)).
    The ratio (denominator floored at 1) is clipped into [lower, upper]; both are
    post-processing. `noisy_count` is the noisy count to apply suppression to.

    Interval: a parametric bootstrap from the noise distributions only. Plug in the noisy
    count n̂ = max(ñ, 1) and ŝ = mean·n̂, simulate the estimator with fresh Laplace and
    geometric noise, and invert the simulated error quantiles (basic bootstrap), clipped
    to [lower, upper]. It uses nothing but the two released values, so it is free.
    Coverage is ≈ 95 % once the noisy count is well above the noise scale (which the
    suppression threshold helps ensure); for tiny counts it is approximate.
    """

    def release(self, clipped_sum: float, count: int, *, random_state: RandomState = None) -> Released:
        count = _check_count("count", count)
        clipped_sum = _check_finite("sum", clipped_sum)
        # A sum outside [n·lower, n·upper] means the caller skipped the per-patient clipping
        # the guarantee rests on: refuse rather than release under a false sensitivity.
        slack = 1e-9 * max(1.0, count * self.sensitivity)
        if not count * self.lower - slack <= clipped_sum <= count * self.upper + slack:
            raise MechanismError("sum is outside [count·lower, count·upper]: values were not clipped per patient")
        half = self.epsilon / 2
        noisy_count = _geometric(half, 1, random_state).randomise(count)
        noisy_sum = float(_laplace(half, self.sensitivity, random_state).randomise(clipped_sum))
        n_hat = max(noisy_count, 1)
        mean = min(max(noisy_sum / n_hat, self.lower), self.upper)
        interval = self._interval(mean, n_hat, _simulation_rng(random_state))
        return Released(mean, self.epsilon, 0.0, "laplace-sum/geometric-count", interval, self.sensitivity,
                        noisy_count)

    def _interval(self, mean: float, n_hat: int, rng: np.random.RandomState | np.random.Generator
                  ) -> tuple[float, float]:
        import numpy as np

        half = self.epsilon / 2
        success = -math.expm1(-half)  # 1 - exp(-ε/2) without cancellation at small ε
        # Two-sided geometric = difference of two one-sided geometrics on {0, 1, …}.
        count_noise = rng.geometric(success, MEAN_SIMULATIONS) - rng.geometric(success, MEAN_SIMULATIONS)
        sum_noise = rng.laplace(0.0, self.sensitivity / half, MEAN_SIMULATIONS)
        simulated = np.clip((mean * n_hat + sum_noise) / np.maximum(n_hat + count_noise, 1), self.lower, self.upper)
        err_lo, err_hi = np.quantile(simulated - mean, [ALPHA / 2, 1 - ALPHA / 2])
        return (max(self.lower, mean - float(err_hi)), min(self.upper, mean - float(err_lo)))


@dataclass(frozen=True)
class Quantile:
    """Noisy q-quantile of one value per patient in [lower, upper]: diffprivlib's
    exponential mechanism (Smith 2011) via `diffprivlib.tools.quantile`.

    Guarantee: ε-DP (δ = 0). The candidates are the gaps between the sorted clipped values
    (and the bounds); gap i has utility -|i - q·n| (sensitivity 1: one patient shifts
    ranks by at most 1) and is chosen with probability ∝ length · exp(ε·utility / 2);
    the output is uniform inside the chosen gap.

    No interval (`interval is None`): the exponential mechanism's error in value space
    depends on the data itself (the gap lengths around the quantile: dense data near the
    quantile means a small chance of landing there), so no 95 % interval can be computed
    from the noise distribution and the released value alone. Anything narrower than
    [lower, upper] would either use the data (leak) or claim a coverage it lacks; we say
    so instead of inventing one.
    """

    epsilon: float
    q: float
    lower: float
    upper: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "epsilon", _check_epsilon(self.epsilon))
        object.__setattr__(self, "q", _check_quantile_level(self.q))
        lower, upper = _check_bounds(self.lower, self.upper)
        object.__setattr__(self, "lower", lower)
        object.__setattr__(self, "upper", upper)

    def release(self, values: Sequence[float] | np.ndarray, *, random_state: RandomState = None) -> Released:
        """`values`: one value per patient (diffprivlib clips them to [lower, upper])."""
        import numpy as np
        from diffprivlib.accountant import BudgetAccountant
        from diffprivlib.tools import quantile as dp_quantile

        array = np.asarray(values, dtype=float).ravel()
        if not np.isfinite(array).all():
            raise MechanismError("quantile values must be finite numbers")
        # A throwaway accountant: diffprivlib would otherwise charge its process-global
        # default, which must stay untouched (the database ledger is the only truth).
        noisy = dp_quantile(array, self.q, epsilon=self.epsilon, bounds=(self.lower, self.upper),
                            random_state=random_state, accountant=BudgetAccountant())
        return Released(float(noisy), self.epsilon, 0.0, "exponential-quantile", None, 1.0)


def _simulation_rng(random_state: RandomState) -> np.random.RandomState | np.random.Generator:
    # The interval simulation is post-processing and needs no secrecy; an injected test
    # state makes it reproducible, production gets fresh OS entropy.
    import numpy as np

    return random_state if isinstance(random_state, np.random.RandomState) else np.random.default_rng()


def suppress(noisy_count: int | float | Released, threshold: int = SUPPRESSION_THRESHOLD) -> bool:
    """True when a cell must be withheld: its *noisy* count is below `threshold`.

    Takes only the released noisy count (or a `Released` carrying one), never the true
    count: deciding on true counts would make the suppression itself leak.
    """
    if isinstance(noisy_count, Released):
        if noisy_count.noisy_count is None:
            raise MechanismError(f"a {noisy_count.mechanism} release carries no noisy count to suppress on")
        noisy_count = noisy_count.noisy_count
    if isinstance(threshold, bool) or not isinstance(threshold, Integral) or threshold < 0:
        raise MechanismError(f"threshold must be an integer ≥ 0, got {threshold!r}")
    return _check_finite("noisy count", noisy_count) < threshold
