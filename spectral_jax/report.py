"""One folder per analysed image: the PNGs a person looks at, `result.npz` (B = 1) and `summary.json`.

Files: `input.png` (the image as the model saw it), `segments.png` (segment overlay), `pca.png` (eigenvectors
2–4 as RGB, weighted by their eigenvalues; 2–K when K < 4), `eigvecs.png` (each eigenvector, diverging colours,
titled "#1" … "#K": eigenvectors are counted from 1 everywhere, #1 being the trivial one), `foreground.png`
(bipartition overlay), `instances.png` (instance masks), `panel.png` (all of them side by side at their size, each
titled; `viz.side_by_side` widens the column of a picture narrower than its title), `result.npz`,
`summary.json`; with attribution (`write_attribution`): `attribution.png` (heat maps, `viz.attribution_figure`) and
`attribution.json` (`Attribution.to_json`).
"""

from __future__ import annotations

import os

import numpy as np

from spectral_jax import viz
from spectral_jax.analysis import View
from spectral_jax.files import write_json
from spectral_jax.solvers.result import Result


def pca_title(K: int) -> str:
    """The panel's title over `pca.png` for K eigenvectors: the ones `viz.pca_image` shows, counted from 1 like
    `eigvecs.png` ("eigenvectors 2-4"; "eigenvectors 2-3" for K = 3; "eigenvector 2" for K = 2)."""
    last = min(K, 4)
    if last < 2:
        return "no eigenvector"
    return "eigenvector 2" if last == 2 else f"eigenvectors 2-{last}"


def write_image(folder: str, image: np.ndarray, res: Result, view: View, extra: dict | None = None) -> dict:
    """Write one image's folder; returns its summary (also written as summary.json).

    eigvecs.png's tiles are 96 pixels high and 96·w/h wide (the grid's aspect); `viz.eigvec_grid` widens the cells
    of narrow tiles so their titles stay whole and apart."""
    os.makedirs(folder, exist_ok=True)
    hw = image.shape[:2]
    seg = viz.overlay_segments(image, view.segments)
    pca = viz.pca_image(view.eigvecs, size=hw, eigvals=view.eigvals)
    fg = viz.overlay_segments(image, np.where(view.foreground, 0, -1))
    inst = viz.instance_image(image, view.instances)
    h, w = view.eigvecs.shape[1:]
    grid = viz.eigvec_grid(view.eigvecs, size_per_tile=(96, max(1, round(96 * w / h))), eigvals=view.eigvals)
    for name, arr in [("input", image), ("segments", seg), ("pca", pca), ("foreground", fg), ("instances", inst),
                      ("eigvecs", grid)]:
        viz.save_png(os.path.join(folder, f"{name}.png"), arr)
    viz.save_png(os.path.join(folder, "panel.png"), viz.side_by_side(
        [image, seg, pca, fg, inst], titles=["input", f"segments (k={view.k})", pca_title(view.eigvecs.shape[0]),
                                             "foreground", f"instances ({len(view.instances)})"]))
    res.save(os.path.join(folder, "result.npz"))
    summary = {**res.summary(), "segments_k": view.k, "foreground_fraction": float(view.foreground.mean()),
               "instances": len(view.instances), **(extra or {})}
    write_json(os.path.join(folder, "summary.json"), summary)
    return summary


def write_attribution(folder: str, att) -> None:
    """Write an `analysis.Attribution` into an image's folder: attribution.png and attribution.json."""
    os.makedirs(folder, exist_ok=True)
    viz.save_png(os.path.join(folder, "attribution.png"), viz.attribution_figure(att))
    write_json(os.path.join(folder, "attribution.json"), att.to_json())


RESERVED = ("summary.json",)  # top-level names of an analyze folder that an image's folder must not take


def unique_stems(paths) -> list[str]:
    """One folder name per input: its file stem, unique among all of them.

    The first input with a stem keeps it; a later one with the same stem gets the first `stem-N` (N = 1, 2, ...)
    that is neither another input's own stem nor already given, so `x.jpg x-1.jpg x.png` → `x`, `x-1`, `x-2`.
    Stems that would be hidden, empty or a reserved top-level name (`summary.json`) get a suffix too.
    """
    stems = []
    for p in paths:
        stem = os.path.splitext(os.path.basename(os.fspath(p)))[0].lstrip(".") or "image"
        stems.append(stem)
    taken = set(stems) | set(RESERVED)
    given: set[str] = set()
    out = []
    for stem in stems:
        name = stem
        if name in given or name in RESERVED:
            n = 1
            while f"{stem}-{n}" in taken or f"{stem}-{n}" in given:
                n += 1
            name = f"{stem}-{n}"
        given.add(name)
        out.append(name)
    return out


__all__ = ["pca_title", "unique_stems", "write_attribution", "write_image", "write_json"]
