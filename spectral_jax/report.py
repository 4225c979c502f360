"""One folder per analysed image: the PNGs a person looks at, `result.npz` (B = 1) and `summary.json`.

Files: `input.png` (the image as the model saw it), `segments.png` (segment overlay), `pca.png` (eigenvectors
2…K as RGB), `eigvecs.png` (each eigenvector, diverging colours), `foreground.png` (bipartition overlay),
`instances.png` (instance masks), `panel.png` (all of them side by side), `result.npz`, `summary.json`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager

import numpy as np

from spectral_jax import viz
from spectral_jax.acts import write_atomic
from spectral_jax.pipeline import View
from spectral_jax.solvers.result import Result


def one_image(res: Result, b: int) -> Result:
    """Image b of a (possibly stacked) `Result`, as a B = 1 `Result`."""
    per_image = res.eigvals.ndim == 2
    obj = res.info.get("objective_per_image", [res.objective] * res.eigvecs.shape[0])[b]
    return Result(res.eigvecs[b:b + 1], res.eigvals[b] if per_image else res.eigvals,
                  res.rq[b] if per_image else res.rq, float(obj), res.orth_error, res.steps, res.seconds,
                  res.method, res.history[b] if per_image and res.history.ndim == 2 else res.history,
                  {k: v for k, v in res.info.items() if k != "objective_per_image"})


def write_json(path: str, data) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(json.dumps(data, indent=2) + "\n")

    write_atomic(path, write)


def write_image(folder: str, image: np.ndarray, res: Result, view: View, extra: dict | None = None) -> dict:
    """Write one image's folder; returns its summary (also written as summary.json)."""
    os.makedirs(folder, exist_ok=True)
    hw = image.shape[:2]
    seg = viz.overlay_segments(image, view.segments)
    pca = viz.pca_image(view.eigvecs, size=hw)
    fg = viz.overlay_segments(image, np.where(view.foreground, 0, -1))
    inst = viz.instance_image(image, view.instances)
    h, w = view.eigvecs.shape[1:]
    grid = viz.eigvec_grid(view.eigvecs, size_per_tile=(96, max(1, round(96 * w / h))), eigvals=view.eigvals)
    for name, arr in [("input", image), ("segments", seg), ("pca", pca), ("foreground", fg), ("instances", inst),
                      ("eigvecs", grid)]:
        viz.save_png(os.path.join(folder, f"{name}.png"), arr)
    viz.save_png(os.path.join(folder, "panel.png"), viz.side_by_side(
        [image, seg, pca, fg, inst], titles=["input", f"segments (k={view.k})", "eigenvectors 2-4 (PCA)",
                                             "foreground", f"instances ({len(view.instances)})"]))
    res.save(os.path.join(folder, "result.npz"))
    summary = {**res.summary(), "segments_k": view.k, "foreground_fraction": float(view.foreground.mean()),
               "instances": len(view.instances), **(extra or {})}
    write_json(os.path.join(folder, "summary.json"), summary)
    return summary


@contextmanager
def staged_dir(out: str):
    """Build an output folder in a sibling temp folder and move it into place only on success."""
    parent = os.path.dirname(os.path.abspath(out)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-" + os.path.basename(os.path.abspath(out)) + "-")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(tmp):
        dst = os.path.join(out, name)
        if os.path.isdir(dst):
            shutil.rmtree(dst)
        os.replace(os.path.join(tmp, name), dst)
    os.rmdir(tmp)


def unique_stems(paths) -> list[str]:
    """File stems, made unique with a numeric suffix where two inputs share one."""
    seen: dict[str, int] = {}
    out = []
    for p in paths:
        stem = os.path.splitext(os.path.basename(p))[0] or "image"
        n = seen.get(stem, 0)
        seen[stem] = n + 1
        out.append(stem if n == 0 else f"{stem}-{n}")
    return out


__all__ = ["one_image", "staged_dir", "unique_stems", "write_image", "write_json", "np"]
