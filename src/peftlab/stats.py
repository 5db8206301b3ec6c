"""Intervals and paired tests over test items and seeds (what ``peftlab compare`` reports).

A run's test metric is a function of *additive per-item statistics*: the item i of seed s has a vector
x_{s,i} ∈ ℝᵏ, and the seed's metric is m_s = g(Σᵢ x_{s,i}). An aggregate (:data:`AGGREGATES`) names how the
items' rows become x and what g is:

* ``mean``      x = (1, vᵢ), g = Σv / Σ1: accuracy (v = correct 0/1), exact match, a per-sample image score;
* ``bleu``      x = sacrebleu's sentence statistics (hypothesis length, reference length, n-gram matches and
  totals for n = 1…4), g = sacrebleu's corpus BLEU of the summed statistics, so corpus BLEU of any resample
  is exact (Koehn 2004);
* ``macro_mean`` x = (vᵢ·e_gᵢ, e_gᵢ) with e_g the one-hot vector of the item's group, g = the mean over the
  groups present of Σv_g / Σ1_g: MMLU's accuracy, macro-averaged over subjects;
* ``matthews``  x = one-hot of (label, prediction) in the K×K confusion matrix C, g = Matthews' correlation
  (c·s − Σₖ pₖtₖ) / √((s² − Σₖ pₖ²)(s² − Σₖ tₖ²)), t = C's row sums, p = its column sums, c = trace, s = ΣC
  (the multiclass form scikit-learn computes; 0 when a factor is 0);
* ``pearson``   x = (1, y, ŷ, y², ŷ², yŷ), g = Pearson's r from these sums.

The point estimate of a method is the mean over its S seeds of m_s. Its uncertainty has two sources, the
seed (training randomness) and the finite test set, and the two are crossed: every seed is scored on the same
items. :func:`bootstrap` resamples both: one replicate draws S seeds with replacement and, independently, n
item indices with replacement, and computes the mean over the drawn seeds of g(Σ over the drawn items of
x_{s,i}) (the same item draw for every seed). The 95 % interval is the 2.5 and 97.5 percentiles of the
replicates (the percentile bootstrap). Drawing n indices with replacement is done as one multinomial count
vector w ∈ ℕⁿ (Σw = n), so a replicate's sums are w·X_s.

:func:`paired_difference` compares method B with method A on the same seeds and items: the difference of the
point estimates, an interval from the same two-level bootstrap applied to both methods with the *same*
draws (a replicate of B − A), and a two-sided p-value from ``scipy.stats.permutation_test`` with
``permutation_type='samples'``: under H₀ (the two systems are exchangeable on every item) the item i's
statistics of A and B (all seeds at once) are swapped at random, and the statistic is the difference of the
estimates. For ``mean`` this is the paired sign-flip test of the per-item differences averaged over seeds;
for a corpus metric it is the approximate randomisation test of Riezler & Maxwell (2005).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 2000


@dataclass(frozen=True)
class Aggregate:
    """How a metric comes from its items: ``columns(runs)`` turns every run's rows (runs × items) into the
    additive statistics X (runs, items, k); ``value(sums)`` maps summed statistics (..., k) to the metric (...)."""

    name: str
    columns: Callable[[Sequence[Sequence[dict[str, Any]]]], np.ndarray]
    value: Callable[[np.ndarray], np.ndarray]


def _mean_columns(runs: Sequence[Sequence[dict[str, Any]]]) -> np.ndarray:
    return np.array([[[1.0, float(row["value"])] for row in rows] for rows in runs])


def _mean_value(sums: np.ndarray) -> np.ndarray:
    return sums[..., 1] / sums[..., 0]


def _bleu_columns(runs: Sequence[Sequence[dict[str, Any]]]) -> np.ndarray:
    return np.array([[row["bleu_stats"] for row in rows] for rows in runs], dtype=np.float64)


def _bleu_value(sums: np.ndarray) -> np.ndarray:
    """sacrebleu's BLEU (default settings, as ``sacrebleu.corpus_bleu``) of each summed statistics vector."""
    from sacrebleu.metrics import BLEU

    bleu = BLEU()
    flat = sums.reshape(-1, sums.shape[-1])
    return np.array([bleu._compute_score_from_stats(list(s)).score for s in flat]).reshape(sums.shape[:-1])


def _groups(runs: Sequence[Sequence[dict[str, Any]]], field: str) -> dict[Any, int]:
    return {g: i for i, g in enumerate(sorted({row[field] for rows in runs for row in rows}))}


def _macro_columns(runs: Sequence[Sequence[dict[str, Any]]]) -> np.ndarray:
    groups = _groups(runs, "group")
    x = np.zeros((len(runs), len(runs[0]), 2 * len(groups)))
    for r, rows in enumerate(runs):
        for i, row in enumerate(rows):
            g = groups[row["group"]]
            x[r, i, g] = float(row["value"])
            x[r, i, len(groups) + g] = 1.0
    return x


def _macro_value(sums: np.ndarray) -> np.ndarray:
    half = sums.shape[-1] // 2
    values, counts = sums[..., :half], sums[..., half:]
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, values / np.where(counts > 0, counts, 1), np.nan)
    return np.nanmean(means, axis=-1)


def _confusion_columns(runs: Sequence[Sequence[dict[str, Any]]]) -> np.ndarray:
    classes = 1 + max(max(int(row["label"]), int(row["prediction"])) for rows in runs for row in rows)
    x = np.zeros((len(runs), len(runs[0]), classes * classes))
    for r, rows in enumerate(runs):
        for i, row in enumerate(rows):
            x[r, i, int(row["label"]) * classes + int(row["prediction"])] = 1.0
    return x


def _matthews_value(sums: np.ndarray) -> np.ndarray:
    classes = int(round(np.sqrt(sums.shape[-1])))
    confusion = sums.reshape(*sums.shape[:-1], classes, classes)  # rows: true label, columns: prediction
    t, p = confusion.sum(-1), confusion.sum(-2)
    c, s = np.trace(confusion, axis1=-2, axis2=-1), confusion.sum((-2, -1))
    cov_pt, cov_pp, cov_tt = c * s - (t * p).sum(-1), s * s - (p * p).sum(-1), s * s - (t * t).sum(-1)
    denominator = cov_pp * cov_tt
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, cov_pt / np.sqrt(np.where(denominator > 0, denominator, 1)), 0.0)


def _pearson_columns(runs: Sequence[Sequence[dict[str, Any]]]) -> np.ndarray:
    y = np.array([[float(row["label"]) for row in rows] for rows in runs])
    f = np.array([[float(row["prediction"]) for row in rows] for rows in runs])
    return np.stack([np.ones_like(y), y, f, y * y, f * f, y * f], axis=-1)


def _pearson_value(sums: np.ndarray) -> np.ndarray:
    n, sy, sf, syy, sff, syf = np.moveaxis(sums, -1, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (n * syf - sy * sf) / np.sqrt((n * syy - sy * sy) * (n * sff - sf * sf))


AGGREGATES: dict[str, Aggregate] = {a.name: a for a in (
    Aggregate("mean", _mean_columns, _mean_value),
    Aggregate("bleu", _bleu_columns, _bleu_value),
    Aggregate("macro_mean", _macro_columns, _macro_value),
    Aggregate("matthews", _confusion_columns, _matthews_value),
    Aggregate("pearson", _pearson_columns, _pearson_value),
)}


def statistics(aggregate: str, runs: Sequence[Sequence[dict[str, Any]]]) -> np.ndarray:
    """The additive statistics X (runs, items, k) of ``runs`` (each a list of item rows, all in one item order)."""
    if aggregate not in AGGREGATES:
        raise ValueError(f"unknown aggregate {aggregate!r}; known: {', '.join(AGGREGATES)}")
    if not runs or len({len(rows) for rows in runs}) != 1 or not runs[0]:
        raise ValueError(f"need the same, non-zero number of items in every run; got {[len(r) for r in runs]}")
    return AGGREGATES[aggregate].columns(runs)


def metric(aggregate: str, x: np.ndarray) -> np.ndarray:
    """g(Σᵢ xᵢ) per run: the metric of each run of X (runs, items, k), from its summed statistics."""
    return AGGREGATES[aggregate].value(np.asarray(x, np.float64).sum(axis=-2))


@dataclass(frozen=True)
class Interval:
    """A point estimate and its percentile bootstrap interval (``replicates``: the bootstrap values)."""

    estimate: float
    low: float
    high: float
    replicates: np.ndarray


@dataclass(frozen=True)
class Difference(Interval):
    """B − A: the difference of the estimates, its bootstrap interval, and the permutation test's p-value."""

    p_value: float = 1.0
    seeds: int = 0
    items: int = 0


def _draws(rng: np.random.Generator, seeds: int, items: int, resamples: int,
           levels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(seed counts (B, S), item counts (B, n)): multinomial counts of S (n) draws with replacement per replicate;
    a level not in ``levels`` keeps every seed (item) once."""
    unknown = set(levels) - {"seeds", "items"}
    if unknown:
        raise ValueError(f"unknown bootstrap level(s) {sorted(unknown)}; use 'seeds' and/or 'items'")
    seed_counts = (rng.multinomial(seeds, np.full(seeds, 1 / seeds), size=resamples) if "seeds" in levels
                   else np.ones((resamples, seeds)))
    item_counts = (rng.multinomial(items, np.full(items, 1 / items), size=resamples) if "items" in levels
                   else np.ones((resamples, items)))
    return seed_counts.astype(np.float64), item_counts.astype(np.float64)


def _replicates(aggregate: str, x: np.ndarray, seed_counts: np.ndarray, item_counts: np.ndarray) -> np.ndarray:
    """Per replicate b: Σ_s seed_counts[b, s] · g(item_counts[b] · X_s) / S."""
    value = AGGREGATES[aggregate].value
    per_seed = np.stack([value(item_counts @ x[s]) for s in range(x.shape[0])], axis=1)  # (B, S)
    return (seed_counts * per_seed).sum(axis=1) / x.shape[0]


def _percentiles(replicates: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = 100 * (1 - confidence) / 2
    low, high = np.nanpercentile(replicates, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap(aggregate: str, x: np.ndarray, *, resamples: int = RESAMPLES, confidence: float = CONFIDENCE,
              seed: int = 0, levels: Sequence[str] = ("seeds", "items")) -> Interval:
    """The mean over seeds of the metric of X (seeds, items, k), with its two-level percentile bootstrap interval.

    ``levels`` picks what is resampled (both by default; ``("items",)`` is the usual one-level bootstrap over the
    test set, ``("seeds",)`` over training seeds only). Replicates come from ``numpy.random.default_rng(seed)``.
    """
    x = np.asarray(x, np.float64)
    rng = np.random.default_rng(seed)
    seed_counts, item_counts = _draws(rng, x.shape[0], x.shape[1], resamples, levels)
    replicates = _replicates(aggregate, x, seed_counts, item_counts)
    return Interval(float(np.mean(metric(aggregate, x))), *_percentiles(replicates, confidence), replicates)


def paired_difference(aggregate: str, a: np.ndarray, b: np.ndarray, *, resamples: int = RESAMPLES,
                      confidence: float = CONFIDENCE, seed: int = 0) -> Difference:
    """B − A on the same seeds and items (X of shape (seeds, items, k) each, seed s and item i paired).

    The interval is the two-level percentile bootstrap of B − A, both methods resampled with the same draws;
    the p-value is ``scipy.stats.permutation_test``'s (``permutation_type='samples'``, two-sided,
    ``resamples`` random swaps of the two systems' statistics per item; see the module docstring).
    """
    from scipy.stats import permutation_test

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired statistics must match in shape (seeds, items, k); got {a.shape} and {b.shape}")
    seeds, items, k = a.shape
    rng = np.random.default_rng(seed)
    seed_counts, item_counts = _draws(rng, seeds, items, resamples, ("seeds", "items"))
    replicates = (_replicates(aggregate, b, seed_counts, item_counts)
                  - _replicates(aggregate, a, seed_counts, item_counts))
    value = AGGREGATES[aggregate].value

    def difference(xb: np.ndarray, xa: np.ndarray, axis: int = -1) -> np.ndarray:
        # xb, xa: (..., seeds·k, items), the item axis last; the estimate is the mean over seeds of g(Σᵢ x)
        def estimate(x: np.ndarray) -> np.ndarray:
            sums = np.moveaxis(x, axis, -1).sum(-1)
            return value(sums.reshape(*sums.shape[:-1], seeds, k)).mean(-1)
        return estimate(xb) - estimate(xa)

    flat_a, flat_b = (np.moveaxis(x, 1, 0).reshape(items, seeds * k).T for x in (a, b))  # (seeds·k, items)
    batch = max(1, int(2e7 // (seeds * k * items)))  # keeps the batch of resamples to ~160 MB of float64
    test = permutation_test((flat_b, flat_a), difference, permutation_type="samples", vectorized=True,
                            n_resamples=resamples, batch=batch, alternative="two-sided", axis=-1,
                            rng=np.random.default_rng(seed + 1))
    estimate = float(np.mean(metric(aggregate, b)) - np.mean(metric(aggregate, a)))
    return Difference(estimate, *_percentiles(replicates, confidence), replicates, p_value=float(test.pvalue),
                      seeds=seeds, items=items)
