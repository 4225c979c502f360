"""How much memory a method="exact" dataset run needs, estimated before any work, and the up-front refusal.

From the run's shapes alone (each layer group's grid (h, w), layers L and merged feature width F — the forward
traced abstractly, `whole.feature_widths`; nothing computed), the backbone's params and the number of images n
(padded to the devices), per process:

    weights   = Σ bytes of the backbone's params leaves (shape × itemsize; nothing allocated), × the mesh's devices
                on this process (each device holds the params the jitted forward reads)
    load      = Σ bytes of the params once more: the host copy a loader holds while it makes the device arrays
                (a checkpoint read and converted, or random weights drawn). It is freed, but the C allocator keeps
                most of it (weights come in many blocks below its mmap threshold), so the process's resident size
                does not fall back (benchmarks/results/dataset.md, the memory section)
    forward   = the jitted forward of one batch (`whole._forward` at --batch-size and the input size), as XLA's
                compiler reports it (`Compiled.memory_analysis()`: temp_size_in_bytes + output_size_in_bytes, and
                the input batch; "forward_xla"), × CPU_FORWARD_FACTOR on the CPU backend (running it there grows
                the resident size by more than XLA's figure: the runtime's buffers come from the C allocator, whose
                per-thread arenas fragment), × the mesh's devices on this process; where the backend reports no
                analysis, the analytic bound `jaxpr_peak` instead ("forward_source" says which)
    N_g       = n·h_g·w_g                                        nodes of group g;  k_g = k_intra + k_inter (capped)
    features  = Σ_g L_g·N_g·F_g·s·c         on disk (the store); s = 4 (float32) or 2 (bfloat16), c = 2 (knn-qk: q
                                             and k) or 1 (knn-vv)
    features in memory: one process — a row tile and its own columns (≤ whole.ROW_TILE_BYTES each), a column
              tile (≤ whole.COL_TILE_BYTES) and the inter-image search's cosine block (kernels.INTER_BUDGET float32);
              an approximate search (--search ivf / faiss, or auto from knn_search.AUTO_MIN_COLUMNS nodes on the
              gathered path) — max_g N_g·F_g·(s·c + 4·(c + 1)): one graph's features as stored, as unit float32
              rows, and the index's float32 copy of the columns; with faiss + max_g N_g·P·4, every row's P probed
              lists (int32) at the widest try the checked search may make (`knn_search.last_try`); P processes
              + features / P (its own rows) + max_g m_g·N_g·F_g·s·c (m_g = `whole.owned_peak(L_g, P)` ≤ ⌈L_g/P⌉
              + 1 of a layer group's graphs' features of all images, gathered to the process that searches them:
              `whole.build_graphs`; diffusion groups, L_g·T graphs of F_g/T each, hold less);
              P processes on the gathered path, the exact search — its own rows (features / P) plus the keys
              all-gathered to each device (features / c);
              the sharded path (`whole.search_sharded`, any P) — per device of this process: a query tile (its rows,
              and its keys for knn-qk; ≤ whole.ROW_TILE_BYTES each), a key tile and the one in flight
              (≤ whole.COL_TILE_BYTES each) and one cosine block of `kernels.topk_inter`; with --search ivf, or auto
              from knn_search.AUTO_MIN_COLUMNS nodes (the ring IVF, `whole.sharded_search`), at least the device's whole
              blocks, max_g (N_g/(P·d))·F_g·(s·c + 12): its key (and query) block as stored, their unit float32
              rows, its index's float32 copy of the keys and the index in flight
  the gathered path (`whole.solver_path`: every process holds the whole graph, `solvers.exact`):
    graph     = Σ_g L_g·N_g·(8·k_g + 4) · 2  (int32 indices, float32 weights, float32 degrees; host and device copy)
    operator  = Σ_g L_g·N_g·k_g · 64         building the coalesced Σ_l w_l sym(P_l): the weights in float64, the COO
              triplets (int32, int32, float64) and their concatenation (40 B per edge), the CSR of the edges and its
              sum with the transpose (≤ 2 entries per edge, 12 B each); on a base grid of M ≤ dense_max nodes the
              dense path instead: 2·M²·8
    solver    = M·(ncv + 2K)·8               ARPACK's Lanczos basis (ncv = max(2K + 1, 20)) and the K eigenvectors,
              float64 (LOBPCG needs less), M = n·h·w of the base grid
    dataset   = features in memory + graph + max(operator, solver)   (the COO and CSR temporaries are freed before
              the solve)
  the sharded path (`solve_sharded`, P processes; each holds its own rows, nothing gathered but the eigenvectors):
    graph     = Σ_g L_g·N_g·(8·k_g + 4) / P  (`distributed.ShardedKnn`: idx, w, deg, device arrays only)
    operator  = Σ_g L_g·N_g·k_g · 8 / P      (`distributed.DistOperator`: cols int32, coef float32)
    solver    = M·2·Kb·4·2·d + (M/P)·Kb·4·8 + M·K·12   a product's all-gathered X and scatter buffer for 2·Kb vectors
              on each of this process's d devices (Kb = K + distributed.GUARD), LOBPCG's blocks of its own rows, and
              the gathered eigenvectors (float32, then float64)
    dataset   = features in memory + graph + operator + solver       (graph and operator are both held in the solve)

On the CPU backend the params and the forward live in host memory, so peak = load + weights + max(forward, dataset)
(the backbone is held for the whole run; the forward's temporaries are gone before the search). On an accelerator
they live on the device: peak = load + dataset, and weights + forward is checked against the device's memory where
the backend reports its limit (`Device.memory_stats()["bytes_limit"]`). `estimate` returns the parts and "peak"
(summary.json's "memory" record: features_disk, features_memory, graph, operator, solver, weights, load, forward,
forward_xla, forward_source, peak, device_peak, solver_path, processes, formula; and "available" once checked). The
run is refused up front (`check`: one `InputError` naming the largest part and its fix, nothing written) when the peak
exceeds the memory available: the machine's physical memory (`os.sysconf`), or `SPECTRAL_JAX_MAX_MEMORY` (bytes, or
with a K/M/G/T suffix, powers of 1024) when set. Not counted: the JAX runtime and the compiler's own memory (a few
hundred MiB), the images in flight (`--prefetch` batches) and the model's own load beyond one copy of its weights
(SD's text encoder, run once for the empty prompt).
"""

from __future__ import annotations

import os
import re

ENV = "SPECTRAL_JAX_MAX_MEMORY"
CPU_FORWARD_FACTOR = 1.5    # resident growth of a compiled forward on CPU / XLA's figure: ≤ 1.5 where measured
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _bytes(x) -> int:
    """Bytes of an array or a `jax.ShapeDtypeStruct` (shape × itemsize; nothing read)."""
    import numpy as np

    return int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize


def weights_bytes(params) -> int:
    """Bytes of a params pytree's leaves (arrays or `ShapeDtypeStruct`s): shape × itemsize, nothing allocated."""
    import jax

    return sum(_bytes(leaf) for leaf in jax.tree.leaves(params) if hasattr(leaf, "shape"))


def estimate(groups, num_images: int, *, graph: str = "knn-qk", features_dtype: str = "float32",
             k: tuple[int, int] = (50, 50), num_eigs: int = 20, processes: int = 1, dense_max: int | None = None,
             base=None, weights: int = 0, load: int = 0, forward: int = 0, forward_source: str = "none",
             forward_xla: int = 0, solver_path: str = "gathered", local_devices: int = 1,
             model_on_host: bool = True, search: str = "exact", block: int = 512) -> dict:
    """The memory of an exact run per process, in bytes (the module docstring's formula). groups: [((h, w), L, F)]
    per layer group; num_images: n (padded to the devices); k: (k_intra, k_inter) before capping by the tokens;
    base: the table grid (default the finest of `groups`); weights, load, forward: the model's terms as
    `estimate_run` measures them (bytes per process; 0: not counted; forward_xla: XLA's own figure, a record);
    solver_path: "gathered" or "sharded"; local_devices: the mesh's devices on this process (d); model_on_host:
    whether params and forward live in host memory (the CPU backend); search: the dataset's --search ("auto" counts
    as approximate from `knn_search.AUTO_MIN_COLUMNS` nodes in one process); block: the kNN search's row block
    (`Settings.block`: the sharded search's cosine block is block × its key tile). Returns {"features_disk",
    "features_memory", "graph", "operator", "solver", "weights", "load", "forward", "forward_xla", "peak",
    "device_peak"} (ints), "forward_source", "solver_path", "processes" and "formula" (a string)."""
    from spectral_jax import graphs as G
    from spectral_jax import kernels
    from spectral_jax.dataset.whole import COL_TILE_BYTES, ROW_TILE_BYTES, _tile_images, owned_peak, ring_ivf
    from spectral_jax.options import DENSE_MAX

    if solver_path not in ("gathered", "sharded"):
        raise ValueError(f"solver_path must be 'gathered' or 'sharded', got {solver_path!r}")
    s = 2 if features_dtype == "bfloat16" else 4
    c = 1 if graph == "knn-vv" else 2
    feats = edges = slots = 0
    rows = cols = tiles = whole = group = ring = 0
    for grid, layers, width in groups:
        nodes = num_images * grid[0] * grid[1]
        k_g = sum(G.clamp_k(k[0], k[1], tuple(grid), num_images))
        feats += layers * nodes * width * s * c
        group = max(group, owned_peak(layers, processes) * nodes * width * s * c)
        edges += layers * nodes * k_g
        slots += layers * nodes * (8 * k_g + 4)
        rows = max(rows, min(ROW_TILE_BYTES, nodes * width * s))
        whole = max(whole, nodes * width * (s * c + 4 * (c + 1)))
        cols = max(cols, min(COL_TILE_BYTES, nodes * width * s))
        per, mine = grid[0] * grid[1], max(1, num_images // (processes * local_devices))
        tq, tk = (_tile_images(mine, per * width * s, b) for b in (ROW_TILE_BYTES, COL_TILE_BYTES))
        k_o = G.clamp_k(k[0], k[1], tuple(grid), num_images)[1]
        bq = min(block, tq * per)
        tiles = max(tiles, (c * tq + 2 * tk) * per * width * s
                    + bq * min(max(tk * per, k_o), max(k_o, kernels.INTER_BUDGET // bq)) * 4)
        ring = max(ring, mine * per * width * (s * c + 12))
    from spectral_jax import knn_search

    nodes_max = max(num_images * g[0] * g[1] for g, _, _ in groups)
    approx = solver_path == "gathered" and (
        search in ("ivf", "faiss") or (search == "auto" and nodes_max >= knn_search.AUTO_MIN_COLUMNS))
    if solver_path == "sharded":
        feats_mem = local_devices * tiles
        if ring_ivf(search, nodes_max):
            feats_mem = local_devices * max(tiles, ring)
    elif approx:                    # one graph's features as stored, their unit float32 rows and the index's copy
        feats_mem = whole
        sr = knn_search.auto_search(nodes_max, kind=None if search == "auto" else search)
        if sr.kind == "faiss":      # + every row's probed lists at the widest try (int32)
            feats_mem += nodes_max * knn_search.last_try(nodes_max, 1, sr).nprobe * 4
        if processes > 1:           # + its own rows, and its share of a group's graphs' features, gathered
            feats_mem += feats // processes + group
    elif processes == 1:
        feats_mem = 2 * rows + cols + kernels.INTER_BUDGET * 4
    else:
        feats_mem = feats // processes + feats // c
    base = base or max((g for g, _, _ in groups), key=lambda hw: hw[0] * hw[1])
    m = num_images * base[0] * base[1]
    if solver_path == "sharded":
        from spectral_jax.solvers.distributed import GUARD

        kb = num_eigs + GUARD
        graph_b = slots // processes
        operator = edges * 8 // processes
        solver = m * 2 * kb * 4 * 2 * local_devices + (m // processes) * kb * 4 * 8 + m * num_eigs * 12
        dataset = feats_mem + graph_b + operator + solver
    else:
        graph_b = slots * 2
        dense = m <= (DENSE_MAX if dense_max is None else dense_max)
        operator = 2 * m * m * 8 if dense else edges * 64
        solver = m * (max(2 * num_eigs + 1, 20) + 2 * num_eigs) * 8
        dataset = feats_mem + graph_b + max(operator, solver)
    model = weights + forward
    peak = load + (weights + max(forward, dataset) if model_on_host else dataset)
    return {"features_disk": int(feats), "features_memory": int(feats_mem), "graph": int(graph_b),
            "operator": int(operator), "solver": int(solver), "weights": int(weights), "load": int(load),
            "forward": int(forward), "forward_xla": int(forward_xla),
            "forward_source": forward_source, "peak": int(peak), "device_peak": 0 if model_on_host else int(model),
            "solver_path": solver_path, "processes": int(processes),
            "formula": ("peak = load + weights + max(forward, dataset)" if model_on_host else "peak = load + dataset; "
                        "device_peak "
                        "= weights + forward") + "; dataset = features in memory + graph + " + (
                "operator + solver" if solver_path == "sharded" else "max(operator, solver)")
            + "; spectral_jax.dataset.memory"}


def jaxpr_peak(closed) -> int:
    """An analytic bound on the live bytes of running a (closed) jaxpr: its equations in order, each value held
    from the equation that makes it to its last use, a sub-jaxpr's own peak (a scan or while body, a cond branch,
    a nested jit or checkpoint) added at its equation. Inputs and constants are not counted (the caller counts the
    params). XLA's fusion and buffer reuse usually need less; it is the fallback where the backend gives no memory
    analysis of the compiled forward."""
    jaxpr = getattr(closed, "jaxpr", closed)
    eqns = jaxpr.eqns
    last = {}
    for i, eqn in enumerate(eqns):
        for v in eqn.invars:
            if not hasattr(v, "val"):                                  # a Var, not a Literal
                last[v] = i
    for v in jaxpr.outvars:
        if not hasattr(v, "val"):
            last[v] = len(eqns)
    made, live, peak = {}, 0, 0
    for i, eqn in enumerate(eqns):
        inner = 0
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    inner = max(inner, jaxpr_peak(sub))
        out = sum(_bytes(v.aval) for v in eqn.outvars if hasattr(v.aval, "shape"))
        peak = max(peak, live + out + inner)
        for v in eqn.outvars:
            if v in last and hasattr(v.aval, "shape"):
                made[v] = _bytes(v.aval)
                live += made[v]
        for v in eqn.invars:
            if not hasattr(v, "val") and v in made and last.get(v) == i:
                live -= made.pop(v)
    return int(peak)


def forward_bytes(backbone, layers, settings, geom, mesh) -> tuple[int, str]:
    """(bytes, source) of the run's jitted forward of one batch (`whole._forward`: --batch-size images at the
    input size, rows sharded over `mesh`) beyond its params, per device: XLA's memory analysis of the compiled
    program (temp + output + the input batch; source "xla"), or where the backend reports none the analytic
    `jaxpr_peak` of its jaxpr plus the input batch (source "analytic"). params may be arrays or
    `ShapeDtypeStruct`s (an abstract backbone: `abstract_backbone`); compiling allocates no weights."""
    import jax

    from spectral_jax.dataset.whole import _forward, forward_args

    devices = int(mesh.devices.size)
    params, x = forward_args(backbone, settings, geom, mesh)
    batch = _bytes(x) // devices
    fw = _forward(backbone, layers, settings, geom, mesh)
    lowered = fw.lower(params, x)
    try:
        stats = lowered.compile().memory_analysis()
    except NotImplementedError:                                           # pragma: no cover (backend-dependent)
        stats = None
    if stats is not None and getattr(stats, "temp_size_in_bytes", None) is not None:
        return int(stats.temp_size_in_bytes) + int(stats.output_size_in_bytes) + batch, "xla"
    return jaxpr_peak(jax.make_jaxpr(fw)(params, x)) // devices + batch, "analytic"  # pragma: no cover


def estimate_run(backbone, layers, settings, geom, mesh, processes: int = 1) -> dict:
    """`estimate` for a run: the layer groups and widths of `backbone`'s forward traced abstractly
    (`whole.feature_widths`: `jax.eval_shape`, nothing computed), its params' bytes (`weights_bytes`), its
    compiled forward's memory (`forward_bytes`, × CPU_FORWARD_FACTOR on the CPU), the loader's copy (load = the
    params' bytes once), the exact solver's path (`whole.solver_path`; "sharded" asked where it cannot run is its
    `InputError`), its settings and geometry."""
    import jax

    from spectral_jax.dataset.whole import feature_widths, padded_images, solver_path

    widths = feature_widths(backbone, layers, settings, geom, mesh)
    groups = [(tuple(grid), len(ls), f) for (grid, ls), f in zip(geom.groups, widths)]
    path = solver_path(settings, geom)
    local = sum(1 for d in mesh.devices.flat if d.process_index == jax.process_index())
    raw, source = forward_bytes(backbone, layers, settings, geom, mesh)
    on_host = jax.default_backend() == "cpu"
    forward = int(raw * CPU_FORWARD_FACTOR) if on_host and source == "xla" else raw
    return estimate(groups, padded_images(geom.num_images, geom.devices), graph=settings.graph,
                    features_dtype=settings.features_dtype, k=(geom.k_intra, geom.k_inter),
                    num_eigs=settings.num_eigs, processes=processes, base=geom.base,
                    weights=weights_bytes(backbone.params) * local, load=weights_bytes(backbone.params),
                    forward=forward * local, forward_source=source, forward_xla=raw * local if source == "xla"
                    else 0, solver_path=path, local_devices=local, model_on_host=on_host,
                    search=settings.search if settings.method == "exact" else "exact", block=settings.block)


def abstract_backbone(model: str, **family_options):
    """Registry model `model` as a `Backbone` whose params are `jax.ShapeDtypeStruct`s (the timesteps a diffusion
    backbone's params hold stay concrete int32 `[T]`): the family's own random-weight loader run under
    `jax.eval_shape` inside `models.convert.abstract_weights()`, where `random_leaves` — where every family draws its
    random weights — gives traced zeros instead of drawing them, so no weight is drawn or allocated (SD 1.5:
    seconds, not a minute and 5 GB). Context-local: another thread loading a model meanwhile draws its weights as
    usual. The backbone's `model` is None (its modules were traced)."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np

    from spectral_jax.models import convert, registry

    held = []

    def load():
        with convert.abstract_weights():
            bb = registry.load_backbone(model, "random", **family_options)
        held.append(bb)
        return bb.params

    params = jax.eval_shape(load)
    bb = held[0]
    if isinstance(params, dict) and "timesteps" in params:
        params = {**params, "timesteps": jnp.asarray(np.asarray(bb.timesteps, np.int32))}
    return dataclasses.replace(bb, params=params, model=None)


def estimate_model(model: str, num_images: int, *, size=None, layers=None, processes: int = 1,
                   family_options: dict | None = None, **settings) -> dict:
    """`estimate` for registry model `model` on `num_images` images, without weights: the backbone built
    abstractly (`abstract_backbone`: its params are shapes only, nothing drawn or read), its forward traced and
    compiled for one batch (`estimate_run`); `size`, `layers` and `settings` (graph, features_dtype, k_intra,
    k_inter, num_eigs, batch_size, …) as `dataset.run` takes them; processes: P (the per-process figure).
    Returns `estimate`'s dict plus "groups" [[h, w], L, F]."""
    from spectral_jax import io
    from spectral_jax.dataset.layout import geometry, make_mesh
    from spectral_jax.dataset.settings import Settings
    from spectral_jax.dataset.whole import feature_widths

    settings = Settings(model=model, **({"size": size} if size is not None else {}),
                        **({"layers": layers} if layers is not None else {}), method="exact", **settings)
    backbone = abstract_backbone(model, **(family_options or {}))
    tapped = backbone.layers(settings.layers)
    mesh = make_mesh()
    px = io.target_size(settings.size, settings.size, backbone.patch_size)
    geom = geometry(backbone, tapped, settings, px, num_images, mesh.devices.size)
    out = estimate_run(backbone, tapped, settings, geom, mesh, processes)
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


_FIX = {"forward": "a smaller --batch-size (the forward holds one batch's activations)",
        "weights": "a smaller model",
        "load": "a smaller model",
        "features_memory": "--bf16-features or more processes",
        "graph": "fewer images, --layers or smaller --k-intra/--k-inter",
        "operator": "fewer images, --layers or smaller --k-intra/--k-inter",
        "solver": "fewer images or a smaller --num-eigs"}
_NAMES = {"forward": "the forward's activations", "weights": "the model weights",
          "load": "the loader's copy of the weights", "features_memory": "features", "graph": "graph",
          "operator": "operator", "solver": "solver"}


def _parts(est: dict, device: bool = False) -> list[tuple[str, int]]:
    """[(part, bytes)] of what the peak is made of (device: what the device_peak is made of), largest first
    (`estimate`'s peak formula)."""
    if device:
        parts = ("weights", "forward")
    else:
        parts = (("weights", "forward") if est.get("device_peak", 0) == 0 else ()) + (
            "load", "features_memory", "graph", "operator", "solver")
    return sorted(((p, int(est.get(p, 0))) for p in parts), key=lambda x: -x[1])


def check(est: dict) -> dict:
    """`est` (an `estimate`) when its peak fits the memory available (`available`) — and its device_peak the
    device's memory, where the backend reports that limit — with "available" added; else one `InputError` saying
    what the run needs, its largest part first, and how to make that part fit."""
    from spectral_jax.errors import InputError

    have, where = available()
    need, what, device = est["peak"], "memory", False
    if est.get("device_peak", 0):
        limit = _device_limit()
        if limit is not None and est["device_peak"] > limit:
            have, where, need, what, device = limit, "the device's bytes_limit", est["device_peak"], \
                "accelerator memory", True
    if need > have:
        parts = _parts(est, device)
        listed = ", ".join(f"{_NAMES[p]} {human(b)}" for p, b in parts)
        raise InputError("the run", f"needs about {human(need)} of {what} (largest: {listed}) but {human(have)} is "
                         f"available ({where})", f"use {_FIX[parts[0][0]]}; or fewer images, several processes, or "
                         f"set {ENV} if more memory is available")
    return {**est, "available": int(have)}


def _device_limit() -> int | None:
    """The first local accelerator's memory limit in bytes (`Device.memory_stats()["bytes_limit"]`), or None where
    the backend does not report it."""
    import jax

    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:                                                    # pragma: no cover (backend-dependent)
        return None
    return int(stats["bytes_limit"]) if stats and stats.get("bytes_limit") else None


__all__ = ["CPU_FORWARD_FACTOR", "ENV", "abstract_backbone", "available", "check", "estimate", "estimate_model",
           "estimate_run", "forward_bytes", "human", "jaxpr_peak", "weights_bytes"]
