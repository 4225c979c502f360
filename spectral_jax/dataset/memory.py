"""How much memory a method="exact" dataset run needs, estimated before any work, and the up-front refusal.

From the run's shapes alone (each layer group's grid (h, w), layers L and merged feature width F — the forward
traced abstractly, `whole.feature_widths`; nothing computed) and the number of images n (padded to the devices):

    N_g       = n·h_g·w_g                                        nodes of group g;  k_g = k_intra + k_inter (capped)
    features  = Σ_g L_g·N_g·F_g·s·c         on disk (the store); s = 4 (float32) or 2 (bfloat16), c = 2 (knn-qk: q
                                             and k) or 1 (knn-vv)
    features in memory: one process — a row tile and its own columns (≤ whole.ROW_TILE_BYTES each), a column
              tile (≤ whole.COL_TILE_BYTES) and the inter-image search's cosine block (kernels.INTER_BUDGET float32);
              P processes — its own rows (features / P) plus the keys all-gathered to each device (features / c)
    graph     = Σ_g L_g·N_g·(8·k_g + 4) · 2  (int32 indices, float32 weights, float32 degrees; host and device copy)
    operator  = Σ_g L_g·N_g·k_g · 64         building the coalesced Σ_l w_l sym(P_l): the weights in float64, the COO
              triplets (int32, int32, float64) and their concatenation (40 B per edge), the CSR of the edges and its
              sum with the transpose (≤ 2 entries per edge, 12 B each); on a base grid of M ≤ dense_max nodes the
              dense path instead: 2·M²·8
    solver    = M·(ncv + 2K)·8               ARPACK's Lanczos basis (ncv = max(2K + 1, 20)) and the K eigenvectors,
              float64 (LOBPCG needs less), M = n·h·w of the base grid

Peak ≈ features in memory + graph + max(operator, solver) (the graph is kept while the operator is built; the COO
and CSR temporaries are freed before the solve), reported with its parts in summary.json ("memory"). The run is
refused up front (`check`: one `InputError`, nothing written) when the peak exceeds the memory available: the
machine's physical memory (`os.sysconf`), or `SPECTRAL_JAX_MAX_MEMORY` (bytes, or with a K/M/G/T suffix, powers of
1024) when set. Model weights, the compiled forward and the images in flight are not counted.
"""

from __future__ import annotations

import os
import re

ENV = "SPECTRAL_JAX_MAX_MEMORY"
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def estimate(groups, num_images: int, *, graph: str = "knn-qk", features_dtype: str = "float32",
             k: tuple[int, int] = (50, 50), num_eigs: int = 20, processes: int = 1, dense_max: int | None = None,
             base=None) -> dict:
    """The memory of an exact run, in bytes (the module docstring's formula). groups: [((h, w), L, F)] per layer
    group; num_images: n (padded to the devices); k: (k_intra, k_inter) before capping by the tokens; base: the
    table grid (default the finest of `groups`). Returns {"features_disk", "features_memory", "graph", "operator",
    "solver", "peak"} (ints) and "formula" (a string)."""
    from spectral_jax import graphs as G
    from spectral_jax import kernels
    from spectral_jax.dataset.whole import COL_TILE_BYTES, ROW_TILE_BYTES
    from spectral_jax.options import DENSE_MAX

    s = 2 if features_dtype == "bfloat16" else 4
    c = 1 if graph == "knn-vv" else 2
    feats = edges = graph_b = 0
    rows = cols = 0
    for grid, layers, width in groups:
        nodes = num_images * grid[0] * grid[1]
        k_g = sum(G.clamp_k(k[0], k[1], tuple(grid), num_images))
        feats += layers * nodes * width * s * c
        edges += layers * nodes * k_g
        graph_b += layers * nodes * (8 * k_g + 4) * 2
        rows = max(rows, min(ROW_TILE_BYTES, nodes * width * s))
        cols = max(cols, min(COL_TILE_BYTES, nodes * width * s))
    if processes == 1:
        feats_mem = 2 * rows + cols + kernels.INTER_BUDGET * 4
    else:
        feats_mem = feats // processes + feats // c
    base = base or max((g for g, _, _ in groups), key=lambda hw: hw[0] * hw[1])
    m = num_images * base[0] * base[1]
    dense = m <= (DENSE_MAX if dense_max is None else dense_max)
    operator = 2 * m * m * 8 if dense else edges * 64
    solver = m * (max(2 * num_eigs + 1, 20) + 2 * num_eigs) * 8
    peak = feats_mem + graph_b + max(operator, solver)
    return {"features_disk": int(feats), "features_memory": int(feats_mem), "graph": int(graph_b),
            "operator": int(operator), "solver": int(solver), "peak": int(peak),
            "formula": "peak = features in memory + graph + max(operator, solver); spectral_jax.dataset.memory"}


def estimate_run(backbone, layers, settings, geom, mesh, processes: int = 1) -> dict:
    """`estimate` for a run: the layer groups and widths of `backbone`'s forward traced abstractly
    (`whole.feature_widths`: `jax.eval_shape`, nothing computed), its settings and geometry."""
    from spectral_jax.dataset.whole import feature_widths, padded_images

    widths = feature_widths(backbone, layers, settings, geom, mesh)
    groups = [(tuple(grid), len(ls), f) for (grid, ls), f in zip(geom.groups, widths)]
    return estimate(groups, padded_images(geom.num_images, geom.devices), graph=settings.graph,
                    features_dtype=settings.features_dtype, k=(geom.k_intra, geom.k_inter),
                    num_eigs=settings.num_eigs, processes=processes, base=geom.base)


def estimate_model(model: str, num_images: int, *, size=None, layers=None, weights: str = "random",
                   family_options: dict | None = None, **settings) -> dict:
    """`estimate` for registry model `model` on `num_images` images: the backbone is loaded (`weights`, default
    "random": no checkpoint is read or downloaded, but its parameters are allocated) and its forward traced
    abstractly for one batch; `size`, `layers` and `settings` (graph, features_dtype, k_intra, k_inter,
    num_eigs, batch_size, …) as `dataset.run` takes them. Returns `estimate`'s dict plus "groups"
    [[h, w], L, F]."""
    from spectral_jax import io, models
    from spectral_jax.dataset.layout import geometry, make_mesh
    from spectral_jax.dataset.settings import Settings

    settings = Settings(model=model, **({"size": size} if size is not None else {}),
                        **({"layers": layers} if layers is not None else {}), method="exact", **settings)
    backbone = models.load_backbone(model, weights, **(family_options or {}))
    tapped = backbone.layers(settings.layers)
    mesh = make_mesh()
    px = io.target_size(settings.size, settings.size, backbone.patch_size)
    geom = geometry(backbone, tapped, settings, px, num_images, mesh.devices.size)
    from spectral_jax.dataset.whole import feature_widths

    out = estimate_run(backbone, tapped, settings, geom, mesh)
    out["groups"] = [[list(g), len(ls), f] for (g, ls), f in zip(geom.groups, feature_widths(
        backbone, tapped, settings, geom, mesh))]
    return out


def available() -> tuple[int, str]:
    """(bytes available to a run, where that number comes from): `SPECTRAL_JAX_MAX_MEMORY` when set (a bad value
    is one `InputError` naming it), else the physical memory."""
    from spectral_jax.errors import InputError

    given = os.environ.get(ENV)
    if given is not None:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", given, re.IGNORECASE)
        if not m or float(m.group(1)) <= 0:
            raise InputError(f"{ENV}={given!r}", "is not a positive number of bytes",
                             f"set it like {ENV}=64G (K, M, G, T: powers of 1024), or unset it")
        return int(float(m.group(1)) * _UNITS[m.group(2).upper()]), ENV
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "physical memory"


def human(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if b < 1024 or unit == "TiB":
            return f"{b:.1f} {unit}" if unit != "B" else f"{int(b)} B"
        b /= 1024
    return ""


def check(est: dict) -> dict:
    """`est` (an `estimate`) when its peak fits the memory available (`available`), with "available" added; else
    one `InputError` saying what the run needs, in parts, and how to make it fit."""
    from spectral_jax.errors import InputError

    have, where = available()
    if est["peak"] > have:
        parts = ", ".join(f"{name} {human(est[name])}" for name in ("features_memory", "graph", "operator",
                                                                     "solver"))
        raise InputError("the run", f"needs about {human(est['peak'])} of memory ({parts}) but {human(have)} is "
                         f"available ({where})", "use fewer images, --layers, --k-intra/--k-inter or a smaller "
                         f"--size, several processes, or set {ENV} if more memory is available")
    return {**est, "available": int(have)}


__all__ = ["ENV", "available", "check", "estimate", "estimate_model", "estimate_run", "human"]
