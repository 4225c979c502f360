"""Segmentation metrics: the IoU of two masks and the mean IoU after Hungarian matching of segments to classes.
Pure numpy; scipy for the matching, imported where used.

Shape legend
    any shape, as long as prediction and ground truth agree (e.g. (H, W) image pixels)
"""

from __future__ import annotations

import numpy as np

from spectral_jax.errors import InputError

__all__ = ["iou", "miou_hungarian"]


def _mask(x, name: str) -> np.ndarray:
    """`x` as a bool mask: bool, or numbers that are all 0 or 1. Anything else — NaN (bool(NaN) is True), a soft
    mask of probabilities, 0/255 — is an `InputError` naming `name`: casting it would count it as foreground."""
    a = np.asarray(x)
    if a.dtype != bool and not (np.issubdtype(a.dtype, np.number) and np.isin(a, (0, 1)).all()):
        raise InputError(name, "is not a mask of 0/1 (or bool) values: NaN, a soft mask or 0/255 would all count "
                         "as foreground", "threshold it first (e.g. pred > 0.5)")
    return a.astype(bool)


def iou(pred, gt) -> float:
    """Intersection over union |pred ∧ gt| / |pred ∨ gt| of two masks of one shape (bool, or numbers all 0 or 1:
    anything else is refused, `_mask`); 1.0 when both are empty."""
    p, g = _mask(pred, "pred"), _mask(gt, "gt")
    if p.shape != g.shape:
        raise InputError("pred/gt", f"shapes differ: {p.shape} vs {g.shape}", "upsample the prediction first")
    union = int(np.logical_or(p, g).sum())
    return 1.0 if union == 0 else float(np.logical_and(p, g).sum() / union)


def miou_hungarian(pred_labels, gt_labels, ignore=None, match: str = "count"):
    """Mean IoU after a one-to-one Hungarian matching of predicted segments to ground-truth classes.

    pred_labels, gt_labels: label arrays of one shape (any values but NaN, which is refused: it would be a class of
    its own); pixels whose gt label is in `ignore` (an int or a sequence) are left out. With C[p, g] the confusion
    counts, the matching maximises Σ C[p, g] (`match="count"`, as unsupervised-segmentation evaluations do) or Σ
    IoU[p, g] (`"iou"`), IoU[p, g] = C / (|p| + |g| − C). mIoU averages IoU over all gt classes present; a class
    left unmatched (fewer segments than classes) scores 0.
    Returns (miou, matching) with matching a dict {pred label: gt label}.
    """
    from scipy.optimize import linear_sum_assignment

    p, g = np.asarray(pred_labels), np.asarray(gt_labels)
    if p.shape != g.shape:
        raise InputError("pred_labels/gt_labels", f"shapes differ: {p.shape} vs {g.shape}",
                         "upsample the prediction to the ground truth's size first")
    for name, a in (("pred_labels", p), ("gt_labels", g)):
        if np.issubdtype(a.dtype, np.inexact) and np.isnan(a).any():
            raise InputError(name, "holds NaN labels (each NaN pixel would count as a class of its own)",
                             "give them a label, and pass it as `ignore` to leave them out")
    valid = np.ones(g.shape, bool) if ignore is None else ~np.isin(g, np.atleast_1d(np.asarray(ignore)))
    if not valid.any():
        raise InputError("gt_labels", "no pixel is left after removing `ignore`", "check the ignore label")
    pv, pi = np.unique(p[valid], return_inverse=True)
    gv, gi = np.unique(g[valid], return_inverse=True)
    conf = np.bincount(pi.reshape(-1) * gv.size + gi.reshape(-1), minlength=pv.size * gv.size)
    conf = conf.reshape(pv.size, gv.size).astype(np.float64)
    ious = conf / (conf.sum(1, keepdims=True) + conf.sum(0, keepdims=True) - conf)
    if match == "count":
        rows, cols = linear_sum_assignment(conf, maximize=True)
    elif match == "iou":
        rows, cols = linear_sum_assignment(ious, maximize=True)
    else:
        raise InputError("match", f"unknown matching {match!r}", "use 'count' or 'iou'")
    per_class = np.zeros(gv.size)
    per_class[cols] = ious[rows, cols]
    matching = {pv[r].item(): gv[c].item() for r, c in zip(rows, cols)}
    return float(per_class.mean()), matching
