"""summary.json of a dataset run: what was solved, how well, how fast, from which files. JSON-ready dict; at least
`objective`, `seconds`, `method`, `num_eigs`, `steps` (the command-line contract), plus the run's settings, the
effective k (and each layer group's, "k_used"), the skipped and ignored files and the per-step history; a gd run's
has no "eigvals" ("eigvals_kind" says why: `GD_EIGVALS`). `segments_asked` is the request
(`Settings.segments`); the export adds `segments`, the dataset-wide segments' numbers (`cluster.Segments.report`).
"convergence": exact's report (`Result.convergence`) for method "exact"; for the minibatch gd its verdict (`gd_convergence`); both `Convergence.as_dict()`."""

from __future__ import annotations

import dataclasses

from typing import NamedTuple

import numpy as np

from spectral_jax.dataset.layout import Geometry
from spectral_jax.dataset.settings import Settings
from spectral_jax.graphs import SIGMA_PAIRS
from spectral_jax.solvers.gd import (COLLAPSED, SATURATED, STATIONARITY_TOL, STATIONARITY_WINDOW, collapsed_why,
                                     saturated_why, stationarity_verdict)
from spectral_jax.solvers.result import Convergence

HISTORY_COLUMNS = ["loss_first_inner_step", "loss", "objective", "images"]
GD_EIGVALS = ("NaN: the minibatch gd never forms the whole-dataset operator, so it has no eigenvalues of it (each "
              "step sees another batch's graph); method exact solves that operator and reports them")


class Progress(NamedTuple):
    """Where the run stands at export."""

    history: list               # one row per step (HISTORY_COLUMNS), over every process run so far
    steps: int                  # steps taken in total
    steps_this_run: int
    resumed_from: int | None    # the checkpoint step this process started from
    per_epoch: int              # steps per epoch


class Timings(NamedTuple):
    seconds: float              # this process, start to export
    seconds_total: float        # every process run so far
    loop: float                 # this process's steps
    compile: float              # compiling the step


class GdVerdict(NamedTuple):
    """The minibatch gd run's verdict (`gd_verdict`) and, where it has not converged, why and the fix, decided once:
    summary.json writes `convergence`, the run's warning (`loop._warn_unconverged`) words `why` and `fix`."""

    convergence: Convergence
    why: str | None             # None when converged
    fix: str | None             # the flag to change; None when converged


def gd_verdict(history: list, per_epoch: int, tol: float = STATIONARITY_TOL, saturated: float | None = None,
               spread: float | None = None, since: int = 0) -> GdVerdict:
    """The minibatch gd run's verdict from its per-step history (rows of HISTORY_COLUMNS): gd's stationarity verdict
    (`solvers.gd.stationarity_verdict`, the paper preset's) of the per-step loss over windows of whole epochs — the
    last `STATIONARITY_WINDOW` of the epochs run, at least one — against the loss at the run's first inner step:
    converged when the last window still made ≤ `tol` of the run's whole change of the loss (stationarity None,
    not converged, before two windows). Windows of whole epochs average over the same images (each epoch visits
    all of them, in other batches), which smooths the minibatches' noise. This is a verdict on the minibatch loss
    the run minimises, not a residual on the whole-dataset graph, which this path never builds (method "exact"
    solves that graph and reports its residuals). summary.json's "convergence" is its `as_dict()`. Steps whose
    batch held no readable image (images 0: a loss of masked slots only) are left out of the series, the window
    counting the steps with images in the last window of epochs. saturated: the paper table's `solvers.gd.saturation`
    (its softmax over K, read images only): above `SATURATED` the still loss is a stuck point (a huge lr threw the
    logits apart, no gradient flows), not converged, and `kind` says so. spread: the paper maps' `solvers.gd.spread`
    (read images only): a still loss with the maps below `COLLAPSED` (lam too small to keep them apart) is not
    converged either. An unconverged run's why, in epochs and the CLI's flags: the maps saturated (lower --lr),
    collapsed (raise lam), the loss still moving (raise --epochs), a loss that never moved (raise --lr), or too
    few epochs to tell. since: the first step of the run's last lr (`loop._lr_history`; 0: one lr throughout) — a
    run resumed at another lr is judged on the steps since, against the loss there: a loss an lr cut froze has
    not converged (against the whole run's change it would look still)."""
    steps = len(history)
    history = history[since:]
    epochs = len(history) // per_epoch if per_epoch else 0
    span = per_epoch * max(1, int(round(STATIONARITY_WINDOW * epochs)))
    live = [r for r in history if r[3] > 0]
    window = max(1, sum(1 for r in history[-span:] if r[3] > 0))
    at = f" since the lr changed at step {since}" if since else ""
    verdict = stationarity_verdict([r[1] for r in live], window, tol, live[0][0] if live else None,
                                   kind=f"minibatch loss: the share of the run's change of the loss{at} made by its "
                                        "last window of epochs (not a residual on the whole-dataset graph)")
    verdict = dataclasses.replace(verdict, iterations=steps, stationarity_window=span)   # in steps, as run
    stuck = None                                                # a still loss that is not a fixed point
    if saturated is not None and saturated > SATURATED:
        stuck = saturated_why(saturated), "lower --lr"
    elif verdict.converged and spread is not None and spread < COLLAPSED:
        stuck = collapsed_why(spread), "raise lam (the paper's is 1)"
    if stuck:
        return GdVerdict(dataclasses.replace(verdict, converged=False, kind=f"minibatch loss; {stuck[0]}"), *stuck)
    if verdict.converged:
        return GdVerdict(verdict, None, None)
    fix = "raise --epochs (--resume continues this run)"
    if verdict.stationarity is not None:
        why = (f"its last {span // per_epoch} epoch(s) still made {verdict.stationarity:.1e} of the run's change of "
               f"the loss{at} > tol {verdict.tol:.1e}")
    elif len(history) >= 2 * span:                                  # enough epochs: the loss never moved
        why, fix = (f"the loss never moved from its start{at} (within float32 rounding): lr too small to change "
                    "it"), "raise --lr"
    else:
        why = f"two epochs at least{at} are needed to tell whether the loss has settled"
    return GdVerdict(verdict, why, fix)


def gd_convergence(history: list, per_epoch: int, tol: float = STATIONARITY_TOL, saturated: float | None = None,
                   spread: float | None = None) -> Convergence:
    """`gd_verdict`'s `Convergence` alone (what summary.json writes)."""
    return gd_verdict(history, per_epoch, tol, saturated, spread).convergence


def make(settings: Settings, geom: Geometry, progress: Progress, timings: Timings, *, backbone: dict, lrs: list,
         names: list, files: list, skipped: list, ignored: list, machine: dict, folder: str,
         convergence: Convergence | None = None, layer_weights: dict | None = None) -> dict:
    """The summary. backbone: {"model", "weights", "layers"}; lrs: [[first step, lr], ...] the learning rates the
    steps ran at ("lr_history"; "lr" is the last one's, the one a run of one lr ran at throughout); names: images
    read; files: images listed; skipped: [{"file", "reason"}] unreadable; ignored: non-image files; machine:
    {"devices", "processes", "backend"}; convergence: the run's verdict (default `gd_convergence` of the
    history); layer_weights: {"rule", "weights": {layer: w}} the steps used (`step.layer_weights_record`).
    "k_intra"/"k_inter": the k capped by the finest grid's tokens in a batch (the largest any group uses);
    "k_used": each layer group's own (`Geometry.k_used`)."""
    h = progress.history
    last = [r for r in h[-progress.per_epoch:] if r[3] > 0]       # batches with no readable image say nothing
    read_now = sum(r[3] for r in h[len(h) - progress.steps_this_run:]) if progress.steps_this_run else 0
    return {
        "objective": float(np.mean([r[2] for r in last])) if last else None,
        "objective_kind": "mean over the last epoch's batches of Σ_k Σ_l w_l z_kᵀ P_l z_k after the inner steps "
                          "(batches with no readable image left out; loss likewise)",
        "loss": float(np.mean([r[1] for r in last])) if last else None,
        "eigvals_kind": GD_EIGVALS,
        "loss_kind": "paper loss" if settings.preset == "paper" else "−Σ_k c_k Σ_l w_l R_{l,k} (Brockett)",
        "convergence": (convergence or gd_convergence(h, progress.per_epoch)).as_dict(),
        "seconds": round(timings.seconds, 3), "seconds_total": round(timings.seconds_total, 3),
        "seconds_loop": round(timings.loop, 3), "compile_seconds": round(timings.compile, 3),
        "images_per_second": (round(read_now / timings.loop, 3)                 # images read, not padded slots
                              if progress.steps_this_run and timings.loop > 0 else None),
        "method": f"dataset-{settings.preset}", "preset": settings.preset, "num_eigs": settings.num_eigs,
        "steps": progress.steps, "steps_this_run": progress.steps_this_run, "resumed_from": progress.resumed_from,
        "epochs": progress.steps / progress.per_epoch, "steps_per_epoch": progress.per_epoch,
        "last_batch": "padded (masked slots)",
        "images": len(names), "images_listed": len(files), "skipped": skipped, "ignored": ignored,
        **backbone, "graph": settings.graph,
        "grid": list(geom.base), "size": list(geom.size), "batch_size": settings.batch_size,
        "inner_steps": settings.inner_steps, "lr": lrs[-1][1], "lr_history": lrs,
        "weight_decay": settings.weight_decay, "ema": settings.ema,
        "k_intra": geom.k_intra, "k_inter": geom.k_inter, "k_used": geom.k_used(settings.batch_size),
        "min_cos": settings.min_cos, "seed": settings.seed,
        "edge_weights": {"kind": settings.edge_weights, **({"sigma": "per batch, from its tokens (graphs.weight_edges)",
                                                            "sigma_pairs": SIGMA_PAIRS, "sigma_seed": settings.seed}
                                                           if settings.edge_weights == "rbf" else {})},
        "segments_asked": settings.segments, "layer_weights": layer_weights, **machine,
        "history_columns": HISTORY_COLUMNS, "history": h, "folder": folder,
    }


def make_exact(settings: Settings, geom: Geometry, res, solved, seconds: float, *, backbone: dict, names: list,
               files: list, skipped: list, ignored: list, machine: dict, folder: str, memory: dict | None = None
               ) -> dict:
    """The summary of method="exact": the whole-dataset objective Σ_k Σ_l w_l z_kᵀ P_l z_k, the eigenvalues, the
    convergence report (`Result.convergence.as_dict()`: converged, iterations, tol, max_residual, residuals [K];
    with `Result.info`'s notes, e.g. ARPACK's fallback) and where the
    seconds went (forward, graph, solve; a stage read from the cache took 0), the images whose features were read
    from OUT/checkpoints rather than computed, the memory estimate made before the run (`memory.estimate`), and
    edges: the kNN edges kept between two distinct tokens over every graph (`graphs.other_edges`; a token's own
    edge, which knn-vv keeps at cosine 1, not counted); exact_solver: which path ran (`whole.solver_path`:
    "sharded" or "gathered", what was asked, the graph cache);
    edge_weights and knn_search: how the graph was made (`whole.graph_report`: the weighting and its σ per layer;
    the search asked and used and its measured recall per layer — the sharded path: exact, recall 1); isolated:
    the fraction of the read tokens without an edge per graph (`whole.isolated`). "k_intra"/"k_inter": the k
    capped by the finest grid's tokens (the largest any group uses); "k_used": each layer group's own, capped by its
    grid's tokens (`Geometry.k_used`)."""
    from spectral_jax.dataset.whole import padded_images

    t = solved.timings
    images = padded_images(geom.num_images, geom.devices)              # the graph's images, padded slots included
    return {
        "objective": float(res.objective[0]),
        "objective_kind": ("Σ_k Σ_l w_l z_kᵀ P_l z_k over the whole-dataset graph (its optimum: the sum of the "
                           "top-K eigenvalues of Σ_l w_l sym(P_l))" if geom.grids == 1
                           else "Σ_k Σ_l w_l z_{l,k}ᵀ P_l z_{l,k}, z_{l,k} eigenvector k pooled to layer l's grid "
                           "and made unit-norm, over the whole-dataset graphs (layers on several grids: the "
                           "eigenvalues are the generalised problem A x = λ B x's, B the layers' pooling, and "
                           "need not sum to it)"),
        "eigvals": [float(v) for v in res.eigvals[0]],
        "convergence": {**res.convergence.as_dict(), **res.info}, "solver": res.method, "orth_error": res.orth_error,
        "seconds": round(seconds, 3), "seconds_forward": round(t["forward"], 3),
        "seconds_graph": round(t["graph"], 3), "seconds_solve": round(t["solve"], 3), "cached": solved.cached,
        "images_cached": solved.images_cached, "memory": memory,
        "exact_solver": {"path": solved.solver, "asked": settings.exact_solver, "graph_cache": (
            "OUT/checkpoints/graph-rows, each process's own rows of the graph (a --resume with the same process "
            "count reads them back)" if solved.solver == "sharded" else "OUT/checkpoints/graph.npz, the whole graph")},
        "method": "dataset-exact", "num_eigs": settings.num_eigs, "steps": int(res.steps),
        "images": len(names), "images_listed": len(files), "skipped": skipped, "ignored": ignored,
        **backbone, "graph": settings.graph, "grid": list(geom.base), "size": list(geom.size),
        "batch_size": settings.batch_size, "k_intra": geom.k_intra, "k_inter": geom.k_inter,
        "k_used": geom.k_used(images), "min_cos": settings.min_cos, "edges": solved.edges,
        "features_dtype": settings.features_dtype, "maxiter": settings.maxiter, "tol": settings.tol,
        "seed": settings.seed,
        "segments_asked": settings.segments, "layer_weights": solved.layer_weights, **machine, "folder": folder,
        "edge_weights": {"kind": settings.edge_weights},       # a graph cached before the record existed
        "knn_search": {"asked": settings.search, "used": "exact", "recall_min": 1.0}, **(solved.graph_info or {}),
    }


__all__ = ["GD_EIGVALS", "GdVerdict", "HISTORY_COLUMNS", "Progress", "Timings", "gd_convergence", "gd_verdict", "make",
           "make_exact"]
