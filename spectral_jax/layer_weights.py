"""Per-layer weights for graph groups: explicit numbers, or an unsupervised rule read from the graphs alone.

Sits between `graphs` and `solvers` in the data flow: it names which layer each graph of a group belongs to, takes
subsets of layers out of groups, and turns one weight per layer into the per-group arrays `[*S]` that the solvers
take (`solvers.exact.exact(graphs, K, weights=...)`, `solvers.gd.gd`). A layer's weight multiplies each of its graphs
(every head, every timestep), so uniform layer weights are the solvers' default (every graph equal).

Rules (`RULES`), all from each layer's own graphs, no labels, no per-dataset constant:
- "uniform": every layer 1.
- "eigengap": w_l ∝ g_l², g_l = (λ_2 − λ_K) / λ_2 of layer l's own top-K spectrum (`layer_spectra`: the exact
  top-K eigenvalues of mean_heads sym(P_l), largest first, λ_1 the near-trivial one). A graph that encodes layout
  (attention to a neighbourhood, a smooth lattice) has a slowly decaying spectrum — many eigenvalues near λ_2 — and
  gets g near 0; one that separates a few groups has a handful of large eigenvalues and then a drop, g near 1.
  Squaring sharpens the contrast without a tuned temperature.
- "select": all weight on the layer with the largest s_l = g_l · a_l (ties share it), a_l the agreement of the
  layer's heads (`head_agreement`: mean cosine between the heads' centred sym(P_h), 1 for a one-graph layer such as
  a kNN layer). A layer whose spectrum drops (g) *and* whose heads say the same thing (a) carries one grouping of
  the image; a low-level layer can have a large gap (colour clusters) but its heads disagree. A sum of graphs is
  dominated by the slowly decaying layout graphs (every smooth vector scores high in them), so a soft weighting
  can only dilute the best layer; selecting is how a rule can match it.
All are invariant to scaling any layer's graphs (ratios of one layer's eigenvalues; cosines) or all weights, and
deterministic (dense LAPACK and exact inner products). Cost: one exact top-K solve per layer (for the single-image
graphs, N ≈ 1,400 nodes, about a joint solve per layer — `sweep` and `attribution` reuse the same solves), and for
"select" the heads' dense graphs once (H·N² floats per layer; H² inner products of N² terms). For dataset kNN
graphs (one graph per layer): one sparse LOBPCG per layer, no head term.

Shape legend
    L  tapped layers    S  a group's batch dims (layers × heads [× timesteps folded into heads])    K  eigenvectors
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spectral_jax.analysis.layerwise import eigengap
from spectral_jax.errors import InputError, is_integer

RULES = ("uniform", "eigengap", "select")


def take_layers(group, positions: Sequence[int]):
    """The graphs of `group` (batch dims `[m, ...]`, first axis = its layers) at first-axis `positions`."""
    pos = np.asarray(positions, np.int32)
    leaves = jax.tree.map(lambda x: x[pos], group)
    return dataclasses.replace(leaves, batch_shape=(len(pos), *group.batch_shape[1:]))


def subset(graphs: Sequence, group_layers: Sequence[Sequence[int]], layers: Sequence[int]):
    """(graphs, group_layers) restricted to `layers`: groups without any of them are dropped. group_layers[i] lists
    the layer of each index of group i's first batch axis (`graphs.group_layers`)."""
    want = {int(i) for i in layers}
    out, kept = [], []
    for g, ls in zip(graphs, group_layers):
        pos = [j for j, l in enumerate(ls) if l in want]
        if pos:
            out.append(g if len(pos) == len(ls) else take_layers(g, pos))
            kept.append(tuple(ls[j] for j in pos))
    missing = want - {l for ls in kept for l in ls}
    if missing:
        raise InputError(f"layers {sorted(missing)}", "are not among the tapped layers",
                         f"choose from {sorted(l for ls in group_layers for l in ls)}")
    return out, kept


def parse(spec, layers: Sequence[int], what: str = "layer_weights"):
    """A rule name (str in `RULES`), or numbers: a sequence (one per entry of `layers`, in order), a mapping
    layer → weight (missing layers 0) or a comma-separated string. Returns the rule name or float64 `[L]`.
    Numbers must be finite, ≥ 0 and not all 0."""
    layers = [int(l) for l in layers]
    if isinstance(spec, str):
        if spec.strip().lower() in RULES:
            return spec.strip().lower()
        try:
            spec = [float(s) for s in spec.split(",") if s.strip()]
        except ValueError:
            raise InputError(f"{what} {spec!r}", "is not a rule or comma-separated numbers",
                             f"pass one of {', '.join(RULES)} or one number per layer, e.g. 0,0,1") from None
    if isinstance(spec, Mapping):
        if not all(is_integer(k) for k in spec):
            raise InputError(f"{what} {dict(spec)!r}", "has keys that are not layer indices",
                             "map integer layers to weights, e.g. {11: 1.0, 10: 0.5}")
        bad = [k for k in spec if int(k) not in layers]
        if bad:
            raise InputError(f"{what} {dict(spec)!r}", f"names layers {bad} that are not tapped",
                             f"use layers among {layers}")
        spec = [spec.get(l, 0.0) for l in layers]
    try:
        items = np.asarray(spec, object)
        if items.ndim > 1 or any(isinstance(x, (bool, np.bool_, str, bytes)) for x in items.reshape(-1)):
            raise TypeError
        w = np.asarray(spec, np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise InputError(f"{what} {spec!r}", "is not a rule name or a list of numbers",
                         f"pass one of {', '.join(RULES)} or one number per layer") from None
    if w.size != len(layers):
        raise InputError(f"{what} ({w.size} numbers)", f"need one per tapped layer ({len(layers)}: {layers})",
                         f"pass {len(layers)} numbers, or a rule: {', '.join(RULES)}")
    if not np.all(np.isfinite(w)) or (w < 0).any() or not w.max() > 0:
        raise InputError(f"{what} {w.tolist()}", "must be finite, ≥ 0 and not all 0", "pass e.g. 1 for every layer")
    return w


def rule_weights(rule: str, spectra, agreement=None) -> np.ndarray:
    """Per-layer weights `[L]` (summing to 1) of `rule` from each layer's own top-K spectrum `[L, K]` and, for
    "select", its heads' agreement `[L]` (None: 1 for every layer)."""
    if rule not in RULES:
        raise InputError(f"rule {rule!r}", "unknown layer-weight rule", f"choose one of {', '.join(RULES)}")
    s = np.asarray(spectra, np.float64)
    g = eigengap(s)
    if rule == "uniform":
        w = np.ones(s.shape[0])
    elif rule == "eigengap":
        w = g ** 2
    else:
        a = np.ones(s.shape[0]) if agreement is None else np.clip(np.asarray(agreement, np.float64), 0.0, 1.0)
        score = g * a
        w = (score >= score.max() * (1 - 1e-9)).astype(np.float64) if score.max() > 0 else np.zeros_like(score)
    if not w.sum() > 0:          # no layer shows any decay (degenerate graphs): fall back to uniform
        w = np.ones(s.shape[0])
    return w / w.sum()


def head_agreement(group) -> float:
    """Mean pairwise cosine ⟨C S_a C, C S_b C⟩_F / (‖·‖ ‖·‖) over the graphs a ≠ b of one layer (`group` with batch
    shape `[1, ...]` or `[...]`), S = sym(P) materialised, C = I − 11ᵀ/N removing the near-constant direction every
    row-stochastic graph shares. 1 for a single graph. Memory: the layer's graphs dense, (graphs)·N² floats."""
    n_graphs = group.num_graphs
    if n_graphs < 2:
        return 1.0
    gram = np.asarray(_centred_gram(group), np.float64)
    nrm = np.sqrt(np.clip(np.diag(gram), 1e-300, None))
    cos = gram / nrm[:, None] / nrm[None, :]
    return float(cos[~np.eye(n_graphs, dtype=bool)].mean())


@jax.jit
def _centred_gram(g):
    """`[G, G]` Frobenius inner products of the graphs' C sym(P) C (one compiled pass: dense, centre, Gram)."""
    p = jnp.reshape(g.dense(), (g.num_graphs, g.num_nodes, g.num_nodes))
    s = 0.5 * (p + jnp.swapaxes(p, 1, 2))
    s = s - s.mean(1, keepdims=True) - s.mean(2, keepdims=True) + s.mean((1, 2), keepdims=True)
    f = s.reshape(g.num_graphs, -1)
    return f @ f.T


def pad(values, k: int) -> np.ndarray:
    """values `[k']` (k' ≤ k) → float64 `[k]`, NaN after the last (a layer grid with ≤ k nodes has fewer pairs)."""
    out = np.full(k, np.nan)
    v = np.asarray(values, np.float64).reshape(-1)[:k]
    out[: v.size] = v
    return out


def layer_spectra(graphs: Sequence, group_layers: Sequence[Sequence[int]], num_eigs: int,
                  layers: Sequence[int] | None = None):
    """Each layer's own exact top-K solve (its graphs alone, every head equal; K capped at the layer's nodes − 1):
    (layers `[L]`, results).

    The per-layer `Result`s (eigvecs on the layer's own grid) serve the rules (their eigvals), sweeps and
    attribution alike."""
    from spectral_jax import solvers

    layers = sorted({l for ls in group_layers for l in ls}) if layers is None else [int(l) for l in layers]
    results = []
    for l in layers:
        gs, _ = subset(graphs, group_layers, [l])
        results.append(solvers.exact.exact(gs, min(num_eigs, gs[0].num_nodes - 1)))   # K < the layer's nodes
    return layers, results


def group_weights(graphs: Sequence, group_layers: Sequence[Sequence[int]], layers: Sequence[int], w) -> list:
    """One weight per layer (`layers` `[L]`, w `[L]`) → per-group float32 arrays of each group's batch shape, for
    `solvers.exact.exact(graphs, K, weights=...)`."""
    by_layer = dict(zip((int(l) for l in layers), np.asarray(w, np.float64)))
    out = []
    for g, ls in zip(graphs, group_layers):
        col = np.array([by_layer.get(int(l), 0.0) for l in ls], np.float32)
        out.append(np.broadcast_to(col.reshape(-1, *([1] * (len(g.batch_shape) - 1))), g.batch_shape).copy())
    if not math.fsum(float(x.sum()) for x in out) > 0:
        raise InputError("layer weights", "put no weight on any graph", "give at least one tapped layer weight > 0")
    return out


def base_grid(graphs: Sequence, weights: Sequence) -> tuple[int, int]:
    """The solvers' base grid for `weights`: the largest grid among the groups with positive weight (a zero-weight
    base grid would leave the multi-grid metric B singular, e.g. when a rule selects one coarse UNet layer)."""
    live = [g for g, w in zip(graphs, weights) if float(np.sum(w)) > 0]
    return tuple(max((g.grid for g in live), key=lambda hw: hw[0] * hw[1]))


def for_groups(graphs: Sequence, group_layers: Sequence[Sequence[int]], spec, num_eigs: int,
               spectra=None, agreement=None) -> tuple[list, np.ndarray]:
    """Per-group weights for the solvers from `spec` (a rule name or numbers, see `parse`): (weights, per-layer
    weights `[L]` in layer order, summing to 1). A rule reads `spectra` `[L, K]` (and for "select" `agreement`
    `[L]`) if given, else computes them (`layer_spectra`, `head_agreement`). The dataset-level call is the same:
    `w, _ = for_groups(graphs, group_layers, "eigengap", K)` then
    `solvers.exact.exact(graphs, K, weights=w, base_grid=base_grid(graphs, w))`."""
    layers = sorted({l for ls in group_layers for l in ls})
    w = parse(spec, layers)
    if isinstance(w, str):
        rule = w
        if rule != "uniform" and spectra is None:
            _, res = layer_spectra(graphs, group_layers, num_eigs, layers)
            spectra = np.stack([pad(r.eigvals[0], num_eigs) for r in res])
        if rule == "select" and agreement is None:
            agreement = [head_agreement(subset(graphs, group_layers, [l])[0][0]) for l in layers]
        w = rule_weights(rule, np.ones((len(layers), 2)) if spectra is None else spectra, agreement)
    w = np.asarray(w, np.float64)
    w = w / w.max()            # first to the largest: a sum of weights near the float64 maximum would overflow
    w = w / w.sum()
    return group_weights(graphs, group_layers, layers, w), w


__all__ = ["RULES", "base_grid", "eigengap", "for_groups", "group_weights", "head_agreement", "layer_spectra", "pad", "parse",
           "rule_weights", "subset", "take_layers"]
