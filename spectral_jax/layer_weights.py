"""Per-layer weights for graph groups: explicit numbers, or an unsupervised rule read from the graphs alone.

Sits between `graphs` and `solvers` in the data flow and imports neither `solvers` nor `analysis`: it names which
layer each graph of a group belongs to, takes subsets of layers out of groups, and turns one weight per layer (a
`options.LayerWeights`, resolved against the tapped layers) into the per-group arrays `[*S]` that the solvers
take (`solvers.exact.exact(graphs, K, weights=...)`, `solvers.gd.gd`). A layer's weight w_l is shared by its graphs
(every head, every timestep: each w_l / m, m the layer's graphs, `group_weights`), so a layer's total stays w_l;
for layers with equal m, uniform layer weights are the solvers' default (every graph equal). Diffusion kNN groups
`[L, T]` (one graph per layer and timestep) give each timestep w_l / T.

Rules (`RULES`), no labels, no per-dataset constant; "eigengap" and "select" (`GRAPH_RULES`) read each layer's
own graphs:
- "uniform": every layer 1.
- "eigengap": w_l ∝ g_l², g_l = (λ_2 − λ_K) / λ_2 of layer l's own top-K spectrum (`solvers.exact.layer_spectra`,
  which the caller hands to `for_groups`: the exact top-K eigenvalues of mean_heads sym(P_l), largest first, λ_1 the near-trivial one). A graph that encodes layout
  (attention to a neighbourhood, a smooth lattice) has a slowly decaying spectrum — many eigenvalues near λ_2 — and
  gets g near 0; one that separates a few groups has a handful of large eigenvalues and then a drop, g near 1.
  Squaring sharpens the contrast without a tuned temperature.
- "select": all weight on the layer with the largest s_l = g_l · a_l (ties share it), a_l the agreement of the
  layer's heads (`head_agreement`: mean cosine between the heads' centred sym(P_h), 1 for a one-graph layer such as
  a kNN layer). A layer whose spectrum drops (g) *and* whose heads say the same thing (a) carries one grouping of
  the image; a low-level layer can have a large gap (colour clusters) but its heads disagree. A sum of graphs is
  dominated by the slowly decaying layout graphs (every smooth vector scores high in them), so a soft weighting
  can only dilute the best layer; selecting is how a rule can match it.
- "geometric": w_l ∝ 2^l, l the layer's index in the model (each layer twice the one before it; of 12 tapped
  layers the last gets 1/2, the one before 1/4, …; `--layers 3,11` gives layer 11 all but 2^-8 of it). A prior,
  not a reading of the graphs: that a deeper layer of a ViT carries more semantic and less layout/colour grouping.
  It reads no graph (no solve, any method), does not adapt to the data, and means nothing for a UNet, whose layer
  indices run through resolutions. `spectral-jax dataset`'s default for ViTs (exact method): on whole-dataset kNN
  graphs the eigengap rules pick the early layers, and equal weights let them dilute the late ones
  (benchmarks/results/graph_variants.md).
All are invariant to scaling any layer's graphs (ratios of one layer's eigenvalues; cosines) or all weights, and
deterministic (dense LAPACK and exact inner products). Cost: one exact top-K solve per layer (for the single-image
graphs, N ≈ 1,400 nodes, about a joint solve per layer — `sweep` and `attribution` reuse the same solves), and for
"select" the heads' dense graphs once (H·N² floats per layer; H² inner products of N² terms). For dataset kNN
graphs (one graph per layer): one sparse LOBPCG per layer, no head term.

Importing this module imports no JAX (the analysis package reads `eigengap` from here); its graph functions
import it when called.

Shape legend
    L  tapped layers    S  a group's batch dims (layers × heads [× timesteps folded into heads])    K  eigenvectors
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import numpy as np

from spectral_jax.errors import InputError
from spectral_jax.options import GRAPH_RULES, RULES, LayerWeights


def take_layers(group, positions: Sequence[int]):
    """The graphs of `group` (batch dims `[m, ...]`, first axis = its layers) at first-axis `positions`."""
    import jax

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


GAP_FLOOR = 1e-5   # λ_2 at most this share of |λ_1|: float32 rounding of a graph with one eigenvalue, not a gap


def eigengap(spectra) -> np.ndarray:
    """The eigengap score g_l = (λ_2 − λ_K) / λ_2 of each layer's own spectrum `[L, K]` (largest first; trailing NaN
    where a layer has fewer pairs: λ_K is then its last) → `[L]`, clipped to [0, 1]; 0 where λ_2 ≤
    `GAP_FLOOR`·|λ_1| — a layer whose graphs are uniform (every row 1/N: tokens all alike) has λ_1 = 1 and the rest
    float32 rounding (~1e-7), whose ratio would read as a gap near 1 and win the rules. The rules "eigengap" and
    "select" read it, and `analysis.layerwise` reports it."""
    s = np.asarray(spectra, np.float64)
    l2 = s[:, 1] if s.shape[1] > 1 else np.full(s.shape[0], np.nan)     # a 1-node layer has λ_1 only
    lk = np.fmin.reduce(s[:, 1:], axis=1, initial=np.inf)                 # NaN-skipping, no all-NaN warning
    real = l2 > GAP_FLOOR * np.abs(s[:, 0])
    g = np.where(real, (l2 - lk) / np.where(real, l2, 1.0), 0.0)
    return np.clip(g, 0.0, 1.0)


def rule_weights(rule: str, spectra, agreement=None, layers: Sequence[int] | None = None) -> np.ndarray:
    """Per-layer weights `[L]` (summing to 1) of `rule` from each layer's own top-K spectrum `[L, K]` and, for
    "select", its heads' agreement `[L]` (None: 1 for every layer); "geometric" reads only `layers` `[L]`, the
    layers' indices (None: 0 … L−1)."""
    if rule not in RULES:
        raise InputError(f"rule {rule!r}", "unknown layer-weight rule", f"choose one of {', '.join(RULES)}")
    s = np.asarray(spectra, np.float64)
    if rule == "geometric":
        return depth_weights(rule, range(s.shape[0]) if layers is None else layers)
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


def depth_weights(rule: str, layers: Sequence[int]) -> np.ndarray:
    """The weights `[L]` (summing to 1) of a rule that reads only the layers' indices `layers` `[L]` (ascending):
    "geometric", w_l ∝ 2^l (computed as 2^(l − max l), so any depth is finite)."""
    if rule != "geometric":
        raise ValueError(f"rule {rule!r} reads the graphs, not the layer indices")
    l = np.asarray([int(x) for x in layers], np.float64)
    w = np.exp2(l - l.max())
    return w / w.sum()


def depth_ordered(model: str) -> bool:
    """Whether registry model `model`'s layer indices run in depth order, one block after the other on one token
    grid — the ViT-like encoders and the diffusion transformers (their config's `attn_layers`: one per block; FLUX
    its double-stream blocks, then its single-stream ones) —, so that a lower index is a shallower layer. False for
    a Stable Diffusion UNet (a config with a `unet`): its indices run through the down blocks, the mid block (the
    coarsest grid) and the up blocks, resolutions rather than depth; False for a model outside the registry (its
    order unknown)."""
    from spectral_jax.models import get_spec

    try:
        spec = get_spec(model)
    except InputError:
        return False
    return getattr(spec.config, "unet", None) is None


def early_pick(rule: str, layers: Sequence[int], weights) -> str | None:
    """The one line a whole-dataset run prints when a graph-reading rule ("eigengap", "select") put its largest
    weight on an early layer — one in the first half of the tapped `layers` `[L]` (ascending; weights `[L]`, as
    `for_groups` returns them) — else None (other rules, fewer than two layers, a later layer). For models whose
    layer indices are depth (`depth_ordered`): the caller asks it only for them.

    Why it says so rather than fixing the rule: on whole-dataset kNN graphs the eigengap falls with depth (the
    early layers' graphs hold a few large colour/texture clusters), so both rules favour the early layers, which
    segment worst there (measured on a ViT, DINOv2-S/14 knn-vv: "select" takes layer 0;
    benchmarks/results/graph_variants_horse.md). The rules stay as defined, for single images and for any graph
    where the gap does mean a grouping; this only makes the dataset-level pick visible. It does not change any
    weight."""
    layers = [int(l) for l in layers]
    w = np.asarray(weights, np.float64)
    if rule not in ("eigengap", "select") or len(layers) < 2 or w.size != len(layers):
        return None
    top = int(np.argmax(w))
    if top >= len(layers) // 2:
        return None
    what = "all its weight" if rule == "select" else f"its largest weight ({w[top]:.2f})"
    return (f"spectral-jax dataset: --layer-weights {rule} put {what} on layer {layers[top]}, an early one of the "
            f"tapped layers {layers[0]}…{layers[-1]}: on whole-dataset kNN graphs the eigengap is largest in early "
            "layers, which segmented worst there on DINOv2 (benchmarks/results/graph_variants_horse.md); pass "
            "--layer-weights uniform or LAYER:W pairs to choose the layers yourself")


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


@functools.cache
def _gram_program():
    import jax

    return jax.jit(_gram)


def _centred_gram(g):
    """`[G, G]` Frobenius inner products of the graphs' C sym(P) C (one compiled pass: dense, centre, Gram)."""
    return _gram_program()(g)


def _gram(g):
    import jax.numpy as jnp

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


def group_weights(graphs: Sequence, group_layers: Sequence[Sequence[int]], layers: Sequence[int], w) -> list:
    """One weight per layer (`layers` `[L]`, w `[L]`) → per-group float32 arrays of each group's batch shape, for
    `solvers.exact.exact(graphs, K, weights=...)`. A layer's weight is shared by its graphs: each of the m graphs
    on the trailing batch axes (its heads, its timesteps: m = H, T·H or, for a diffusion kNN group `[L, T]`, T)
    gets w_l / m, so every layer's graphs sum to w_l whatever it holds (for layers of equal m the same problem as
    w_l each, the solvers normalising the weights to sum 1)."""
    by_layer = dict(zip((int(l) for l in layers), np.asarray(w, np.float64)))
    out = []
    for g, ls in zip(graphs, group_layers):
        per = max(1, int(np.prod(g.batch_shape[1:], dtype=np.int64)))
        col = np.array([by_layer.get(int(l), 0.0) / per for l in ls], np.float32)
        out.append(np.broadcast_to(col.reshape(-1, *([1] * (len(g.batch_shape) - 1))), g.batch_shape).copy())
    if not math.fsum(float(x.sum()) for x in out) > 0:
        raise InputError("layer weights", "put no weight on any graph", "give at least one tapped layer weight > 0")
    return out


def base_grid(graphs: Sequence, weights: Sequence) -> tuple[int, int]:
    """The solvers' base grid for `weights`: the largest grid among the groups with positive weight (a zero-weight
    base grid would leave the multi-grid metric B singular, e.g. when a rule selects one coarse UNet layer)."""
    live = [g for g, w in zip(graphs, weights) if float(np.sum(w)) > 0]
    return tuple(max((g.grid for g in live), key=lambda hw: hw[0] * hw[1]))


def for_groups(graphs: Sequence, group_layers: Sequence[Sequence[int]], weights, num_eigs: int,
               spectra=None, agreement=None) -> tuple[list, np.ndarray]:
    """Per-group weights for the solvers from `weights`: (weights, per-layer weights `[L]` in ascending layer order,
    summing to 1). weights: a `LayerWeights` or what `LayerWeights.parse` takes (e.g. `LayerWeights.resolve`'s
    rule name or `[L]`), resolved here against the layers of `group_layers` in ascending order. A rule that reads the
    graphs (`GRAPH_RULES`: "eigengap", "select"; "uniform" and "geometric" read none) reads `spectra`: each layer's own top-K spectrum
    `[L, K]`, or a callable layers → `[L, K]` (`solvers.exact.layer_spectra`, which this module does not import);
    "select" also reads `agreement` `[L]` (None: `head_agreement` of each layer's graphs). The dataset-level call
    is the same: `w, _ = for_groups(graphs, group_layers, "eigengap", K, spectra=...)` then
    `solvers.exact.exact(graphs, K, weights=w, base_grid=base_grid(graphs, w))`."""
    layers = sorted({l for ls in group_layers for l in ls})
    resolved = LayerWeights.parse(weights).resolve(layers)
    if agreement is None and isinstance(resolved, str) and resolved == "select":
        agreement = [head_agreement(subset(graphs, group_layers, [l])[0][0]) for l in layers]
    _, w = per_layer(layers, weights, spectra, agreement)
    return group_weights(graphs, group_layers, layers, w), w


def per_layer(layers: Sequence[int], weights, spectra=None, agreement=None) -> tuple[str, np.ndarray]:
    """(rule, per-layer weights `[L]` in ascending layer order, summing to 1) of `weights` (a `LayerWeights` or
    what `LayerWeights.parse` takes) over `layers`: rule "given" for numbers, else the rule's name. A rule that
    reads the graphs (`GRAPH_RULES`) reads `spectra` (`[L, K]` or a callable layers → `[L, K]`) and, for
    "select", `agreement` `[L]` (None: 1 for every layer); "uniform" and "geometric" read neither. The weights
    `for_groups` gives the solvers, without the graphs (what a record of them needs)."""
    layers = sorted(layers)
    w = LayerWeights.parse(weights).resolve(layers)          # numbers again in ascending order, summing to 1
    if not isinstance(w, str):
        return "given", np.asarray(w, np.float64)
    rule = w
    if rule in GRAPH_RULES:
        if callable(spectra):
            spectra = spectra(layers)
        if spectra is None:
            raise ValueError(f"rule {rule!r} needs each layer's spectra (spectra=solvers.exact.layer_spectra)")
    return rule, rule_weights(rule, spectra if rule in GRAPH_RULES else np.ones((len(layers), 2)), agreement, layers)


__all__ = ["GRAPH_RULES", "RULES", "LayerWeights", "base_grid", "depth_ordered", "depth_weights", "early_pick",
           "eigengap", "for_groups", "group_weights", "head_agreement", "pad", "per_layer", "rule_weights", "subset",
           "take_layers"]
