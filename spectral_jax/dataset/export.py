"""A dataset run's result: `DatasetResult`, the arrays a table becomes, and OUT's files.

OUT gets, all reserved before the export's work (`files.OutputFile`: an unwritable OUT fails before the segments
are computed, nothing half-written is ever seen), in this order: eigvecs.png (`viz.dataset_figure`) and
segments.png (`viz.dataset_segments_figure`) of the first `figure_images` images, eigvecs.npz, segments.npz
(`cluster.Segments.arrays`), then summary.json — last, so its presence marks a complete export (a failed export
leaves only the checkpoints, and `--resume` re-exports). `load_result` reads a finished OUT back.

Shape legend
    n  images read    K  eigenvectors    (h, w)  base grid
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Sequence

import numpy as np

from spectral_jax import viz
from spectral_jax.errors import InputError
from spectral_jax.files import OutputFile, save_npz


@dataclasses.dataclass
class DatasetResult:
    """Per-image eigenvectors of a dataset run.

    eigvecs `[n, K, h, w]` float32 (paper: the global SVD of the per-pixel-normalised soft maps, as the official
    code shows them — columns orthonormal over all pixels of all images, largest singular value first; eigen: the
    table's columns, each unit-norm over all pixels); names `[n]` (file paths relative to the folder, images that
    were read; unreadable ones are in summary["skipped"]); table `[n, K, h, w]` the debiased EMA of the raw table
    (logits or free values); probs `[n, K, h, w]` softmax(table) (paper preset, else None); summary (summary.json);
    segments: the dataset-wide segments (`cluster.Segments`, set by the export; None before it); eigvals `[K]`
    float64: the eigenvalues of the whole-dataset operator (method exact: the solve's, largest first; None for gd
    runs, which have none); convergence: the solve's verdict (`solvers.result.Convergence`: exact's residuals, or
    the minibatch gd's stationarity — summary.json's "convergence" is its `as_dict()`); result: the exact solve's
    own `Result` over the images read (eigvecs, eigvals, rq, objective, convergence, provenance; None for gd runs
    and for `load_result`).
    """

    eigvecs: np.ndarray
    names: list
    table: np.ndarray
    probs: np.ndarray | None
    summary: dict
    out: str = ""
    segments: object = None
    eigvals: np.ndarray | None = None
    convergence: object = None
    result: object = None

    def save(self, target: "str | OutputFile") -> None:
        """eigvecs.npz (a path, or an `OutputFile` reserved earlier)."""
        arrays = dict(eigvecs=self.eigvecs.astype(np.float32), names=np.asarray(self.names, dtype=str),
                      table=self.table.astype(np.float32), preset=np.array(self.summary.get("preset", "")))
        if self.probs is not None:
            arrays["probs"] = self.probs.astype(np.float32)
        save_npz(target, arrays)


def load_result(out: str) -> DatasetResult:
    """Read a finished run's OUT/eigvecs.npz and OUT/summary.json (eigvals and convergence from the summary, where
    the run wrote them)."""
    path = os.path.join(out, "eigvecs.npz")
    if not os.path.isfile(path):
        raise InputError(out, "holds no eigvecs.npz", "run `spectral-jax dataset FOLDER ... --out DIR` first, or "
                         "re-open an interrupted run with --resume")
    try:
        with open(os.path.join(out, "summary.json")) as fh:
            summary = json.load(fh)
    except (OSError, ValueError) as e:
        raise InputError(out, f"holds an incomplete export (summary.json: {type(e).__name__})",
                         "re-export it with `spectral-jax dataset FOLDER ... --out DIR --resume`") from None
    with np.load(path, allow_pickle=False) as f:
        d = {k: f[k] for k in f.files}
    seg = None
    if os.path.isfile(os.path.join(out, "segments.npz")):
        from spectral_jax.dataset.cluster import Segments

        with np.load(os.path.join(out, "segments.npz"), allow_pickle=False) as f:
            seg = Segments.from_arrays({k: f[k] for k in f.files})
    from spectral_jax.solvers.result import Convergence

    vals, conv = summary.get("eigvals"), summary.get("convergence")
    return DatasetResult(d["eigvecs"], [str(s) for s in d["names"]], d["table"], d.get("probs"), summary, out, seg,
                         None if vals is None else np.asarray(vals, np.float64),
                         None if conv is None else Convergence.from_dict(conv))


def global_eigvecs(probs: np.ndarray) -> np.ndarray:
    """`[n, K, h, w]` soft maps → their global SVD: each pixel's K-vector L2-normalised, then the left singular
    vectors of the `[n·h·w, K]` matrix (via the K×K Gram matrix, streamed over images), largest first, signs fixed
    so that each column sums positive (`solvers.result.fix_signs`)."""
    from spectral_jax.solvers.result import fix_signs

    n, k, h, w = probs.shape
    gram = np.zeros((k, k))
    feats = []
    for i in range(n):
        f = np.transpose(probs[i], (1, 2, 0)).reshape(-1, k).astype(np.float64)
        f /= np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
        gram += f.T @ f
        feats.append(f)
    vals, vecs = np.linalg.eigh(gram)
    vals, vecs = vals[::-1], vecs[:, ::-1]
    s = np.sqrt(np.maximum(vals, 0.0))
    u = np.concatenate(feats) @ vecs / np.where(s > 1e-12 * max(s[0], 1e-30), s, np.inf)
    u = fix_signs(u)
    return np.transpose(u.reshape(n, h, w, k), (0, 3, 1, 2)).astype(np.float32)


def table_arrays(preset: str, table: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(eigvecs, probs) of a debiased table `[n, K, h, w]`: paper → the global SVD of softmax(table) and the soft
    maps; eigen → each column scaled to unit norm over all pixels, no soft maps."""
    if preset == "paper":
        z = table - table.max(axis=1, keepdims=True)
        probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        return global_eigvecs(probs), probs
    k = table.shape[1]
    cols = np.transpose(table, (0, 2, 3, 1)).reshape(-1, k)
    return (table / np.maximum(np.linalg.norm(cols, axis=0), 1e-12)[None, :, None, None]).astype(np.float32), None


def thumbnails(root: str, names: Sequence[str], tile: int) -> list[np.ndarray]:
    """uint8 `[tile, tile, 3]` of each image (squashed to a square, as the model saw it); grey for a file that can
    no longer be read (moved or changed since the run read it: the figure must not lose the run's results)."""
    from PIL import Image

    from spectral_jax import io

    def one(n):
        try:
            img = io.load_image(os.path.join(root, n))
        except InputError:
            return np.full((tile, tile, 3), 128, np.uint8)
        return np.asarray(Image.fromarray(img).resize((tile, tile), Image.Resampling.BICUBIC))

    return [one(n) for n in names]


def write(res: DatasetResult, root: str, figure_images: int) -> None:
    """OUT's files (module docstring): all reserved first; then the dataset-wide segments (`cluster.segments` with
    the summary's `segments_asked` and `seed`; set on `res.segments`, their numbers in `res.summary["segments"]`);
    then eigvecs.png and segments.png (the first `figure_images` images; none for 0), eigvecs.npz, segments.npz and
    summary.json, in that order."""
    from spectral_jax.dataset.cluster import segments

    figures = ["eigvecs.png", "segments.png"] if figure_images and res.names else []
    with contextlib.ExitStack() as stack:
        out = {name: stack.enter_context(OutputFile(os.path.join(res.out, name)))
               for name in figures + ["eigvecs.npz", "segments.npz", "summary.json"]}
        res.segments = segments(res, res.summary.get("segments_asked", "auto"), res.summary.get("seed", 0))
        res.summary["segments"] = res.segments.report()
        if figures:
            m = min(figure_images, len(res.names))
            _png(out["eigvecs.png"], viz.dataset_figure(res.eigvecs[:m], thumbnails(root, res.names[:m], 48),
                                                        num_vecs=15))
            _png(out["segments.png"], viz.dataset_segments_figure(
                res.segments.labels[:m], thumbnails(root, res.names[:m], 64), res.segments.num_segments))
        res.save(out["eigvecs.npz"])
        save_npz(out["segments.npz"], res.segments.arrays(res.names))
        with open(out["summary.json"].tmp, "w") as fh:
            fh.write(json.dumps(res.summary, indent=2) + "\n")
        out["summary.json"].commit()


def _png(target: OutputFile, array: np.ndarray) -> None:
    viz.save_png(target.tmp, array)
    target.commit()


__all__ = ["DatasetResult", "global_eigvecs", "load_result", "table_arrays", "thumbnails", "write"]
