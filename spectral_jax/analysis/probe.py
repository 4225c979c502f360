"""Linear probes: closed-form ridge regression from per-pixel features to targets (coordinates, labels), scored
by R² or accuracy on held-out points. Pure numpy.

Shape legend
    N  points (e.g. pixels, row-major)   F  features per point   T  regression targets (or classes)

Everything random takes a `seed`: the same inputs and seed give the same outputs. Arithmetic is float64 inside.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from spectral_jax.analysis.features import _features
from spectral_jax.errors import InputError

__all__ = ["Probe", "linear_probe"]


class Probe(NamedTuple):
    """A fitted ridge probe: prediction = features @ weights + bias (argmax over `classes` for labels)."""

    weights: np.ndarray  # [F, T]
    bias: np.ndarray  # [T]
    score: float  # R² (targets) or accuracy (labels) on the held-out points; in-sample when holdout == 0
    train_score: float
    classes: np.ndarray | None  # [T] label values when fitted to labels, else None

    def predict(self, features) -> np.ndarray:
        """Predictions for `[N, F]` features: `[N, T]` float64, or labels `[N]` for a classification probe."""
        y = np.asarray(features, np.float64) @ self.weights + self.bias
        return y if self.classes is None else self.classes[np.argmax(y, 1)]


def _r2(y: np.ndarray, pred: np.ndarray) -> float:
    """R² = 1 − SS_res/SS_tot per target column, averaged (a constant column scores 1 if fitted exactly, else 0)."""
    ss_res = ((y - pred) ** 2).sum(0)
    ss_tot = ((y - y.mean(0)) ** 2).sum(0)
    r2 = np.where(ss_tot > 0, 1.0 - ss_res / np.where(ss_tot > 0, ss_tot, 1.0), (ss_res <= 1e-12).astype(float))
    return float(r2.mean())


def linear_probe(features, targets, ridge: float = 1e-3, holdout: float = 0.0, seed: int = 0) -> Probe:
    """Closed-form ridge regression from `features` `[N, F]` to `targets`.

    targets: float `[N]` or `[N, T]` (scored by R², averaged over columns) or integer/bool labels `[N]` (regressed
    on one-hot codes, predicted by argmax, scored by accuracy). With centred X, Y on the training points,
    W = (XᵀX + ridge·I)⁻¹ XᵀY and b = ȳ − x̄ W (the intercept is not penalised); ridge must be finite and
    ≥ 0 (0: minimum-norm least squares) — NaN or ∞ is refused, not fitted. `holdout` (a fraction) of the
    points, drawn with `seed`, is left out of the fit and gives `score`. E.g. "where": targets = grid_coords(h, w);
    "what": targets = semantic labels.
    """
    x = _features(features)
    n = x.shape[0]
    t = np.asarray(targets)
    if t.shape[0] != n or t.ndim not in (1, 2):
        raise InputError("targets", f"must be [N] or [N, T] with N = {n}, got shape {t.shape}",
                         "pass one target row per feature row")
    classes = None
    if t.ndim == 1 and (np.issubdtype(t.dtype, np.integer) or t.dtype == bool):
        classes, idx = np.unique(t, return_inverse=True)
        y = np.zeros((n, classes.size))
        y[np.arange(n), idx.reshape(-1)] = 1.0
    else:
        y = t.astype(np.float64).reshape(n, -1)
        if not np.all(np.isfinite(y)):
            raise InputError("targets", "contains NaN or Inf", "drop or fix those rows")
    try:
        ridge = float(ridge)
    except (TypeError, ValueError):
        raise InputError("ridge", f"must be a number, got {ridge!r}", "e.g. ridge=1e-3") from None
    if not (np.isfinite(ridge) and ridge >= 0):  # NaN fails every comparison: it would fit unregularised
        raise InputError("ridge", f"must be finite and >= 0, got {ridge}", "e.g. ridge=1e-3; 0 for plain least squares")
    if not 0.0 <= holdout < 1.0:
        raise InputError("holdout", f"must be a fraction in [0, 1), got {holdout}", "e.g. holdout=0.2")
    n_test = int(round(holdout * n))
    if holdout > 0 and not 1 <= n_test < n:
        raise InputError("holdout", f"{holdout} of {n} points leaves an empty split", "use more points")
    perm = np.random.default_rng(seed).permutation(n) if n_test else np.arange(n)
    test, train = perm[:n_test], perm[n_test:]
    xm, ym = x[train].mean(0), y[train].mean(0)
    xc, yc = x[train] - xm, y[train] - ym
    gram = xc.T @ xc
    if ridge > 0:
        wts = np.linalg.solve(gram + ridge * np.eye(gram.shape[0]), xc.T @ yc)
    else:
        wts = np.linalg.lstsq(xc, yc, rcond=None)[0]
    probe = Probe(wts, ym - xm @ wts, 0.0, 0.0, classes)

    def score(rows):
        if classes is None:
            return _r2(y[rows], probe.predict(x[rows]))
        return float(np.mean(probe.predict(x[rows]) == t[rows]))

    tr = score(train)
    return probe._replace(train_score=tr, score=score(test) if n_test else tr)
