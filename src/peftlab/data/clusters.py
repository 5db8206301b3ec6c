r"""Choosing HydraLoRA's number of heads N by clustering the training texts (``estimate_num_heads``).

The paper (appendix) picks N by clustering the training texts: TF-IDF vectors → k-means for
K = 1 … max_heads → the elbow of the inertia (SSE) curve, or the cluster count of DBSCAN. No code was
released; :func:`estimate_num_heads` implements it.

The elbow rule. Write I_K for the k-means inertia with K clusters and g_K = (I_K − I_{K+1}) / I_1 for
the relative gain of one more cluster. TF-IDF vectors of short texts are nearly orthogonal, so even
text without any topic structure gives gains of a few percent per cluster (k-means splits noise), and
an elbow read off the raw curve finds "clusters" in a single-topic corpus. The noise level is measured
on a topic-free copy of the corpus: the same word occurrences shuffled across the texts (each text
keeps its length, each word its frequency). With ĝ = max_K g⁰_K, the largest gain on that copy,

    N = 1 + #{leading K with g_K ≥ noise_factor · ĝ}     (noise_factor = 2 by default)

i.e. the elbow is the first K after which one more cluster gains no more than noise does. A corpus
without topics gives N = 1; c well-separated topics give N = c.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from scipy import sparse

from peftlab.errors import DataError

__all__ = ["elbow_from_gains", "estimate_num_heads"]

CLUSTERINGS = ("kmeans", "dbscan")


def elbow_from_gains(inertia: Sequence[float], null_inertia: Sequence[float], noise_factor: float = 2.0) -> int:
    """N from the k-means inertia curves (K = 1, 2, …) of the corpus and of its topic-free copy.

    N = 1 + the number of leading K whose relative gain (I_K − I_{K+1}) / I_1 is at least
    ``noise_factor`` times the largest relative gain of the null curve (see the module docstring).
    """
    real = np.asarray(inertia, dtype=float)
    null = np.asarray(null_inertia, dtype=float)
    if real.size < 2 or real[0] <= 0:
        return 1
    gains = -np.diff(real) / real[0]
    noise = float(np.max(-np.diff(null) / null[0])) if null.size >= 2 and null[0] > 0 else 0.0
    above = gains >= noise_factor * max(noise, 1e-12)
    return 1 + (int(np.argmin(above)) if not above.all() else above.size)


def _shuffled_counts(counts: sparse.csr_matrix, rng: np.random.Generator) -> sparse.csr_matrix:
    """The same word occurrences dealt at random to the texts, each text keeping its length."""
    counts = counts.tocsr()
    words = np.repeat(counts.indices, counts.data)  # one entry per occurrence
    rng.shuffle(words)
    rows = np.repeat(np.arange(counts.shape[0]), np.asarray(counts.sum(axis=1)).ravel())
    return sparse.csr_matrix((np.ones_like(words), (rows, words)), shape=counts.shape)


def _kmeans_inertias(x: sparse.csr_matrix, max_k: int, seed: int) -> tuple[list[float], list]:
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    inertias, models = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # fewer distinct texts than K: inertia 0
        for k in range(1, max_k + 1):
            model = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(x)
            inertias.append(float(model.inertia_))
            models.append(model)
    return inertias, models


def estimate_num_heads(
    texts: Sequence[str],
    max_heads: int = 8,
    method: str = "kmeans",
    seed: int = 0,
    *,
    noise_factor: float = 2.0,
    eps: float | None = None,
    min_samples: int = 5,
    max_samples: int | None = 20_000,
) -> tuple[int, np.ndarray]:
    """Suggest HydraLoRA's ``num_heads`` by clustering ``texts`` (TF-IDF, English stop words removed).

    Args:
        texts: the training texts (e.g. prompt + response per example).
        max_heads: the largest N considered (k-means runs K = 1 … max_heads).
        method: ``"kmeans"`` (elbow of the inertia curve, see the module docstring) or ``"dbscan"``
            (number of DBSCAN clusters with the cosine metric, capped at ``max_heads``).
        seed: random seed (k-means init, the shuffled null corpus, subsampling).
        noise_factor: k-means: how many times the noise gain one more cluster must gain.
        eps: DBSCAN neighbourhood radius in cosine distance; default: the upper quartile of the distance of
            a text to its ``min_samples``-th nearest neighbour (so 3/4 of the texts are core points).
        min_samples: DBSCAN core-point size.
        max_samples: cluster a random subset of this many texts (labels for the rest are predicted).

    Returns:
        ``(n, labels)``: the suggested number of heads and a cluster label per text
        (k-means: 0 … n−1; DBSCAN: its labels, −1 for noise).
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not one string; wrap it in a list")
    texts = list(texts)
    if not texts:
        raise DataError("texts is empty: estimate_num_heads needs the training texts to cluster")
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must all be strings")
    if isinstance(max_heads, bool) or not isinstance(max_heads, int) or max_heads < 1:
        raise DataError(f"max_heads must be an integer >= 1; got {max_heads!r}")
    if method not in CLUSTERINGS:
        raise DataError(f"method={method!r}; use one of {list(CLUSTERINGS)}")
    if not (isinstance(noise_factor, (int, float)) and math.isfinite(noise_factor) and noise_factor > 0):
        raise DataError(f"noise_factor must be a finite number > 0; got {noise_factor!r}")
    from sklearn.feature_extraction.text import CountVectorizer, TfidfTransformer

    rng = np.random.default_rng(seed)
    sample = texts
    if max_samples is not None and len(texts) > max_samples:
        sample = [texts[i] for i in rng.choice(len(texts), size=max_samples, replace=False)]
    vectorizer = CountVectorizer(stop_words="english")
    try:
        counts = vectorizer.fit_transform(sample)
    except ValueError as err:  # sklearn: "empty vocabulary"
        raise DataError(f"the texts contain no words to cluster (only stop words or symbols?): {err}") from err
    tfidf = TfidfTransformer(sublinear_tf=True).fit(counts)
    x = tfidf.transform(counts)

    def all_vectors() -> sparse.csr_matrix:
        return x if sample is texts else tfidf.transform(vectorizer.transform(texts))

    if method == "dbscan":
        from sklearn.cluster import DBSCAN
        from sklearn.neighbors import NearestNeighbors

        k = min(min_samples, len(sample))
        if eps is None:
            dist, _ = NearestNeighbors(n_neighbors=k, metric="cosine").fit(x).kneighbors(x)
            eps = max(float(np.quantile(dist[:, -1], 0.75)), 1e-6)
        model = DBSCAN(eps=eps, min_samples=k, metric="cosine").fit(x)
        labels = model.labels_
        if sample is not texts:  # the nearest core text's label, or noise
            dist, idx = (
                NearestNeighbors(n_neighbors=1, metric="cosine")
                .fit(x[model.core_sample_indices_])
                .kneighbors(all_vectors())
            )
            labels = np.where(dist[:, 0] <= eps, labels[model.core_sample_indices_][idx[:, 0]], -1)
        found = len(set(labels.tolist()) - {-1})
        if found > max_heads:
            warnings.warn(
                f"DBSCAN found {found} clusters, more than max_heads={max_heads}; returning {max_heads}. "
                "Raise eps or min_samples for coarser clusters.",
                stacklevel=2,
            )
        return max(1, min(found, max_heads)), np.asarray(labels)

    max_k = min(max_heads, x.shape[0])
    inertias, models = _kmeans_inertias(x, max_k, seed)
    null = TfidfTransformer(sublinear_tf=True).fit_transform(_shuffled_counts(counts, rng))
    null_inertias, _ = _kmeans_inertias(null, max_k, seed)
    n = elbow_from_gains(inertias, null_inertias, noise_factor)
    return n, np.asarray(models[n - 1].predict(all_vectors()))
