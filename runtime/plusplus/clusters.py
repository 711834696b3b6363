"""scikit-learn's KMeans as persense++.py ran it, imported only when PerSense++ clusters (keeps `import persense`
light)."""

from __future__ import annotations

import warnings

import numpy as np

KMEANS_N_INIT = 10  # scikit-learn <= 1.3's default, the original's environment; newer versions default to 1


def kmeans(samples: np.ndarray, clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels, centres) of `KMeans(n_clusters=clusters, random_state=seed, n_init=10).fit(samples)`.

    On one thread: the samples are a few masks or boxes, where OpenMP's thread start-up costs 10-100x the
    clustering itself; up to 256 samples (one chunk of scikit-learn's Lloyd loop) the result is the same.
    """
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits

    # identical samples (e.g. equal feedback boxes) give fewer distinct clusters, as in the original; the result
    # records the regions found, so scikit-learn's warning about it is not printed on every image
    with threadpool_limits(limits=1), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = KMeans(n_clusters=clusters, random_state=seed, n_init=KMEANS_N_INIT).fit(samples)
    return model.labels_, model.cluster_centers_


def standardised(samples: np.ndarray) -> np.ndarray:
    """`StandardScaler().fit_transform`: per column (x - mean) / population std, zero-variance columns unscaled."""
    from sklearn.preprocessing import StandardScaler

    return StandardScaler().fit_transform(samples)


def preload() -> None:
    """Import scikit-learn now (1-3 s once per process), so that the first PerSense++ image does not pay for it."""
    import sklearn.cluster  # noqa: F401
    import sklearn.preprocessing  # noqa: F401
