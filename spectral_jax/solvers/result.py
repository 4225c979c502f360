"""`Result`: what every solver returns, and the RESULT.npz file of docs/design.md.

Shape legend
    B  images    K  eigenvectors    (H0, W0)  base grid    G  graphs (all groups, flattened, in order)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spectral_jax.errors import InputError
from spectral_jax.files import save_npz
from spectral_jax.graphs import Graph
from spectral_jax.objective import VANISH, from_nodes, normalised_weights, rayleigh, to_nodes


@dataclasses.dataclass(frozen=True, eq=False)
class Provenance:
    """What a `Result` was solved on, for its consumers to check (`pipeline.attribution` refuses a result of
    another graph kind, other layers or other timesteps).

    graph: the graph kind ("qk", "vv", "knn-qk", "knn-vv"); layers: the tapped layers it was solved on, ascending;
    layer_weights `[B, L]` float64: each image's weight per layer (in `layers` order, summing to 1, as
    `layer_weights.for_groups` gives them; when none were given, every graph weighs the same, so each layer's
    share of the graphs — 1/L for layers with as many heads), or None where the solve took
    per-graph `weights=` (no one weight per layer); timesteps: the diffusion timesteps folded into the heads axis
    (`Taps.timesteps`; () for none); graph_options: the options the graph kind reads (`GraphSpec.reads`: tau for
    vv, k_intra/k_inter/min_cos for kNN, graph_dtype), None where unknown (a file written before they were
    recorded) — a dataset run's the same keys (k as asked, the default 50 filled in, each capped by the tokens
    available as `graphs.knn` caps it; graph_dtype its features dtype), plus "edge_weights" where its edges are not
    the cosine a `GraphSpec` graph has (a graph no `GraphSpec` builds, so `pipeline.attribution` refuses it);
    graph_record: how the graph was built beyond graph_options, JSON-ready — a dataset run's (`dataset.run`,
    method exact) "k_used" (each layer group's k after the caps: grid, layers, k_intra, k_inter), "edge_weights"
    (kind; σ per graph for rbf) and "knn_search" (asked, used, recall per graph), as its summary.json records
    them — None where there is nothing more (a solve of taps). A `Result` whose `provenance` is None has unknown
    provenance: solved on a list of graphs (no layers), or read from a file written without it.
    """

    graph: str
    layers: tuple[int, ...]
    layer_weights: np.ndarray | None = None
    timesteps: tuple[int, ...] = ()
    graph_options: dict | None = None
    graph_record: dict | None = None

    def __post_init__(self):
        object.__setattr__(self, "graph", str(self.graph))
        object.__setattr__(self, "layers", tuple(int(l) for l in self.layers))
        object.__setattr__(self, "timesteps", tuple(int(t) for t in self.timesteps))
        for name in ("graph_options", "graph_record"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, json.loads(json.dumps(dict(getattr(self, name)))))
        if self.layer_weights is not None:
            w = np.asarray(self.layer_weights, np.float64)
            if w.ndim != 2 or w.shape[1] != len(self.layers):
                raise ValueError(f"layer_weights {w.shape} must be [B, {len(self.layers)}] (one per layer)")
            object.__setattr__(self, "layer_weights", w)

    def rows(self, sl) -> "Provenance":
        """The same provenance for the images `sl` (a slice or indices) of its `[B, L]` layer weights."""
        w = None if self.layer_weights is None else self.layer_weights[sl]
        return Provenance(self.graph, self.layers, w, self.timesteps, self.graph_options, self.graph_record)

    def same_source(self, other: "Provenance | None") -> bool:
        """Whether `other` was solved on the same graph kind, layers, timesteps, graph options and graph record
        (the weights may differ)."""
        return other is not None and (self.graph, self.layers, self.timesteps, self.graph_options,
                                      self.graph_record) == \
            (other.graph, other.layers, other.timesteps, other.graph_options, other.graph_record)

    def as_dict(self) -> dict:
        """graph, layers, timesteps, graph_options and (where there is one) graph_record as JSON values (the
        summary's "provenance"; the layer weights are the summary's "layer_weights", in `layers` order)."""
        return {"graph": self.graph, "layers": list(self.layers), "timesteps": list(self.timesteps),
                "graph_options": self.graph_options,
                **({} if self.graph_record is None else {"graph_record": self.graph_record})}

    @classmethod
    def from_dict(cls, d: dict, layer_weights=None) -> "Provenance":
        """`as_dict`'s record back, with layer_weights `[B, L]` (or None) beside it."""
        return cls(d["graph"], d["layers"], layer_weights, d.get("timesteps", ()), d.get("graph_options"),
                   d.get("graph_record"))


@dataclasses.dataclass(frozen=True)
class Convergence:
    """How well a solve converged — every solver's verdict in one typed record.

    converged: the verdict, `criterion` held; criterion: what was tested ("max_residual <= tol": every Ritz pair's
    relative residual at most `tol` — exact, gd's eigen preset; "stationarity <= tol": the share of the run's
    change of its loss made by its last window of steps at most `tol` — gd's paper preset, the dataset's minibatch
    gd; "direct dense eigensolver": exact's dense path, a direct solve with no iteration, converged by construction,
    whose residuals are float32 rounding and are reported, not tested); iterations: the eigensolver's iterations (exact: LOBPCG's; ARPACK's operator applications; 0 dense) or the
    optimiser's steps (gd); tol: the threshold; max_residual and residuals `[K]`: the Ritz pairs' relative residuals
    ‖A x − λ B x‖ / (‖A x‖ + |λ| ‖B x‖), where the solver computes them (None / () where it does not: the dataset's
    minibatch gd); stationarity and stationarity_window: the series' stationarity (`solvers.gd.stationarity`; None
    before two windows) and its window in steps, where the solver measures it (None otherwise); kind: a sentence on
    what the verdict is about where it is not a residual; per_image: each image's own record where several images
    were solved one by one (then the fields above aggregate them: converged all, iterations and max_residual the
    largest), else ().

    `as_dict()` is the JSON form that summary.json and the CLI print (the keys above that apply, without
    per_image); `Convergence.from_dict` reads it back.
    """

    converged: bool
    iterations: int
    tol: float
    criterion: str = "max_residual <= tol"
    max_residual: float | None = None
    residuals: tuple[float, ...] = ()
    stationarity: float | None = None
    stationarity_window: int | None = None
    kind: str | None = None
    per_image: tuple["Convergence", ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "converged", bool(self.converged))
        object.__setattr__(self, "iterations", int(self.iterations))
        object.__setattr__(self, "tol", float(self.tol))
        object.__setattr__(self, "residuals", tuple(float(r) for r in self.residuals))
        object.__setattr__(self, "per_image", tuple(self.per_image))
        if self.max_residual is not None:
            object.__setattr__(self, "max_residual", float(self.max_residual))
        if self.stationarity is not None:
            object.__setattr__(self, "stationarity", float(self.stationarity))
        if self.stationarity_window is not None:
            object.__setattr__(self, "stationarity_window", int(self.stationarity_window))

    KEYS = ("converged", "criterion", "iterations", "tol", "max_residual", "residuals", "stationarity",
            "stationarity_window", "kind")

    def as_dict(self) -> dict[str, Any]:
        """The JSON form: converged, criterion, iterations, tol; max_residual and residuals where computed (an
        aggregate of several images has max_residual only);
        stationarity and stationarity_window where measured; kind where given."""
        out = {"converged": self.converged, "criterion": self.criterion, "iterations": self.iterations,
               "tol": self.tol}
        if self.max_residual is not None:
            out["max_residual"] = self.max_residual
        if self.residuals:
            out["residuals"] = list(self.residuals)
        if self.stationarity_window is not None:
            out.update(stationarity=self.stationarity, stationarity_window=self.stationarity_window)
        if self.kind is not None:
            out["kind"] = self.kind
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "Convergence":
        """The record of `as_dict`'s form (unknown keys ignored; a dict without "criterion", as summaries written
        before it was reported, is a residual verdict)."""
        if not isinstance(d["converged"], bool):        # "false" is not False: bool("false") would claim it
            raise ValueError(f"converged is {d['converged']!r}, not true or false")
        return cls(d["converged"], d["iterations"], d["tol"], d.get("criterion", "max_residual <= tol"),
                   d.get("max_residual"), tuple(d.get("residuals", ())), d.get("stationarity"),
                   d.get("stationarity_window"), d.get("kind"))

    @classmethod
    def combine(cls, parts: Sequence["Convergence"]) -> "Convergence":
        """The record of several images solved one by one: converged if all did, the largest iterations and
        max_residual, the first's tol and criterion, each image's own record in `per_image`."""
        first = parts[0]
        res = [p.max_residual for p in parts]
        return cls(all(p.converged for p in parts), max(p.iterations for p in parts), first.tol, first.criterion,
                   None if any(r is None for r in res) else max(res), kind=first.kind, per_image=tuple(parts))

    def image(self, b: int) -> "Convergence":
        """Image b's own record (this one where there is no per-image record)."""
        return self.per_image[b] if self.per_image else self


@dataclasses.dataclass(frozen=True, eq=False)
class Result:
    """Pseudo-eigenvectors of B images and their diagnostics, sorted by eigenvalue, largest first. Every per-image
    field has a leading B axis whatever B is, and whether the images were solved one by one (qk/vv graphs) or
    jointly (kNN graphs over all of them: `joint`, then the per-image rows of eigvals/rq/history/objective are the
    one joint solve's, repeated).

    eigvecs `[B, K, H0, W0]` float32 (orthonormal over the base nodes of a solve — H0·W0 for one image, B·H0·W0 for
    a joint solve — for a single grid; B-orthonormal for the multi-grid exact solve); eigvals `[B, K]` (exact
    eigenvalues, or Ritz values for `gd`); rq `[B, G, K]` per-graph Rayleigh quotients; objective `[B]`
    = Σ_k Σ_l w_l R_{l,k}; history `[B, S]` (objective or loss per gd step; S = 0 for exact); orth_error = max over
    the solves of max |XᵀX − I|; steps; seconds (all solves); method; info: the solver's other diagnostics
    (compile seconds, layer weights used, timings, ...; for several per-image solves each image's own under
    `info["per_image"]`); provenance: what it was solved on (`Provenance`: graph kind, layers, layer weights,
    timesteps), None where unknown; convergence: the solver's verdict (`Convergence`; for several per-image
    solves the aggregate — converged all, iterations and max_residual the largest — with each image's own in
    `convergence.per_image`; None for a solver that gives none). `result.image(b)` is image b as a B = 1
    `Result`, `result.select(idx)` the images idx; `Result.load` reads a RESULT.npz back.

    Frozen: a field is never reassigned (`dataclasses.replace` makes a changed copy), and the arrays are never
    written in place by the library.
    """

    eigvecs: np.ndarray
    eigvals: np.ndarray
    rq: np.ndarray
    objective: np.ndarray
    orth_error: float
    steps: int
    seconds: float
    method: str
    history: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((1, 0), np.float32))
    info: dict = dataclasses.field(default_factory=dict)
    joint: bool = False
    provenance: Provenance | None = None
    convergence: Convergence | None = None

    def __post_init__(self):
        b = self.eigvecs.shape[0]
        put = lambda name, v: object.__setattr__(self, name, v)
        put("eigvals", np.asarray(self.eigvals, np.float32).reshape(b, -1))
        put("rq", np.asarray(self.rq, np.float32).reshape(b, -1, self.eigvecs.shape[1]))
        put("objective", np.asarray(self.objective, np.float64).reshape(b))
        put("history", np.asarray(self.history, np.float32).reshape(b, -1))
        c = self.convergence
        if c is not None and c.per_image and len(c.per_image) != b:
            raise ValueError(f"convergence has records of {len(c.per_image)} images for {b}")
        p = self.provenance
        if p is not None and p.layer_weights is not None and p.layer_weights.shape[0] != b:
            raise ValueError(f"provenance has layer weights of {p.layer_weights.shape[0]} images for {b}")

    @property
    def num_eigs(self) -> int:
        return int(self.eigvecs.shape[1])

    @property
    def num_images(self) -> int:
        return int(self.eigvecs.shape[0])

    def __len__(self) -> int:
        return self.num_images

    def image(self, b: int) -> "Result":
        """Image b as a B = 1 `Result` (its own diagnostics where the images were solved one by one). Its `seconds`
        are still those of all B images' solves, which are not timed one by one: info["seconds_images"] = B says
        so, and info["image_index"] = b which image it was (B > 1) — of the solve, for a result of `select`
        (its info["image_indices"])."""
        if not -self.num_images <= b < self.num_images:
            raise IndexError(f"image {b} out of range for {self.num_images} images")
        b %= self.num_images
        info = dict(self.info)
        per = info.pop("per_image", None)
        if per is not None:
            info.update(per[b])
        picked = info.pop("image_indices", None)
        if self.num_images > 1:         # `seconds` stays the solve of all the images (its part is not measured)
            info["seconds_images"] = self.num_images
        if self.num_images > 1 or picked is not None:   # which of them it is (`pipeline.attribution` checks it)
            info["image_index"] = int(picked[b]) if picked is not None else b
        prov = None if self.provenance is None else self.provenance.rows(slice(b, b + 1))
        conv = None if self.convergence is None else self.convergence.image(b)
        return Result(self.eigvecs[b:b + 1], self.eigvals[b:b + 1], self.rq[b:b + 1], self.objective[b:b + 1],
                      self.orth_error, self.steps, self.seconds, self.method, self.history[b:b + 1], info,
                      self.joint, prov, conv)

    def select(self, idx) -> "Result":
        """The images `idx` (indices or a boolean mask `[B]`) as a `Result` of that many images, each with its own
        per-image info, convergence record and layer weights (a joint solve's shared values as they are); selecting
        no image is an `InputError`. info["image_indices"] says which images of the solve they are (composed
        through earlier selections; one image's: info["image_index"]), so that `pipeline.attribution` never reads a
        reordered or partial result as the taps' images in order."""
        idx = np.arange(self.num_images)[np.asarray(idx)].reshape(-1) if np.size(idx) else idx
        if not np.size(idx):
            raise InputError("idx", "selects no image (a Result holds at least one)", "select one image or more")
        info = dict(self.info)
        if "per_image" in info:
            info["per_image"] = [info["per_image"][i] for i in idx]
        base = info.pop("image_indices", None)
        if base is None:
            base = [info.pop("image_index", 0)] if self.num_images == 1 else range(self.num_images)
        info.pop("image_index", None)
        picked = [int(base[i]) for i in idx]
        if len(picked) == 1:
            info["image_index"] = picked[0]
        else:
            info["image_indices"] = picked
        conv = self.convergence
        if conv is not None and conv.per_image:
            conv = Convergence.combine([conv.per_image[i] for i in idx])
        prov = None if self.provenance is None else self.provenance.rows(idx)
        return dataclasses.replace(self, eigvecs=self.eigvecs[idx], eigvals=self.eigvals[idx], rq=self.rq[idx],
                                   objective=self.objective[idx], history=self.history[idx], info=info,
                                   provenance=prov, convergence=conv)

    def summary(self) -> dict[str, Any]:
        """The JSON summary: objective (image 0's / the joint solve's; with several per-image solves their mean,
        each under `objective_per_image`), seconds, method, num_eigs, steps, eigvals (image 0's / the joint ones),
        provenance where known (`Provenance.as_dict`: graph, layers — the order of info's layer_weights —,
        timesteps, graph_options),
        the convergence record's keys (`Convergence.as_dict`: converged, iterations, tol, max_residual, ...; with
        several per-image solves the aggregate, each image's own in its `per_image` entry) and the solver's other
        diagnostics (`info`)."""
        shared = self.joint or self.num_images == 1
        out = {"objective": float(self.objective[0] if shared else self.objective.mean()),
               "seconds": round(float(self.seconds), 4), "method": self.method, "num_eigs": self.num_eigs,
               "steps": int(self.steps), "orth_error": float(self.orth_error),
               "eigvals": [round(float(v), 6) for v in self.eigvals[0]],
               "grid": list(self.eigvecs.shape[-2:]), "num_images": self.num_images, "joint": self.joint}
        if not shared:
            out["objective_per_image"] = [float(o) for o in self.objective]
        if self.provenance is not None:
            out["provenance"] = self.provenance.as_dict()
        info = _jsonable(self.info)
        c = self.convergence
        if c is not None:
            out.update(c.as_dict())
            if c.per_image:
                rest = info.get("per_image") or [{} for _ in c.per_image]
                info["per_image"] = [{**p.as_dict(), **r} for p, r in zip(c.per_image, rest)]
        return {**out, **info}

    def save(self, path: str, inputs=()) -> str:
        """Write RESULT.npz exactly at `path`, atomically, never over one of `inputs`; returns the path.

        Arrays (DESIGN.md's contract): eigvecs `[B, K, H0, W0]`, eigvals `[K]`, rq `[G, K]`, history `[S]` where
        the images have one solve's values — one image, or a joint solve (its rows repeat one solve's) — and, where
        B > 1 images were solved one by one (which the contract's one `[K]` cannot hold), the image axis in front:
        eigvals `[B, K]`, rq `[B, G, K]`, history `[B, S]`; summary (JSON). With a known provenance, extra members
        that readers of the contract ignore: `provenance/graph` (str), `provenance/layers` int64 `[L]`,
        `provenance/timesteps` int64 `[T]`, `provenance/graph_options` and `provenance/graph_record` (JSON str,
        where known) and, where there is one weight per layer, `provenance/layer_weights` float64 (`[L]` or
        `[B, L]`, as eigvals). `load` reads both layouts."""
        one = self.num_images == 1 or (self.joint and all(
            np.array_equal(a[:1].repeat(len(a), 0), a, equal_nan=True) for a in (self.eigvals, self.rq, self.history)))
        row = (lambda a: np.asarray(a)[0]) if one else np.asarray
        arrays = dict(eigvecs=np.asarray(self.eigvecs, np.float32), eigvals=row(self.eigvals), rq=row(self.rq),
                      history=row(self.history), summary=np.array(json.dumps(self.summary())))
        p = self.provenance
        if p is not None:
            arrays.update({"provenance/graph": np.array(p.graph),
                           "provenance/layers": np.asarray(p.layers, np.int64).reshape(-1),
                           "provenance/timesteps": np.asarray(p.timesteps, np.int64).reshape(-1)})
            for name in ("graph_options", "graph_record"):
                if getattr(p, name) is not None:
                    arrays[f"provenance/{name}"] = np.array(json.dumps(getattr(p, name), sort_keys=True))
            if p.layer_weights is not None:
                w = p.layer_weights
                arrays["provenance/layer_weights"] = w[0] if one and np.array_equal(w[:1].repeat(len(w), 0), w) else w
        return save_npz(path, arrays, inputs)

    @classmethod
    def load(cls, path: str) -> "Result":
        """Read a RESULT.npz written by `save` back into a `Result` (diagnostics from its summary, the rest of the
        summary as `info`, the convergence keys as `convergence`). Files written before the image axis was always
        kept (eigvals `[K]`, rq `[G, K]`, history `[S]`, provenance/layer_weights `[L]` for one image or a joint
        solve) read the same: an array one axis short is that one solve's, repeated per image. A file without the
        `provenance/*` members (written before they were) reads with `provenance` None: unknown. Anything that
        does not hold the contract's arrays — eigvecs a finite `[B, K, h, w]`, eigvals `[K]`/`[B, K]`, rq
        `[G, K]`/`[B, G, K]`, history `[S]`/`[B, S]`, "converged" true or false — is an `InputError` naming the
        file (an array of the right size in another layout is never reshaped into place), as is a member whose
        header claims more than its
        bytes hold (`acts.check_npz_headers`); pickles are refused."""
        fix = "pass a RESULT.npz written by `spectral-jax solve` or Result.save"
        if not os.path.isfile(path):
            raise InputError(path, "is a folder, not a RESULT .npz file" if os.path.isdir(path) else "no such file",
                             fix)
        from spectral_jax.acts import read_npz

        data = read_npz(path, "RESULT .npz file", fix)      # each member's header checked before it is read
        missing = [k for k in ("eigvecs", "eigvals", "rq", "summary") if k not in data]
        if missing:
            raise InputError(path, f"lacks {', '.join(missing)} (not a RESULT file)", fix)
        x, rq = np.asarray(data["eigvecs"]), np.asarray(data["rq"])
        if x.ndim != 4 or not np.issubdtype(x.dtype, np.floating) or 0 in x.shape[:2]:
            raise InputError(path, f"eigvecs must be a floating [B, K, h, w] array, got {x.dtype} {x.shape}", fix)
        if not np.isfinite(x).all():
            raise InputError(path, "eigvecs hold NaN or Inf", "solve again (a solver never writes them)")
        if rq.ndim not in (2, 3) or rq.shape[-1] != x.shape[1] or (rq.ndim == 3 and rq.shape[0] != x.shape[0]):
            raise InputError(path, f"rq {rq.shape} is not [G, K] or [B, G, K] for eigvecs {x.shape}", fix)
        ev, hist = np.shape(data["eigvals"]), np.shape(data.get("history", np.zeros((x.shape[0], 0))))
        if ev not in ((x.shape[1],), x.shape[:2]):              # never reshaped into place: its order would mix
            raise InputError(path, f"eigvals {ev} are not [K] or [B, K] for eigvecs {x.shape}", fix)
        if len(hist) not in (1, 2) or (len(hist) == 2 and hist[0] != x.shape[0]):
            raise InputError(path, f"history {hist} is not [S] or [B, S] for eigvecs {x.shape}", fix)
        try:
            summary = json.loads(str(data["summary"].item()))
            x = np.asarray(data["eigvecs"], np.float32)
            b, k = x.shape[:2]
            joint = bool(summary.get("joint", False))

            def axis(a, ndim):          # the image axis, repeated where an old-layout file left it out
                a = np.asarray(a)
                return np.broadcast_to(a, (b, *a.shape)).copy() if a.ndim == ndim - 1 else a

            objective = summary.get("objective_per_image", [summary["objective"]] * b)
            history = data.get("history", np.zeros((b, 0), np.float32))
            info = {key: v for key, v in summary.items() if key not in _SUMMARY_KEYS + Convergence.KEYS}
            conv = None
            if "converged" in summary:
                per = info.get("per_image")
                if per and all(isinstance(d, dict) and "converged" in d for d in per):
                    conv = dataclasses.replace(Convergence.from_dict(summary),
                                               per_image=tuple(Convergence.from_dict(d) for d in per))
                    info["per_image"] = [{k: v for k, v in d.items() if k not in Convergence.KEYS} for d in per]
                else:
                    conv = Convergence.from_dict(summary)
            prov = None
            if "provenance/graph" in data:
                w = data.get("provenance/layer_weights")
                opts, rec = data.get("provenance/graph_options"), data.get("provenance/graph_record")
                prov = Provenance(str(data["provenance/graph"].item()), data["provenance/layers"].reshape(-1).tolist(),
                                  None if w is None else axis(np.asarray(w, np.float64), 2),
                                  data["provenance/timesteps"].reshape(-1).tolist(),
                                  None if opts is None else json.loads(str(opts.item())),
                                  None if rec is None else json.loads(str(rec.item())))
            res = cls(x, axis(data["eigvals"], 2), axis(data["rq"], 3), objective, float(summary["orth_error"]),
                      int(summary["steps"]), float(summary["seconds"]), str(summary["method"]), axis(history, 2),
                      info, joint, prov, conv)
        except (KeyError, ValueError, TypeError, AttributeError) as e:
            raise InputError(path, f"does not hold a RESULT's arrays and summary ({type(e).__name__}: {e})",
                             fix) from None
        if x.ndim != 4 or res.eigvals.shape != (b, k):
            raise InputError(path, f"eigvecs {x.shape} and eigvals {np.shape(data['eigvals'])} disagree", fix)
        return res


_SUMMARY_KEYS = ("objective", "seconds", "method", "num_eigs", "steps", "orth_error", "eigvals", "grid",
                 "num_images", "joint", "objective_per_image", "provenance")   # `Result.summary`'s; the rest: info


def stack(parts: Sequence[Result]) -> Result:
    """Per-image results (each B = 1, same grid, K, graph count and history length) → one `Result` of
    B = len(parts) images: arrays concatenated, each image's info under `info["per_image"]`, the convergence
    records combined (`Convergence.combine`; None unless every part has one: never claimed), the provenance
    stacked (`_stack_provenance`). Parts of different shapes — history lengths included (gd runs of different
    step counts) — are a ValueError: nothing is dropped or padded."""
    if len(parts) == 1:
        return parts[0]
    shapes = {(p.eigvecs.shape[1:], p.rq.shape[1:], p.history.shape[1:]) for p in parts}
    if len(shapes) > 1 or any(p.num_images != 1 for p in parts):
        raise ValueError("stack needs one-image results of one grid, K, graph count and history length, got "
                         + ", ".join(f"{p.num_images} image(s) {p.eigvecs.shape[1:]} rq {p.rq.shape[1:]} "
                                     f"history {p.history.shape[1:]}" for p in parts))
    convs = [p.convergence for p in parts]
    conv = None if any(c is None for c in convs) else Convergence.combine(convs)
    return Result(np.concatenate([p.eigvecs for p in parts]), np.concatenate([p.eigvals for p in parts]),
                  np.concatenate([p.rq for p in parts]), np.concatenate([p.objective for p in parts]),
                  max(p.orth_error for p in parts), parts[0].steps, sum(p.seconds for p in parts), parts[0].method,
                  np.concatenate([p.history for p in parts]), {"per_image": [dict(p.info) for p in parts]}, False,
                  _stack_provenance([p.provenance for p in parts]), conv)


def _stack_provenance(provs: Sequence[Provenance | None]) -> Provenance | None:
    """The provenance of stacked per-image results: theirs with the layer weights stacked `[B, L]`; None (unknown)
    unless every part was solved on the same graph kind, layers and timesteps."""
    first = provs[0]
    if first is None or not all(first.same_source(p) for p in provs):
        return None
    ws = [p.layer_weights for p in provs]
    return Provenance(first.graph, first.layers, None if any(w is None for w in ws) else np.concatenate(ws),
                      first.timesteps, first.graph_options, first.graph_record)


def _jsonable(info: dict) -> dict:
    """info with numpy scalars/arrays as Python numbers/lists (for the JSON summary)."""
    def conv(v):
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, np.ndarray):
            return v.tolist()
        if isinstance(v, np.generic):
            return v.item()
        return v

    return conv(info)


# diagnostics: one compiled pass, graph by graph; a column that pools to rounding noise scores 0 (`objective.VANISH`)
_rayleigh = jax.jit(functools.partial(rayleigh, sequential=True, vanish=VANISH))


def signs(v: np.ndarray) -> np.ndarray:
    """The deterministic sign `[K]` (±1) of each column of `v` `[M, K]`: the sum is positive, or if ~0 the largest
    entry is."""
    s = v.sum(axis=0)
    big = v[np.abs(v).argmax(axis=0), np.arange(v.shape[1])]
    sign = np.where(np.abs(s) > 1e-6 * np.sqrt(v.shape[0]), np.sign(s), np.sign(big))
    return np.where(sign == 0, 1.0, sign)


def fix_signs(v: np.ndarray) -> np.ndarray:
    """`v` `[M, K]` with each column's deterministic sign (`signs`)."""
    return v * signs(v)


def quotients(graphs: Sequence[Graph], weights, vecs, num_images: int, base: tuple[int, int], metric=None):
    """The device half of `finish`, dispatched without waiting: (per-group R `[*S, K]` list, objective, B·vecs
    `[M0, K]` or None) for base-grid node vectors `[M0, K]` in any order and sign (R, the objective and |XᵀBX − I|
    do not depend on either; B·X changes sign with X, exactly)."""
    v = jnp.asarray(vecs, jnp.float32)
    rqs, obj = _rayleigh(list(graphs), from_nodes(v, num_images, base), list(normalised_weights(graphs, weights)))
    return rqs, obj, (None if metric is None else metric(v))


def assemble(vecs: np.ndarray, eigvals: np.ndarray, rqs, obj, bv, num_images: int, base: tuple[int, int], *,
             steps: int, seconds: float, method: str, history=None, info=None,
             convergence: Convergence | None = None) -> Result:
    """The host half of `finish`: a `Result` from host arrays — vecs `[M0, K]` sorted largest first, eigvals `[K]`,
    `quotients`' output for the same vecs (rqs, obj, bv) — after fixing each vector's sign (`signs`)."""
    vecs = np.asarray(vecs, np.float64)
    sign = signs(vecs)
    vecs = (vecs * sign).astype(np.float32)
    k = vecs.shape[1]
    rq = np.concatenate([np.asarray(r).reshape(-1, k) for r in rqs], axis=0)
    bv = vecs if bv is None else np.asarray(bv) * sign.astype(np.float32)
    gram = vecs.T.astype(np.float64) @ bv
    orth = float(np.abs(gram - np.eye(k)).max())
    nimg = int(num_images)
    x = np.ascontiguousarray(vecs.reshape(nimg, base[0], base[1], k).transpose(0, 3, 1, 2))   # `from_nodes`
    rep = lambda a: np.broadcast_to(np.asarray(a), (nimg, *np.shape(a))).copy()   # one solve's value per image
    return Result(x, rep(np.asarray(eigvals, np.float32)), rep(rq), rep(float(obj)), orth, int(steps),
                  float(seconds), method, rep(np.asarray(history if history is not None else [], np.float32)),
                  dict(info or {}), joint=nimg > 1, convergence=convergence)


def finish(graphs: Sequence[Graph], weights, vecs, eigvals, num_images: int, base: tuple[int, int], *, steps: int,
           seconds: float, method: str, history=None, info=None, metric=None,
           convergence: Convergence | None = None) -> Result:
    """Build a `Result` from base-grid node vectors `[M0, K]` (host or device) sorted largest first: signs, rq,
    objective — the quotients on the device (`quotients`), then one transfer and the rest on the host (`assemble`).

    `metric`: the operator B in which the vectors are orthonormal (None: the identity); orth_error = max|XᵀBX − I|.
    """
    dev = quotients(graphs, weights, vecs, num_images, base, metric)
    vecs, eigvals, (rqs, obj, bv) = jax.device_get((vecs, eigvals, dev))
    return assemble(vecs, eigvals, rqs, obj, bv, num_images, base, steps=steps, seconds=seconds, method=method,
                    history=history, info=info, convergence=convergence)


__all__ = ["Convergence", "Provenance", "Result", "assemble", "finish", "fix_signs", "quotients", "signs", "stack", "to_nodes"]
