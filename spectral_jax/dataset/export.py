"""A dataset run's result: `DatasetResult` (a `solvers.result.Result`), the arrays a table becomes, and OUT's files.

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
# Provenance: used by `load_result`, and named here so that the annotations of the inherited `Result.__init__` resolve
from spectral_jax.solvers.result import Convergence, Provenance, Result  # noqa: F401


@dataclasses.dataclass(frozen=True, eq=False)
class DatasetResult(Result):
    """A dataset run's result: a `Result` of the n images read (one solve over all of them: `joint` for n > 1, the
    per-image rows of eigvals/rq/objective the one solve's, repeated), plus the run's names, table and files.

    eigvecs `[n, K, h, w]` float32 (paper: the global SVD of the per-pixel-normalised soft maps, as the official
    code shows them — columns orthonormal over all pixels of all images, largest singular value first; eigen: the
    table's columns, each unit-norm over all pixels; exact: the solve's, orthonormal over all pixels where every
    tapped layer has one grid, B-orthonormal where they have several — a UNet's — (B = Σ_l w_l c_l G_lᵀ G_l, the
    layers' pooling on the finest grid, `solvers.exact`; orth_error is then max |XᵀBX − I|)).

    The `Result` fields, by method:
      exact — the whole-dataset solve's own (`solvers.exact` through `dataset.whole`, its images read): eigvals
        `[n, K]` its eigenvalues (float32, as solved; summary.json holds the same values), rq `[n, G, K]`,
        objective `[n]`, orth_error, steps, seconds (the solve's), method (the solver's), info, provenance (the
        graph kind, tapped layers, layer weights, timesteps, the graph's options as a `GraphSpec` names them and
        how it was built: `Provenance.graph_options`, `graph_record`), convergence (its residual verdict).
      gd — no whole-dataset eigensolve exists: eigvals `[n, K]` NaN (`summary.GD_EIGVALS`; segments then cluster
        unweighted); rq `[n, 0, K]` (no graph is measured); objective `[n]` summary["objective"] (the mean over the
        last epoch's batches of Σ_k Σ_l w_l z_kᵀ P_l z_k; NaN before a full epoch); orth_error max |XᵀX − I| of
        eigvecs over all pixels; steps and seconds the run's; method summary["method"] ("dataset-paper" or
        "dataset-eigen"); history `[n, 0]` (the per-step losses are summary["history"]); provenance as exact's
        (the layer weights the steps used; "k_used" a batch's graphs'); info {};
        convergence the minibatch loss's stationarity verdict (`summary.gd_convergence`).

    Added fields: names `[n]` (file paths relative to the folder, images that were read; unreadable ones are in
    summary["skipped"]); table `[n, K, h, w]` (gd: the debiased EMA of the raw table, logits or free values;
    exact: eigvecs); probs `[n, K, h, w]` softmax(table) (paper preset, else None); record: summary.json's dict,
    which `summary()` returns (as `Result.summary()` returns a solve's); out: OUT; segments: the dataset-wide segments (`cluster.Segments`,
    set by `export.write`; None before it or where another process wrote OUT).

    `load_result(out)` reads the same type back from OUT's files. `select(idx)` slices names/table/probs too (its
    segments None, its summary the whole run's); `save` writes eigvecs.npz, not a RESULT.npz.
    """

    names: list = dataclasses.field(default_factory=list)
    table: np.ndarray | None = None
    probs: np.ndarray | None = None
    record: dict = dataclasses.field(default_factory=dict)
    out: str = ""
    segments: object = None

    def summary(self) -> dict:
        """summary.json's dict (the run's record: settings, timings, convergence, segments, skipped files), the
        object itself (not a copy): what `Result.summary()` is for a single solve."""
        return self.record

    @classmethod
    def from_solve(cls, solved: Result, names: Sequence[str], summary: dict, out: str = "") -> "DatasetResult":
        """An exact run's result: every `Result` field from `solved` (the whole-dataset solve over the images
        `names`), table = eigvecs, no probs."""
        fields = {f.name: getattr(solved, f.name) for f in dataclasses.fields(Result)}
        return cls(**fields, names=list(names), table=solved.eigvecs, probs=None, record=summary, out=out)

    @classmethod
    def from_table(cls, eigvecs: np.ndarray, names: Sequence[str], table: np.ndarray, probs: np.ndarray | None,
                   summary: dict, out: str = "", *, convergence: Convergence | None = None,
                   provenance: Provenance | None = None) -> "DatasetResult":
        """A result without a solve in memory (a gd run; `load_result`): eigvecs `[n, K, h, w]`; eigvals
        summary["eigvals"] `[K]` repeated per image where the summary has them, else NaN (`summary.GD_EIGVALS`); rq
        `[n, 0, K]`; objective summary["objective"] (NaN where None or absent); orth_error summary["orth_error"],
        else max |XᵀX − I| of eigvecs over all pixels; steps, seconds, method from the summary (0, 0.0,
        "dataset" where absent); convergence the one given, else summary["convergence"] (None where absent);
        provenance the one given (None: unknown); history `[n, 0]`; info {}."""
        e = np.asarray(eigvecs, np.float32)
        n, k = e.shape[:2]
        vals = summary.get("eigvals")
        vals = np.full(k, np.nan) if vals is None else np.asarray(vals, np.float64)
        obj = summary.get("objective")
        orth = summary.get("orth_error")
        if orth is None:
            cols = np.transpose(e, (0, 2, 3, 1)).reshape(-1, k).astype(np.float64)
            orth = float(np.abs(cols.T @ cols - np.eye(k)).max()) if cols.size else float("nan")
        if convergence is None and summary.get("convergence") is not None:
            convergence = Convergence.from_dict(summary["convergence"])
        rep = lambda a: np.broadcast_to(a, (n, *np.shape(a)))
        return cls(e, rep(vals), np.zeros((n, 0, k), np.float32), rep(np.nan if obj is None else float(obj)),
                   float(orth), int(summary.get("steps", 0)), float(summary.get("seconds", 0.0)),
                   str(summary.get("solver", summary.get("method", "dataset"))), np.zeros((n, 0), np.float32), {},
                   n > 1, provenance, convergence, names=list(names), table=table, probs=probs, record=summary,
                   out=out)

    def select(self, idx) -> "DatasetResult":
        """The images `idx` (`Result.select`), with their names, table rows and probs (segments None)."""
        idx = np.arange(self.num_images)[np.asarray(idx)].reshape(-1)
        part = super().select(idx)
        cut = lambda a: None if a is None else a[idx]
        return dataclasses.replace(part, names=[self.names[i] for i in idx], table=cut(self.table),
                                   probs=cut(self.probs), segments=None)

    def save(self, target: "str | OutputFile") -> None:
        """eigvecs.npz (a path, or an `OutputFile` reserved earlier): eigvecs, names, table, preset, probs (paper)
        and, where the solve measured them (exact), its rq `[G, K]` (the joint solve's row; `load_result` repeats it
        per image). Not a RESULT.npz."""
        arrays = dict(eigvecs=self.eigvecs.astype(np.float32), names=np.asarray(self.names, dtype=str),
                      table=np.asarray(self.table, np.float32), preset=np.array(self.record.get("preset", "")))
        if self.probs is not None:
            arrays["probs"] = self.probs.astype(np.float32)
        if self.rq.shape[1]:
            arrays["rq"] = self.rq[0]
        save_npz(target, arrays)


def load_result(out: str) -> DatasetResult:
    """Read a finished run's OUT/eigvecs.npz, OUT/summary.json and OUT/segments.npz back into a `DatasetResult`
    (`DatasetResult.from_table`: eigvals, objective, orth_error, steps, convergence from the summary — eigvals
    where the run wrote them, exact runs, else NaN; rq from eigvecs.npz where saved, else `[n, 0, K]`; seconds the
    run's total; method the solver's (exact) or the summary's; provenance summary["provenance"] with the
    summary's "layer_weights" — None for a run exported before the summary held it —; info {}).

    Checked, as `Result.load` checks a RESULT.npz: eigvecs finite `[n, K, h, w]`, names `[n]`, table `[n, K, ...]`,
    probs (where saved) and rq `[G, K]` of the same n and K, the summary's "images" n and "eigvals" K (where it
    holds them), segments.npz's labels `[n, h, w]` for the same names. Anything else — a file missing, damaged,
    cut short or from another run — is one `InputError` naming it and how to write it again; nothing is
    reshaped into place."""
    from spectral_jax.acts import read_npz
    from spectral_jax.io import open_regular

    path = os.path.join(out, "eigvecs.npz")
    if not os.path.isfile(path):
        raise InputError(out, "holds no eigvecs.npz", "run `spectral-jax dataset FOLDER ... --out DIR` first, or "
                         "re-open an interrupted run with --resume")
    fix = "re-export it with `spectral-jax dataset FOLDER ... --out DIR --resume`"
    try:
        with open_regular(os.path.join(out, "summary.json"), "summary.json file") as fh:   # a FIFO: not waited on
            summary = json.load(fh)
    except (OSError, ValueError) as e:
        why = e.problem if isinstance(e, InputError) else type(e).__name__
        raise InputError(out, f"holds an incomplete export (summary.json: {why})", fix) from None
    if not isinstance(summary, dict):
        raise InputError(os.path.join(out, "summary.json"), f"is a JSON {type(summary).__name__}, not an object",
                         fix)
    d = read_npz(path, "eigvecs .npz file", fix)
    seg_path = os.path.join(out, "segments.npz")
    segs = read_npz(seg_path, "segments .npz file", fix) if os.path.isfile(seg_path) else None
    why = _export_problem(d, summary, segs)
    if why is not None:
        raise InputError(os.path.join(out, why[0]), why[1], fix)
    seg = None
    if segs is not None:
        from spectral_jax.dataset.cluster import Segments

        try:
            seg = Segments.from_arrays(segs)
        except (KeyError, ValueError, TypeError) as e:
            raise InputError(seg_path, f"does not hold a run's segments ({type(e).__name__}: {e})", fix) from None
    names = [str(s) for s in d["names"]]
    try:
        prov = summary.get("provenance")
        if prov is not None:
            weights = (summary.get("layer_weights") or {}).get("weights")
            rows = None if weights is None else np.tile([[float(weights[str(l)]) for l in prov["layers"]]],
                                                        (len(names), 1))
            prov = Provenance.from_dict(prov, rows)
        res = DatasetResult.from_table(d["eigvecs"], names, d["table"], d.get("probs"), summary, out,
                                       provenance=prov)
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise InputError(os.path.join(out, "summary.json"), f"does not describe this run's arrays "
                         f"({type(e).__name__}: {e})", fix) from None
    rq = {} if "rq" not in d else {"rq": np.broadcast_to(d["rq"], (res.num_images, *d["rq"].shape))}
    return dataclasses.replace(res, segments=seg, **rq)


def _export_problem(d: dict, summary: dict, segs: dict | None) -> tuple[str, str] | None:
    """(file, what is wrong) with an export's arrays `d` (eigvecs.npz), `summary` and segments.npz `segs` (None:
    none written) against one another; None when they agree (`load_result`)."""
    missing = [k for k in ("eigvecs", "names", "table") if k not in d]
    if missing:
        return "eigvecs.npz", f"lacks {', '.join(missing)} (not a dataset run's eigvecs.npz)"
    x, names, table = d["eigvecs"], d["names"], d["table"]
    if x.ndim != 4 or not np.issubdtype(x.dtype, np.floating) or 0 in x.shape:
        return "eigvecs.npz", f"eigvecs must be a floating [n, K, h, w] array, got {x.dtype} {x.shape}"
    n, k, h, w = x.shape
    if not np.isfinite(x).all():
        return "eigvecs.npz", "eigvecs hold NaN or Inf"
    if names.ndim != 1 or names.dtype.kind != "U" or len(names) != n:
        return "eigvecs.npz", f"names {names.dtype} {names.shape} are not [{n}] strings, one per image of eigvecs"
    if table.ndim != 4 or table.shape[:2] != (n, k):
        return "eigvecs.npz", f"table {table.shape} is not [{n}, {k}, h, w] beside eigvecs {x.shape}"
    if "probs" in d and d["probs"].shape != x.shape:
        return "eigvecs.npz", f"probs {d['probs'].shape} are not eigvecs' {x.shape}"
    if "rq" in d and (d["rq"].ndim != 2 or d["rq"].shape[1] != k):
        return "eigvecs.npz", f"rq {d['rq'].shape} is not [G, {k}]"
    said = summary.get("images")
    if said is not None and said != n:
        return "summary.json", f"says {said!r} images where eigvecs.npz holds {n}: they are of other runs"
    vals = summary.get("eigvals")
    if vals is not None and (not isinstance(vals, list) or len(vals) != k):
        return "summary.json", f"holds {len(vals) if isinstance(vals, list) else repr(vals)} eigvals for {k} " \
            "eigenvectors: they are of other runs"
    if segs is not None:
        labels, seg_names = segs.get("segments"), segs.get("names")
        if labels is None or seg_names is None:
            return "segments.npz", "lacks segments or names (not a dataset run's segments.npz)"
        if labels.shape != (n, h, w) or labels.dtype.kind not in "iu":
            return "segments.npz", f"segments {labels.dtype} {labels.shape} are not [{n}, {h}, {w}] integers"
        if seg_names.shape != names.shape or not np.array_equal(seg_names, names):
            return "segments.npz", "names other images than eigvecs.npz: they are of other runs"
    return None


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


def write(res: DatasetResult, root: str, figure_images: int) -> DatasetResult:
    """OUT's files (module docstring): all reserved first; then the dataset-wide segments (`cluster.segments` with
    the summary's `segments_asked` and `seed`; their numbers in `res.summary()["segments"]`); then eigvecs.png and
    segments.png (the first `figure_images` images; none for 0), eigvecs.npz, segments.npz and summary.json, in that
    order. Returns `res` with its `segments` set (a copy: `DatasetResult` is frozen)."""
    from spectral_jax.dataset.cluster import check_count, segments

    figures = ["eigvecs.png", "segments.png"] if figure_images and res.names else []
    with contextlib.ExitStack() as stack:
        out = {name: stack.enter_context(OutputFile(os.path.join(res.out, name)))
               for name in figures + ["eigvecs.npz", "segments.npz", "summary.json"]}
        asked = res.summary().get("segments_asked", "auto")
        n, _, h, w = np.shape(res.eigvecs)                 # `segments` clusters every token of eigvecs
        check_count(asked, n * h * w, "--segments",
                    "the solve is kept in OUT: rerun with --resume and ")
        res = dataclasses.replace(res, segments=segments(res, asked, res.summary().get("seed", 0)))
        res.summary()["segments"] = res.segments.report()
        if res.provenance is not None:          # what `load_result` reads back (the layer weights: "layer_weights")
            res.summary()["provenance"] = res.provenance.as_dict()
        if figures:
            m = min(figure_images, len(res.names))
            _png(out["eigvecs.png"], viz.dataset_figure(res.eigvecs[:m], thumbnails(root, res.names[:m], 48),
                                                        num_vecs=15))
            _png(out["segments.png"], viz.dataset_segments_figure(
                res.segments.labels[:m], thumbnails(root, res.names[:m], 64), res.segments.num_segments))
        res.save(out["eigvecs.npz"])
        save_npz(out["segments.npz"], res.segments.arrays(res.names))
        with open(out["summary.json"].tmp, "w") as fh:
            fh.write(json.dumps(res.summary(), indent=2) + "\n")
        out["summary.json"].commit()
    return res


def _png(target: OutputFile, array: np.ndarray) -> None:
    viz.save_png(target.tmp, array)
    target.commit()


__all__ = ["DatasetResult", "global_eigvecs", "load_result", "table_arrays", "thumbnails", "write"]
