"""One step of the dataset solver, jitted once per run: taps of a batch → one kNN graph per tapped layer → a few
optimizer steps on the batch's rows of the table → the table, its EMA, the per-image optimizer state and status.

    state = init_state(settings, geom, mesh)
    step = compile_step(backbone, layers, settings, geom, mesh, state, batch_spec)   # before anything is written
    state, metrics, nonfinite = step(state, params, x, idx, valid)

The graph is `graphs.knn` over all B·N tokens of the batch (`graphs.knn_inputs`: heads concatenated; one graph per
(layer, timestep) for diffusion taps), padded and
unreadable slots masked, rows searched under `shard_map` (`mesh`). Presets (what a table row holds, which loss the
inner steps minimise):
    paper   logits; X = softmax over K; the official code's loss 2·mean|R − 1| + 2λ·mean (z_kᵀ z_k')²
            (`objective.paper_loss`).
    eigen   free values; the batch's rows are orthonormalised over the batch's nodes (`solvers.gd.retract`) and
            moved by `solvers.gd.stiefel_step` — one image's gd step — on Σ_k c_k Σ_l w_l R_{l,k}, c_k decreasing
            from 1 to ½ (`solvers.gd.brockett`, `eigen_cost`: a Brockett cost, so column k means "the k-th
            eigenvector" in every batch).
Diffusion backbones with `timestep_draw="fresh"`: before the forward, the step sets the params' timesteps and noise
key (`Backbone.conditioned`) to a fresh draw of (seed, the step's global index) (`fresh_conditioning`): T timesteps
~ U{0..t_max} and a new noise key, the same for every image of the batch, inside the compiled step (no recompile,
no host round trip; a resume continues the sequence, since the index is `State.step`). "fixed": the params' own.
Both presets step with `solvers.gd`'s own update (`stiefel_step`, `descent_step`) and optimizer
(`solvers.gd.default_optimizer`: AdamW with the settings' weight decay), per image (`per_image_update`).
Each image has its own optimizer state (count, moments): its rows move only when it is in the batch, as with the
official code's per-image parameters, whose gradient is None outside their batch. The step is `jax.jit` with the
backbone's `apply`, the layers, the settings, the geometry and the mesh static: JAX's caches keep it compiled, so a
second run with the same backbone object and settings (a resume, a re-export) compiles nothing.

Shape legend
    B  images per batch    K  eigenvectors    (h, w)  base grid    R  table rows    D  devices on the 'data' axis
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from spectral_jax import graphs as G
from spectral_jax.dataset.layout import AXIS, Geometry, tapped
from spectral_jax.dataset.settings import Settings, check_timestep_draw
from spectral_jax.models.backbone import Backbone, params_timesteps
from spectral_jax.objective import from_nodes, paper_loss, rayleigh, to_nodes
from spectral_jax.solvers.gd import (brockett, default_lr, default_optimizer, descent_step, eigen_cost, retract,
                                     stiefel_step)


UNSEEN, READ, UNREADABLE, NONFINITE = 0, 1, 2, 3     # an image's status; NONFINITE: its taps held NaN or Inf


class State(NamedTuple):
    """What a run carries from step to step (and checkpoints). Rows are sharded over the mesh."""

    table: jax.Array            # [R, K, h, w] float32: logits (paper) or free values (eigen)
    ema: jax.Array              # [R, K, h, w] float32: its moving average (not debiased)
    opt: Any                    # the optimizer's state, one per row (leaves [R, ...])
    status: jax.Array           # [R] int8: UNSEEN, READ, UNREADABLE, NONFINITE (the backbone's output)
    step: jax.Array             # int32 scalar: steps taken


class Metrics(NamedTuple):
    """One step's report (replicated scalars)."""

    loss_first: jax.Array       # the loss at the first inner step
    loss: jax.Array             # after the inner steps
    objective: jax.Array        # Σ_k Σ_l w_l R_{l,k} after the inner steps
    images: jax.Array           # readable images in the batch
    links: jax.Array            # the batch's graphs' edges between two distinct tokens (0: --min-cos left none)


def learning_rate(settings: Settings, geom: Geometry) -> float:
    """`settings.lr`, else `solvers.gd.default_lr` at the dataset level over a batch's B·h·w nodes."""
    if settings.lr is not None:
        return float(settings.lr)
    return default_lr(settings.preset, settings.batch_size * geom.base[0] * geom.base[1], level="dataset")


def make_optimizer(settings: Settings, geom: Geometry) -> optax.GradientTransformation:
    """`solvers.gd.default_optimizer` at the dataset level: AdamW (the official code's optimizer) with the settings'
    weight decay (0 by default, as in its dataset run) and `learning_rate`; one state per image."""
    return default_optimizer(settings.preset, learning_rate(settings, geom),
                             settings.batch_size * geom.base[0] * geom.base[1], level="dataset",
                             weight_decay=float(settings.weight_decay))


def shardings(mesh: Mesh, tree):
    """Rows over the mesh for every leaf with a leading axis, replicated scalars."""
    return jax.tree.map(lambda s: NamedSharding(mesh, P(AXIS) if s.ndim >= 1 else P()), tree)


def _new_state(settings: Settings, geom: Geometry) -> State:
    table = jax.random.normal(jax.random.key(settings.seed), (geom.rows, settings.num_eigs, *geom.base), jnp.float32)
    return State(table, jnp.zeros_like(table), jax.vmap(make_optimizer(settings, geom).init)(table),
                 jnp.zeros((geom.rows,), jnp.int8), jnp.zeros((), jnp.int32))


def abstract_state(settings: Settings, geom: Geometry, mesh: Mesh) -> State:
    """The state's shapes, dtypes and shardings (for compiling and restoring without computing anything)."""
    shape = jax.eval_shape(lambda: _new_state(settings, geom))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shape,
                        shardings(mesh, shape))


def init_state(settings: Settings, geom: Geometry, mesh: Mesh) -> State:
    """A fresh state: the table drawn from `seed` (standard normal, as the official code's logits), a zero EMA,
    per-image optimizer state, status 0 (unseen), step 0 — created sharded."""
    out = shardings(mesh, jax.eval_shape(lambda: _new_state(settings, geom)))
    return jax.jit(lambda: _new_state(settings, geom), out_shardings=out)()


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


def _layer_weights(settings: Settings, geom: Geometry, graphs):
    """Per-group float32 weights of `settings.layer_weights` (None: equal; numbers, "uniform" or "geometric": gd
    takes no rule that reads graphs), resolved against the tapped layers and scaled in float64 first (`layer_weights.for_groups`,
    static numbers: constants of the compiled step)."""
    from spectral_jax import layer_weights as LW

    group_layers = [tuple(layers) for _, layers in geom.groups]
    if settings.layer_weights is None:
        return None
    resolved = settings.layer_weights.resolve([l for ls in group_layers for l in ls], what="--layer-weights")
    return [jnp.asarray(w) for w in LW.for_groups(graphs, group_layers, resolved, settings.num_eigs)[0]]


def layer_weights_record(settings: Settings, geom: Geometry) -> dict:
    """summary.json's "layer_weights" of a gd run, as `whole.layer_weights` records exact's: {"rule", "weights":
    {layer: w}}, the per-layer weights (summing to 1) `_layer_weights` gives the step's graphs, each layer's shared
    by its timesteps' graphs — rule "uniform" for None (every graph alike, so every layer alike), "given" for
    numbers, else the rule's name (gd takes only rules that read no graph: `options.GRAPH_RULES` are exact's)."""
    from spectral_jax import layer_weights as LW

    layers = sorted(l for _, ls in geom.groups for l in ls)
    rule, w = LW.per_layer(layers, "uniform" if settings.layer_weights is None else settings.layer_weights)
    return {"rule": rule, "weights": {str(l): float(x) for l, x in zip(layers, w)}}     # unrounded, as exact's


def links(graphs) -> jax.Array:
    """The edges kept (weight > 0) between two distinct tokens over all `graphs` (`KnnGraph`s, `graphs.other_edges`):
    int32 scalar. 0 where every neighbour's cosine was at or below --min-cos."""
    return sum(G.other_edges(g.idx, g.w) for g in graphs)


def batch_graphs(apply: Callable, layers, settings: Settings, geom: Geometry, mesh: Mesh | None, params, x, valid
                 ) -> tuple[list[G.KnnGraph], jax.Array]:
    """One `graphs.knn` group per layer group over the batch's tokens: x `[B, H, W, 3]`, valid `[B]` → (graphs,
    nonfinite `[B]` int32). Diffusion taps (`geom.steps` T): one graph per (layer, timestep), a group `[L, T]`. The taps are checked where they arrive (`layout.tapped`: shapes while tracing; per
    image the first layer with NaN or Inf, −1 none): such an image is masked like an unreadable one and its
    features zeroed, so nothing of it reaches the graph."""
    taps, nonfinite = tapped(apply, params, x, layers)
    valid = valid & (nonfinite < 0)
    out = []
    for grid, group in geom.groups:
        k_intra, k_inter = geom.k_of(grid, settings.batch_size)
        keep = jnp.repeat(valid, grid[0] * grid[1])[:, None]
        a, b = (jnp.where(keep, y, 0) for y in G.knn_inputs([taps.layers[i] for i in group], settings.graph,
                                                             geom.steps))
        out.append(G.weight_edges(G.knn(a, b, grid, settings.batch_size, k_intra, k_inter, settings.min_cos,
                                        settings.block, valid=valid, mesh=mesh, axis=AXIS),
                                  a, settings.edge_weights, settings.seed, keep[:, 0])[0])
    return out, nonfinite


FRESH_STREAM = 0x7D1F        # folded into key(seed) before the step index: the fresh draws' own stream


def fresh_conditioning(seed: int, step, count: int, t_max: int, t_min: int = 0) -> tuple[jax.Array, jax.Array]:
    """The conditioning of gd step `step` (a traced int32 scalar: the run's global step index) under
    `timestep_draw="fresh"`: (timesteps int32 `[count]` i.i.d. ~ U{t_min..t_max}, noise key as uint32 key data),
    both from fold_in(fold_in(key(seed), FRESH_STREAM), step) — a function of (seed, step) only, so a resumed run
    draws what an uninterrupted one would. Jittable."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), FRESH_STREAM), step)
    k_t, k_noise = jax.random.split(key)
    ts = jax.random.randint(k_t, (count,), t_min, t_max + 1, dtype=jnp.int32)
    return ts, jax.random.key_data(k_noise)


def per_image_update(opt: optax.GradientTransformation, nimg: int, base: tuple[int, int]) -> Callable:
    """The optax update of a batch's node-layout X `[B·h·w, K]` with one optimizer state per image (leaves
    `[B, ...]`): `opt.update` mapped over the images' `[K, h, w]` rows (`from_nodes`/`to_nodes` move between the
    layouts exactly), for `solvers.gd.stiefel_step`."""
    def update(g, state, x):
        upd, state = jax.vmap(opt.update)(from_nodes(g, nimg, base), state, from_nodes(x, nimg, base))
        return to_nodes(upd), state

    return update


def solve_batch(settings: Settings, geom: Geometry, opt, graphs, ws, rows, ost, valid):
    """`inner_steps` optimizer steps on the batch's rows `[B, K, h, w]` (per-image optimizer state `ost`), with
    `solvers.gd`'s steps: `descent_step` on the paper loss (paper), `stiefel_step` on the Brockett cost
    `eigen_cost(c=brockett(K))` over the batch's nodes (eigen). Rows of invalid images (`valid` `[B]` False) and
    their optimizer state stay as they were (eigen: zeroed in the orthonormalised X).

    Returns (rows, ost, loss per step `[S]`, final loss, final Rayleigh objective Σ_k Σ_l w_l R_{l,k}).
    """
    vm = valid[:, None, None, None]
    keep = lambda new, old: jax.tree.map(
        lambda n, o: jnp.where(valid.reshape(-1, *[1] * (n.ndim - 1)), n, o), new, old)

    if settings.preset == "paper":
        maps = lambda r: jax.nn.softmax(r, axis=1) * vm
        loss_fn = lambda r: paper_loss(graphs, maps(r), ws, settings.lam)
        update = jax.vmap(opt.update)

        def inner(carry, _):
            r, s = carry
            loss, g = jax.value_and_grad(loss_fn)(r)
            r2, s2 = descent_step(update, r, g, s)
            return (keep(r2, r), keep(s2, s)), loss

        (rows, ost), hist = lax.scan(inner, (rows, ost), None, length=settings.inner_steps)
        return rows, ost, hist, loss_fn(rows), rayleigh(graphs, maps(rows), ws)[1]

    c = brockett(settings.num_eigs)
    nimg, base = settings.batch_size, geom.base
    cost = lambda xn: eigen_cost(graphs, from_nodes(xn, nimg, base), ws, c)
    update = per_image_update(opt, nimg, base)
    mask = to_nodes(jnp.broadcast_to(vm, (nimg, 1, *base)).astype(rows.dtype))        # [B·h·w, 1]

    def inner(carry, _):
        xn, s = carry
        val, g = jax.value_and_grad(cost)(xn)
        xn, s2 = stiefel_step(update, xn, g, s, mask)
        return (xn, keep(s2, s)), -val

    xn = retract(to_nodes(rows * vm))
    (xn, ost), hist = lax.scan(inner, (xn, ost), None, length=settings.inner_steps)
    x = from_nodes(xn, nimg, base)
    return x, ost, hist, -cost(xn), rayleigh(graphs, x, ws)[1]


def dataset_step(apply: Callable, layers, settings: Settings, geom: Geometry, mesh: Mesh, state: State, params,
                 x, idx, valid) -> tuple[State, Metrics, jax.Array]:
    """One step: x `[B, H, W, 3]` (sharded by image), idx `[B]` int32 (image of each slot, −1: padding),
    valid `[B]` bool (sharded: the file was read) → the new state, the step's metrics and nonfinite `[B]` int32
    (replicated: per slot the first layer whose taps held NaN or Inf, −1 none; such an image is left out of the
    step like an unreadable one, status `NONFINITE`). With `settings.timestep_draw == "fresh"` the params'
    timesteps and noise key are this step's draw first (`fresh_conditioning` of state.step)."""
    opt = make_optimizer(settings, geom)
    if settings.timestep_draw == "fresh":
        params = Backbone.conditioned(params, *fresh_conditioning(settings.seed, state.step, geom.steps,
                                                                  settings.t_max))
    graphs, nonfinite = batch_graphs(apply, layers, settings, geom, mesh, params, x, valid)
    rep = NamedSharding(mesh, P())
    nonfinite = lax.with_sharding_constraint(nonfinite, rep)
    read = lax.with_sharding_constraint(valid, rep)
    valid_r = read & (nonfinite < 0)
    slot = jnp.where(idx >= 0, idx, geom.rows)
    rows = _fetch(mesh, state.table, slot)
    ost = jax.tree.map(lambda s: _fetch(mesh, s, slot), state.opt)
    rows, ost, hist, loss, obj = solve_batch(settings, geom, opt, graphs, _layer_weights(settings, geom, graphs),
                                             rows, ost, valid_r)
    table = _put(mesh, state.table, idx, rows, valid_r)
    status = jnp.where(valid_r, READ, jnp.where(read, NONFINITE, UNREADABLE)).astype(jnp.int8)
    new = State(table, settings.ema * state.ema + (1.0 - settings.ema) * table,
                jax.tree.map(lambda s, r: _put(mesh, s, idx, r, valid_r), state.opt, ost),
                _put(mesh, state.status, idx, status, idx >= 0), state.step + 1)
    metrics = Metrics(hist[0], loss, obj, valid_r.sum(), links(graphs))
    return (lax.with_sharding_constraint(new, shardings(mesh, new)), lax.with_sharding_constraint(metrics, rep),
            nonfinite)


_dataset_step = jax.jit(dataset_step, static_argnums=(0, 1, 2, 3, 4))


def compile_step(backbone, layers, settings: Settings, geom: Geometry, mesh: Mesh, state: State, batch_spec):
    """`dataset_step` for this backbone, settings and mesh, compiled ahead of time (a failure here happens before
    the run writes anything). state: the (abstract) state; batch_spec: abstract (x, idx, valid) with shardings.
    Settings that only steer the run (epochs, checkpoints, …) are dropped from the static key (`Settings.step_key`),
    so a resume with more epochs reuses the compiled step. `timestep_draw="fresh"` with a backbone that holds no
    timesteps is one `InputError` here (`settings.check_timestep_draw`), before anything is written."""
    check_timestep_draw(settings, backbone.name, params_timesteps(backbone.params) is not None)
    rep = NamedSharding(mesh, P())
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), a.dtype, sharding=rep), backbone.params)
    return _dataset_step.lower(backbone.apply, layers, settings.step_key(), geom, mesh, state, params,
                               *batch_spec).compile()


__all__ = ["Metrics", "NONFINITE", "READ", "State", "UNREADABLE", "UNSEEN", "abstract_state", "batch_graphs",
           "compile_step", "dataset_step", "fresh_conditioning", "init_state", "layer_weights_record", "learning_rate",
           "links", "make_optimizer", "per_image_update", "solve_batch"]
