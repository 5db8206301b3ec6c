"""peftlab.stats: the aggregates against scikit-learn / scipy / sacrebleu, the bootstrap against scipy's, the
paired test on known cases, and the interval's coverage on synthetic data."""

import numpy as np
import pytest
import sacrebleu
from scipy.stats import bootstrap as scipy_bootstrap
from scipy.stats import pearsonr
from sklearn.metrics import matthews_corrcoef

from peftlab import stats
from peftlab.metrics import bleu_statistics, reference_streams


def mean_rows(values) -> list[dict]:
    return [{"key": str(i), "value": float(v)} for i, v in enumerate(values)]


def test_corpus_bleu_from_summed_sentence_statistics_equals_sacrebleu():
    hyps = ["the cat sat on the mat", "a dog barks loudly at night", "hello world", "it is raining today in paris",
            "no match here"]
    refs = [["the cat is on the mat", "a cat sat on the mat"], ["the dog barks at night"], ["hello there world"],
            ["it rains in paris today", "today it is raining in paris", "rain in paris"], ["something else"]]
    score, segments = bleu_statistics(hyps, reference_streams(refs))
    want = sacrebleu.corpus_bleu(hyps, reference_streams(refs)).score
    x = stats.statistics("bleu", [[{"bleu_stats": s} for s in segments]])
    assert score == pytest.approx(want, abs=1e-9)
    assert stats.metric("bleu", x)[0] == pytest.approx(want, abs=1e-9)
    keep = [0, 0, 2, 3]  # a resample: corpus BLEU of the picked sentences, from their summed statistics
    sub = sacrebleu.corpus_bleu([hyps[i] for i in keep], reference_streams([refs[i] for i in keep])).score
    assert stats.metric("bleu", x[:, keep])[0] == pytest.approx(sub, abs=1e-9)


def test_matthews_and_pearson_from_summed_statistics_equal_sklearn_and_scipy():
    rng = np.random.default_rng(0)
    labels, preds = rng.integers(0, 3, 200), rng.integers(0, 3, 200)
    preds[:120] = labels[:120]
    rows = [{"label": int(y), "prediction": int(p)} for y, p in zip(labels, preds, strict=True)]
    assert stats.metric("matthews", stats.statistics("matthews", [rows]))[0] == pytest.approx(
        matthews_corrcoef(labels, preds), abs=1e-12)
    y, f = rng.normal(size=100), rng.normal(size=100)
    rows = [{"label": a, "prediction": a + b} for a, b in zip(y, f, strict=True)]
    assert stats.metric("pearson", stats.statistics("pearson", [rows]))[0] == pytest.approx(
        pearsonr(y, y + f)[0], abs=1e-9)


def test_macro_mean_is_the_mean_over_groups():
    rows = [{"value": v, "group": g} for v, g in [(1, "a"), (0, "a"), (1, "a"), (1, "b")]]
    assert stats.metric("macro_mean", stats.statistics("macro_mean", [rows]))[0] == pytest.approx((2 / 3 + 1) / 2)


def test_one_level_bootstrap_agrees_with_scipy_percentile_bootstrap():
    values = np.random.default_rng(1).normal(size=200)
    ours = stats.bootstrap("mean", stats.statistics("mean", [mean_rows(values)]), resamples=10_000, seed=0)
    theirs = scipy_bootstrap((values,), np.mean, method="percentile", n_resamples=10_000,
                             rng=np.random.default_rng(0)).confidence_interval
    # standard error of the mean ≈ 0.07; the Monte Carlo error of a 2.5 % quantile with 10⁴ replicates ≈ 0.002
    assert ours.estimate == pytest.approx(values.mean())
    assert ours.low == pytest.approx(theirs.low, abs=0.01)
    assert ours.high == pytest.approx(theirs.high, abs=0.01)


def test_identical_systems_differ_by_zero_with_p_one():
    values = np.random.default_rng(2).random((3, 100)) < 0.6
    x = stats.statistics("mean", [mean_rows(v) for v in values])
    diff = stats.paired_difference("mean", x, x, resamples=500)
    assert diff.estimate == 0.0
    assert diff.p_value == 1.0
    assert diff.low <= 0.0 <= diff.high
    assert (diff.seeds, diff.items) == (3, 100)


def test_a_system_better_on_ninety_percent_of_items_is_significant():
    rng = np.random.default_rng(3)
    base = rng.random((3, 300)) < 0.5
    better = base | (rng.random(300) < 0.9)  # right on ~95 % of the items, the baseline on ~50 %
    a, b = (stats.statistics("mean", [mean_rows(v) for v in m]) for m in (base, better))
    diff = stats.paired_difference("mean", a, b, resamples=1000)
    assert diff.estimate > 0.3
    assert diff.p_value < 0.01
    assert diff.low > 0


def test_the_interval_covers_the_true_mean_in_about_95_percent_of_experiments():
    rng = np.random.default_rng(4)
    covered = 0
    for experiment in range(200):  # seeds × items crossed: x = μ + item effect + seed effect + noise, μ = 0
        x = (rng.normal(size=(1, 60)) + 0.3 * rng.normal(size=(8, 1)) + 0.3 * rng.normal(size=(8, 60)))[..., None]
        interval = stats.bootstrap("mean", np.concatenate([np.ones_like(x), x], -1), resamples=400, seed=experiment)
        covered += interval.low <= 0.0 <= interval.high
    assert 180 <= covered <= 198, covered


def test_seed_variance_widens_the_two_level_interval_against_items_only():
    rng = np.random.default_rng(5)
    x = 0.5 + 0.2 * rng.normal(size=(5, 1)) + 0.05 * rng.normal(size=(5, 200))  # the seeds differ, items barely
    x = stats.statistics("mean", [mean_rows(v) for v in x])
    both = stats.bootstrap("mean", x, resamples=1000)
    items = stats.bootstrap("mean", x, resamples=1000, levels=("items",))
    assert (both.high - both.low) > 3 * (items.high - items.low)
    assert both.estimate == items.estimate


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="same, non-zero number of items"):
        stats.statistics("mean", [mean_rows([1, 0]), mean_rows([1])])
    with pytest.raises(ValueError, match="unknown aggregate"):
        stats.statistics("median", [mean_rows([1])])
    x = stats.statistics("mean", [mean_rows([1, 0])])
    with pytest.raises(ValueError, match="must match in shape"):
        stats.paired_difference("mean", x, x[:, :1])
