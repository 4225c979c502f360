"""The gradient solver: an optax loop, jit-compiled whole (`lax.scan` over steps), for what `exact` cannot do:
stochastic graphs (a random subset of layers/heads/timesteps each step), non-linear parameterisations (free
table, conv prior, softmax over K), dataset scale.

Presets
    eigen   X `[M0, K]` free; ascend the Rayleigh objective along its Stiefel (Riemannian) gradient, optax
            update, QR retraction — orthonormality kept every step; converges to the exact answer.
    paper   the official code's: X = softmax over K of a table or of a conv prior's output (3 convs over a
            learned random input), loss 2·mean|R − 1| + 2λ·mean off-diagonal (zᵀz')², Adam 2e-3.
Both end with a Rayleigh–Ritz step on the span of the final X (the official code takes an SVD of the same span),
so eigvecs come out orthonormal and sorted by Ritz value.

Every Result says whether the run converged (`Result.convergence`, a `Convergence` as `exact`'s): converged
(bool), criterion, iterations (= steps), tol, max_residual and residuals `[K]` — the relative residuals
‖A x − λ B x‖ / (‖A x‖ + |λ| ‖B x‖) of the Ritz pairs with the run's linearised operators (`exact.residuals`,
from the Rayleigh–Ritz step's own products: no further graph application) — and stationarity, the relative
change of the per-step history (objective or loss) between the last two windows of `STATIONARITY_WINDOW` of the
steps (`stationarity`; None below 2 steps). What converged means depends on the preset:
    eigen   max_residual ≤ tol (default `EIGEN_TOL`): the Ritz pairs are eigenpairs to that backward error.
    paper   stationarity ≤ tol (default `STATIONARITY_TOL`): the paper loss's fixed point is not an eigenbasis (its
            softmax maps are non-negative), so residuals do not go to 0; its own objective has stopped moving —
            unless the softmax saturated (`saturation` > `SATURATED`: a huge lr threw the logits apart and no
            gradient flows) or the maps collapsed onto one another (`spread` < `COLLAPSED`: lam too small) — a
            stuck point, not converged (`kind` says which). Maps that span fewer than K dimensions are an
            `InputError`: no K-dimensional Rayleigh–Ritz step.
A run that has not converged warns (RuntimeWarning) and says what to change. A run that left float32 (NaN or Inf:
lr far too large) is one `InputError` naming the step and the fix; there is nothing to report from it. The check
reads the history the loop returns anyway: no host round-trip is added inside the compiled loop.

Graphs that do not change between steps are small enough, by default, to build once (`materialize`): the eigen
preset without sampling then iterates on each group's Σ_s w_s sym(P_s) — the same objective and gradient — and the
paper preset (whose |R − 1| is per graph) or a sampled run on each graph's dense P, as the official code keeps it.
Larger problems stay matrix-free (blocked kernels, O(block·N) memory per graph).

The loop runs in `chunks` calls of one ahead-of-time compiled scan (progress shown between chunks); nothing is
traced or compiled again after the first chunk. The scan is `jax.jit` with the run's static configuration as a
static argument, so JAX's own caches hold the compiled program: a second run with the same settings and shapes
(the next image of a batch) neither traces nor compiles.

One update and one verdict for both solvers: the dataset solver (`spectral_jax.dataset.step`) takes the same steps
on each batch's rows — `stiefel_step` (eigen: `riemannian_grad`, an optax update, `retract`) on `eigen_cost` (with
the `brockett` weights there), `descent_step` (paper) on `objective.paper_loss` — with the optimizer of
`default_optimizer` (AdamW with the run's weight decay there), and its minibatch verdict is `stationarity_verdict`,
gd's paper verdict.

Shape legend
    B  images   K  vectors   (H0, W0)  base grid   M0 = B·H0·W0   C  conv-prior channels
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import warnings
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.linalg
from flax import nnx

from spectral_jax.errors import InputError
from spectral_jax.options import PRESETS, GdSpec, solver_spec  # noqa: F401  (PRESETS: read as solvers.gd.PRESETS)
from spectral_jax.graphs import DenseGraph, Graph
from spectral_jax.objective import (from_nodes, linear_operators, normalised_weights, paper_loss, rayleigh,
                                    weighted_sym_dense)
from spectral_jax.solvers.exact import as_list, check_problem, residuals
from spectral_jax.solvers.result import Convergence, Result, finish

EIGEN_TOL = 2e-2            # default tol of the eigen preset: max relative residual (see `gd`)
STATIONARITY_TOL = 1e-2     # default tol of the paper preset (and the dataset solver): stationarity (see `gd`)
STATIONARITY_WINDOW = 0.1   # the fraction of the steps in each of the two windows `stationarity` compares


class ConvPrior(nnx.Module):
    """'Deep image prior' parameterisation: 3 conv layers over a learned random input → K logits per pixel.

    Output `[B, H0, W0, K]` logits (the paper preset takes a softmax over K).
    """

    def __init__(self, num_eigs: int, num_images: int, grid: tuple[int, int], channels: int = 32,
                 hidden: int = 64, *, rngs: nnx.Rngs):
        self.input = nnx.Param(jax.random.uniform(rngs.params(), (num_images, *grid, channels), jnp.float32))
        self.conv1 = nnx.Conv(channels, hidden, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(hidden, hidden, (3, 3), rngs=rngs)
        self.conv3 = nnx.Conv(hidden, num_eigs, (3, 3), rngs=rngs)

    def __call__(self) -> jax.Array:
        h = nnx.relu(_conv3x3(self.input[...], self.conv1))
        h = nnx.relu(_conv3x3(h, self.conv2))
        return _conv3x3(h, self.conv3)


def _conv3x3(x: jax.Array, conv: nnx.Conv) -> jax.Array:
    """`conv(x)` (a 3×3 'SAME' nnx.Conv, stride 1, with bias) as one matmul over the 9 shifted copies of x
    `[B, H, W, C]` → `[B, H, W, C']`: the same numbers to float32 rounding, but inside `lax.scan` (gd's loop) XLA:CPU
    runs it — and its gradient — as matmuls, where it emits a convolution's weight gradient with LLVM, unfused and
    ~10× slower (a 32×32 prior's step inside the scan: 60.1 ms with XLA convs, 6.2 ms this way, on a 2-core CPU:
    `benchmarks/results/solvers.md`, Diagnostics). 9× the activations' memory, which at a prior's sizes (one
    image's grid × 64 channels) is nothing."""
    h, w = x.shape[1], x.shape[2]
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    cols = jnp.concatenate([xp[:, i:i + h, j:j + w, :] for i in range(3) for j in range(3)], axis=-1)
    kernel = conv.kernel[...]                                    # [3, 3, C, C'], HWIO: rows in (i, j, c) order
    return cols @ kernel.reshape(-1, kernel.shape[-1]) + conv.bias[...]


@dataclasses.dataclass(frozen=True)
class _Config:
    """Everything static about a run (hashable: the static argument the compiled chunk is keyed on)."""

    preset: str
    param: str
    base: tuple[int, int]
    num_images: int
    num_eigs: int
    chunk: int
    sample: float | None
    lam: float
    optimizer: Any
    graphdef: Any = None


class Carry(NamedTuple):
    """The loop's state between steps (and chunks)."""

    params: Any                 # eigen: X `[M0, K]`; paper: logits `[B, H0, W0, K]` or the conv prior's nnx.State
    opt_state: Any              # the optimizer's state for params
    key: jax.Array              # PRNG key of the graph sampling
    step: jax.Array             # int32 scalar: steps taken


def default_lr(preset: str, num_nodes: int, *, level: str = "image") -> float:
    """The default learning rate (Adam/AdamW) of `preset` for X over `num_nodes` nodes.

    eigen: 0.5/√num_nodes (entries of unit columns are ~1/√num_nodes; Adam's step is scale-free, so one default
    holds across graph types, whose spectra differ — plain SGD's stable step is 2/(λmax − λmin) of the Riemannian
    Hessian and must be tuned per graph); paper: the official code's, 2e-3 for one image (level "image") and 1e-2
    for its dataset run (level "dataset").
    """
    if preset == "eigen":
        return 0.5 / math.sqrt(num_nodes)
    return 1e-2 if level == "dataset" else 2e-3


@functools.lru_cache(maxsize=64)
def default_optimizer(preset: str, lr: float | None, num_nodes: int, *, level: str = "image",
                      weight_decay: float | None = None) -> optax.GradientTransformation:
    """The optimizer of both solvers: Adam (weight_decay None: one image's `gd`) or AdamW with that weight decay (the
    dataset solver, as the official code's dataset run), lr `default_lr(preset, num_nodes, level=level)` unless
    given. Cached: the same arguments give the same (stateless) transformation, so a repeated run reuses its
    compiled loop."""
    lr = default_lr(preset, num_nodes, level=level) if lr is None else lr
    return optax.adam(lr) if weight_decay is None else optax.adamw(lr, weight_decay=weight_decay)


def brockett(k: int) -> jax.Array:
    """The Brockett weights c `[K]` float32, decreasing from 1 to ½: maximising Σ_k c_k R_k orders the columns
    (column k tends to the k-th eigenvector) where the plain objective Σ_k R_k only finds their span."""
    return jnp.linspace(1.0, 0.5, k, dtype=jnp.float32)


def eigen_cost(graphs: Sequence[Graph], x: jax.Array, weights=None, c: jax.Array | None = None) -> jax.Array:
    """What the eigen preset ascends, for x `[B, K, H0, W0]`: the objective Σ_k Σ_l w_l R_{l,k}
    (`objective.rayleigh`) for c None (one image's `gd`: its Rayleigh–Ritz step orders the columns), or the
    Brockett cost Σ_k c_k Σ_l w_l R_{l,k} (the dataset solver, `brockett`; w normalised as in `rayleigh`)."""
    rqs, obj = rayleigh(graphs, x, weights)
    if c is None:
        return obj
    return sum(jnp.sum(w[..., None] * r * c) for r, w in zip(rqs, normalised_weights(graphs, weights)))


def stiefel_step(update: Callable, x: jax.Array, egrad: jax.Array, state, mask: jax.Array | None = None):
    """One ascent step of the eigen preset, shared by `gd` and the dataset solver: the Euclidean gradient `egrad`
    `[M, K]` of the cost at orthonormal x `[M, K]` projected on the Stiefel tangent space (`riemannian_grad`),
    its negation (optax minimises) through the optax update `update(g, state, x) → (updates, state)` (an
    optimizer's `update`, or the dataset's per-image one), the update applied (`optax.apply_updates`), rows with
    mask 0 zeroed (`mask` `[M, 1]`; None keeps all), then `retract`. Returns (x, state)."""
    updates, state = update(-riemannian_grad(x, egrad), state, x)
    y = optax.apply_updates(x, updates)
    return retract(y if mask is None else y * mask), state


def descent_step(update: Callable, params, grad, state):
    """One step of the paper preset, shared by `gd` and the dataset solver: `update(grad, state, params)` (the
    optimizer's, or the dataset's per-image one) applied by `optax.apply_updates`. Returns (params, state)."""
    updates, state = update(grad, state, params)
    return optax.apply_updates(params, updates), state


def riemannian_grad(x: jax.Array, grad: jax.Array) -> jax.Array:
    """The gradient `grad` `[M, K]` of a function at orthonormal x `[M, K]` projected onto the tangent space of the
    Stiefel manifold (embedded metric): G − X sym(XᵀG), sym(A) = ½(A + Aᵀ)."""
    sym = x.T @ grad
    return grad - x @ (0.5 * (sym + sym.T))


def retract(x: jax.Array) -> jax.Array:
    """Retraction onto the Stiefel manifold: the Q of x = QR with R's diagonal positive, by CholeskyQR2.

    Two passes of Q = x·L⁻ᵀ with L = chol(xᵀx): O(M0·K²) in K×K Choleskys, instead of XLA's CPU Householder QR of a
    tall [M0, K] matrix, which costs more than the whole rest of a step (benchmarks/results/history.md).
    """
    for _ in range(2):
        gram = x.T @ x
        low = jnp.linalg.cholesky(gram + 1e-7 * jnp.trace(gram) / x.shape[1] * jnp.eye(x.shape[1], dtype=x.dtype))
        inv = jax.scipy.linalg.solve_triangular(low, jnp.eye(x.shape[1], dtype=x.dtype), lower=True)   # K×K
        x = x @ inv.T
    return x


def _orthonormal_basis(x: np.ndarray) -> np.ndarray:
    """An orthonormal basis of span(x) `[M0, K]` (float64, host) that tolerates (near-)dependent columns (e.g. a
    collapsed softmax channel): x V S⁻¹ from the Gram's eigendecomposition, singular values floored, done twice."""
    for _ in range(2):
        s2, v = np.linalg.eigh(x.T @ x)
        x = x @ (v / np.sqrt(np.maximum(s2, 1e-12 * np.max(s2)))[None, :])
    return x


def _sample(graphs, ws, frac, key):
    """A random subset (fraction `frac`, at least one) of each group's graphs; weights rescaled per group."""
    out_g, out_w = [], []
    for i, (g, w) in enumerate(zip(graphs, ws)):
        m = max(1, int(round(frac * g.num_graphs)))
        if m >= g.num_graphs:
            out_g.append(g), out_w.append(w)
            continue
        idx = jax.random.choice(jax.random.fold_in(key, i), g.num_graphs, (m,), replace=False)
        sel = w.reshape(-1)[idx]
        out_g.append(g.select(idx))
        out_w.append(sel * jnp.sum(w) / jnp.maximum(jnp.sum(sel), 1e-30))
    return out_g, out_w


def _maps(cfg: _Config, params) -> jax.Array:
    """The parameterisation's X `[B, K, H0, W0]`."""
    if cfg.preset == "eigen":
        return from_nodes(params, cfg.num_images, cfg.base)
    logits = nnx.merge(cfg.graphdef, params)() if cfg.param == "conv" else params     # [B, H0, W0, K]
    return jnp.transpose(jax.nn.softmax(logits, axis=-1), (0, 3, 1, 2))


def gd_chunk(cfg: _Config, graphs, ws, carry: Carry) -> tuple[Carry, jax.Array]:
    """`cfg.chunk` steps of the loop (`lax.scan`): (carry, objective (eigen) or loss (paper) per step `[chunk]`)."""

    def step(carry: Carry, _):
        params, opt_state = carry.params, carry.opt_state
        gs, gw = (graphs, ws) if cfg.sample is None else _sample(graphs, ws, cfg.sample,
                                                                    jax.random.fold_in(carry.key, carry.step))
        if cfg.preset == "eigen":
            value, grad = jax.value_and_grad(lambda p: eigen_cost(gs, _maps(cfg, p), gw))(params)
            params, opt_state = stiefel_step(cfg.optimizer.update, params, grad, opt_state)
        else:
            value, grad = jax.value_and_grad(lambda p: paper_loss(gs, _maps(cfg, p), gw, cfg.lam))(params)
            params, opt_state = descent_step(cfg.optimizer.update, params, grad, opt_state)
        return Carry(params, opt_state, carry.key, carry.step + 1), value

    return jax.lax.scan(step, carry, None, length=cfg.chunk)


_gd_chunk = jax.jit(gd_chunk, static_argnums=0)


def _eigen_init(seed: int, m0: int, k: int) -> jax.Array:
    """Orthonormal random start `[M0, K]` from `seed`: Q of a Gaussian's QR with R's diagonal positive (what
    `retract` gives), on the host with numpy (op by op in JAX, the first call would compile each op)."""
    x = np.random.default_rng(np.random.SeedSequence([seed, 0x51A7])).standard_normal((m0, k))
    q, r = np.linalg.qr(x)
    return jnp.asarray(q * np.where(np.diag(r) < 0, -1.0, 1.0), jnp.float32)


def _compiled_chunk(cfg: _Config, work, work_w, carry: Carry):
    """The chunk compiled ahead of time for this configuration and these argument shapes. `cfg` is a static
    argument of the jitted chunk, so JAX's tracing and compilation caches make a second run with the same settings
    and shapes (the next image of a batch) skip both; an unhashable user optimizer compiles every time."""
    try:
        hash(cfg)
    except TypeError:
        return jax.jit(functools.partial(gd_chunk, cfg)).lower(work, work_w, carry).compile()
    return _gd_chunk.lower(cfg, work, work_w, carry).compile()


def _init(cfg: _Config, key, seed: int) -> Any:
    if cfg.preset == "eigen":
        return _eigen_init(seed, cfg.num_images * cfg.base[0] * cfg.base[1], cfg.num_eigs), None
    if cfg.param == "conv":
        model = ConvPrior(cfg.num_eigs, cfg.num_images, cfg.base, rngs=nnx.Rngs(params=key))
        graphdef, params = nnx.split(model, nnx.Param)
        return params, graphdef
    return 0.1 * jax.random.normal(key, (cfg.num_images, *cfg.base, cfg.num_eigs), jnp.float32), None


def _chunk_size(steps: int, chunks: int) -> int:
    """The divisor of `steps` closest to steps/chunks (so every chunk has the same length: one compile)."""
    target = max(1, steps / max(chunks, 1))
    divisors = [d for d in range(1, steps + 1) if steps % d == 0]
    return min(divisors, key=lambda d: (abs(math.log(d / target)), d))


def gd(graphs, num_eigs: int = 20, weights=None, base_grid=None, *, options: GdSpec | None = None, seed: int = 0,
       **fields) -> Result:
    """Gradient solve of the layer-distributed objective.

    graphs: a graph or list of graph groups; weights: per-group arrays of batch shape (None: equal); base_grid: the
    grid X lives on (None: the largest); seed: initialisation and sampling. options: an `options.GdSpec` (checked
    when it was made) — or its fields as keywords, made into one here (`options.solver_spec`: a name that is not a
    GdSpec field, or fields beside options=, is one `InputError`; progress may go beside options=). The run reads
    only the spec: preset "eigen" or "paper"; param "table" or "conv" (paper only); steps: optimizer updates
    (default 150 eigen, 1000 paper); lr / optimizer (default: the preset's Adam, `default_optimizer`); sample:
    fraction of each group's graphs drawn per step (None: all); lam: the paper loss's orthogonality weight;
    chunks: compiled calls the steps run in (progress shown between them); materialize: build the graphs' dense P
    once (None: when every grid has ≤ `dense_max` nodes and the dense arrays take ≤ `dense_bytes`); False keeps
    every step matrix-free.
    tol: the convergence threshold (module docstring; None: the preset's default). eigen: the max relative
    residual of the Ritz pairs, `EIGEN_TOL` = 2e-2 (Adam at a constant lr does not go much lower with more steps).
    paper: the stationarity, the share of the loss's change made by the last tenth of the steps (0.1 on a steady
    slope), `STATIONARITY_TOL` = 1e-2; the default 1000 steps usually do not reach it (the loss still falls) and
    say so. The measurements behind both: benchmarks/results/history.md.
    Returns a `Result` (eigvecs `[B, K, H0, W0]`, Ritz values as eigvals; history: objective (eigen) or loss
    (paper) per step; convergence: the verdict, with a RuntimeWarning when not converged; info: compile seconds,
    preset, param, lr (the one used: the preset's default where none was given; None with your own optimizer),
    lam (the paper preset's; None for eigen), history kind, sample, materialized).
    """
    s = solver_spec("gd", options, **fields)
    preset, steps, lr, sample = s.preset, s.steps, s.lr, s.sample
    graphs = as_list(graphs)
    base, nimg, m0 = check_problem(graphs, num_eigs, base_grid)
    steps = (150 if preset == "eigen" else 1000) if steps is None else int(steps)
    ws = normalised_weights(graphs, weights)
    t0 = time.perf_counter()
    work, work_w = _materialized(graphs, ws, preset == "eigen" and sample is None, s.materialize, s.dense_max,
                                 s.dense_bytes)
    if s.optimizer is None:
        lr = default_lr(preset, m0) if lr is None else lr
    opt = s.optimizer or default_optimizer(preset, lr, m0)
    key_init, key_run = jax.random.split(jax.random.key(seed))
    cfg = _Config(preset, s.param, base, nimg, num_eigs, _chunk_size(steps, s.chunks), sample,
                  1.0 if s.lam is None else float(s.lam), opt)
    params, graphdef = _init(cfg, key_init, seed)
    cfg = dataclasses.replace(cfg, graphdef=graphdef)
    carry = Carry(params, opt.init(params), key_run, jnp.zeros((), jnp.int32))

    tc = time.perf_counter()
    compiled = _compiled_chunk(cfg, work, work_w, carry)
    compile_s = time.perf_counter() - tc
    bar = _progress(s.progress, steps)
    hist = []
    for _ in range(steps // cfg.chunk):
        carry, h = compiled(work, work_w, carry)
        hist.append(h)
        if bar is not None:
            bar.update(cfg.chunk)
    history = np.concatenate([np.asarray(h) for h in jax.block_until_ready(hist)])
    if bar is not None:
        bar.close()
    maps = np.asarray(_maps(cfg, carry.params))        # [B, K, H0, W0] on the host: the checks and the Ritz step
    _check_diverged(preset, history, maps, None if s.optimizer else (lr, default_lr(preset, m0)))
    spread = _check_spread(maps, cfg.lam) if preset == "paper" else None
    vals, vecs, res = _ritz(work, work_w, base, nimg, maps)
    seconds = time.perf_counter() - t0
    same = all(tuple(g.grid) == base for g in graphs)
    return finish(graphs, ws, vecs, vals, nimg, base, steps=steps, seconds=seconds, method=f"gd-{preset}",
                  history=history, metric=None if same else linear_operators(graphs, ws, base, nimg)[1],
                  info={"compile_seconds": round(compile_s, 4), "preset": preset, "param": s.param, "lr": lr,
                        "lam": cfg.lam if preset == "paper" else None,
                        "history_kind": "objective" if preset == "eigen" else "loss", "sample": sample,
                        "materialized": work is not graphs},
                  convergence=convergence(preset, history, res, steps, s.tol,
                                          saturation(maps) if preset == "paper" else None, spread))


def _check_diverged(preset: str, history: np.ndarray, maps: np.ndarray, lrs: tuple[float, float] | None) -> None:
    """One `InputError` when the run left float32 (a NaN or Inf loss, or maps `[B, K, H0, W0]`): the learning rate
    too large for the problem — or, where the loss at the start (before any update) is not finite, the graphs.
    lrs: (the run's lr, the preset's default), None with the caller's own optimizer. Nothing is left to report
    from such a run: its maps hold no eigenvectors, and the Rayleigh–Ritz step would fail inside LAPACK."""
    bad = np.flatnonzero(~np.isfinite(history))
    if bad.size == 0 and np.isfinite(maps).all():
        return
    if bad.size and bad[0] == 0:           # the loss at the start, before any update: the graphs, not lr
        raise InputError("graphs", "the problem's matrix holds NaN or inf (the loss at gd's start is not finite: "
                         "features or weights not finite?)", "pass finite features")
    when = f"at step {bad[0] + 1} of {history.size}" if bad.size else f"after its last step ({history.size})"
    what = "loss" if preset == "paper" else "objective"
    at, fix = ((f" at lr {lrs[0]:g}", f"lower lr (the preset's default here is {lrs[1]:.2g})") if lrs else
               ("", "lower your optimizer's step size"))
    raise InputError(f"gd-{preset}", f"diverged: the {what} left float32 (NaN or Inf) {when}{at}",
                     f"{fix}, or use method='exact'")


COLLAPSED = 0.05  # a paper run whose maps' `spread` is below it has collapsed onto fewer directions than K
RANK_TOL = 1e-6   # below it the maps span fewer than K dimensions: no K-dimensional Rayleigh–Ritz step


def spread(maps: jax.Array) -> float:
    """How far apart the K maps `[B, K, H0, W0]` are: σ_min / σ_max of them as unit columns `[M0, K]` (float64,
    host). 1 for orthogonal maps (the eigen preset's); 0.5–0.8 after a paper run at its defaults; ≲ 1e-2 where the
    orthogonality weight lam is too small to keep the softmax maps apart and they collapse onto one another. From
    the K×K triangular factor R of the maps' QR, updated one image at a time (R ← R of [R; image's maps]: a
    dataset's maps are never copied whole); X and R have the same column norms and singular values, so the ratio is
    as exact as an SVD of the whole — a one-map-repeated set reads ≈ 1e-16, not the ≈ 1e-8 floor of a Gram
    matrix's square root."""
    maps = np.asarray(maps)                                      # on the host (a numpy array is not copied)
    k = maps.shape[1]
    r = np.zeros((0, k))
    for m in maps:                                               # [K, H0, W0] each
        r = np.linalg.qr(np.vstack([r, np.asarray(m, np.float64).reshape(k, -1).T]), mode="r")
    d = np.maximum(np.linalg.norm(r, axis=0), 1e-300)            # the maps' norms
    sv = np.linalg.svd(r / d[None, :], compute_uv=False)         # the unit maps' singular values, descending
    return float(sv[-1] / sv[0]) if sv.size == k else 0.0


def _check_spread(maps: jax.Array, lam: float) -> float:
    """The paper maps' `spread`; one `InputError` when they span fewer than K dimensions (`RANK_TOL`): the
    Rayleigh–Ritz step has no K-dimensional span to work on."""
    sp = spread(maps)
    if sp < RANK_TOL:
        raise InputError("gd-paper", f"the {maps.shape[1]} maps collapsed onto fewer dimensions (their spread "
                         f"{sp:.1e}) at lam {lam:g}: the orthogonality term is too weak to keep them apart",
                         "raise lam (the paper's is 1), or use method='exact'")
    return sp


SATURATED = 0.5   # the share of one-hot nodes (`saturation`) above which a paper run is stuck, not settled


def saturation(maps: jax.Array) -> float:
    """The share of nodes whose softmax over K (maps `[B, K, H0, W0]`, the paper preset's X) is one-hot to float32
    rounding — its largest entry exactly 1, so the softmax passes no gradient there. ≈ 0 at the preset's learning
    rates (a logit moves about lr per Adam step, and one-hot needs gaps ≳ 17); ≈ 1 where a huge lr threw the
    logits apart in a step or two and the loss then stood still at whatever point that was."""
    return float(np.mean(np.max(np.asarray(maps), axis=1) == 1.0))


def saturated_why(saturated: float) -> str:
    """Why a still loss is not convergence when the paper maps saturated (`saturation` above `SATURATED`): one
    clause, shared by `convergence` and the dataset's minibatch verdict and warning."""
    return (f"the softmax maps saturated ({saturated:.1%} of the nodes one-hot to float32 rounding, where no "
            "gradient flows): a stuck point, not a fixed point")


def collapsed_why(spread: float) -> str:
    """Why a still loss is not convergence when the paper maps collapsed (`spread` below `COLLAPSED`): one clause,
    shared by `convergence` and the dataset's minibatch verdict and warning."""
    return (f"the maps collapsed onto one another (their spread {spread:.1e} < {COLLAPSED:g}: σ_min/σ_max of the "
            "unit maps): the orthogonality term is too weak to keep them apart")


def stationarity(values, window: int, start: float | None = None) -> float | None:
    """How much a per-step series `[S]` (loss or objective) still moves: |m₁ − m₀| / |start − m₁|, m₁ the mean
    of its last `window` steps, m₀ of the `window` steps before them, start its first value unless given — the
    share of the run's whole change that its last window still made (≈ window / S on a steady slope, → 0 at a
    fixed point, whatever the learning rate's scale). None when S < 2·window, and when the run never moved: its
    whole change |start − m₁| within `UNMOVED` of |start| or |m₁| (float32 rounding: a learning rate too small to
    change the loss) — there is no change to measure the last window's against, and a still loss there is not
    a fixed point found (`unmoved` tells the two Nones apart). Window means smooth the optimizer's step-to-step
    noise (Adam's, a sampled graph's, a minibatch's)."""
    v = np.asarray(values, np.float64).reshape(-1)
    window = int(window)
    if window < 1 or v.size < 2 * window or unmoved(v, window, start):
        return None
    last, before = v[-window:].mean(), v[-2 * window:-window].mean()
    total = abs((v[0] if start is None else float(start)) - last)
    return float(abs(last - before) / total)


UNMOVED = 64 * float(np.finfo(np.float32).eps)   # a whole change this small, relative to the loss, is rounding


def unmoved(values, window: int, start: float | None = None) -> bool:
    """Whether a per-step series `[S]` never moved: its last `window` steps' mean within `UNMOVED` (relative) of
    `start` (None: its first value). False for a series shorter than `window`."""
    v = np.asarray(values, np.float64).reshape(-1)
    if int(window) < 1 or v.size < int(window):
        return False
    first = v[0] if start is None else float(start)
    last = v[-int(window):].mean()
    return bool(abs(first - last) <= UNMOVED * max(abs(first), abs(last)))


def stationarity_verdict(values, window: int, tol: float = STATIONARITY_TOL, start: float | None = None, *,
                         residuals=None, kind: str | None = None) -> Convergence:
    """The stationarity verdict, shared by gd's paper preset and the dataset's minibatch gd: converged when the
    last `window` steps of `values` `[S]` made ≤ `tol` of the run's change since `start` (`stationarity`; not
    converged before two windows, nor when the run never moved); iterations S; residuals `[K]` (the Ritz pairs', where computed) and kind
    reported with it."""
    moved = stationarity(values, window, start)
    res = None if residuals is None else np.asarray(residuals, np.float64)
    return Convergence(moved is not None and moved <= tol, np.size(values), tol, "stationarity <= tol",
                       None if res is None else float(res.max()), () if res is None else tuple(res), moved, window,
                       kind)


def convergence(preset: str, history, res, steps: int, tol: float | None = None,
                saturated: float | None = None, spread: float | None = None) -> Convergence:
    """The verdict of a gd run (module docstring): history `[S]` per step, res `[K]` the Ritz pairs' relative
    residuals, saturated and spread the paper maps' `saturation` and `spread` (above `SATURATED`, or below
    `COLLAPSED`, a still loss is a stuck point: not converged, and `kind` says why); warns (RuntimeWarning, one
    line with the fix) when not converged."""
    tol = float((EIGEN_TOL if preset == "eigen" else STATIONARITY_TOL) if tol is None else tol)
    res = np.asarray(res, np.float64)
    window = max(1, int(round(STATIONARITY_WINDOW * steps)))
    verdict = stationarity_verdict(history, window, tol, residuals=res)
    if preset == "eigen":
        verdict = dataclasses.replace(verdict, converged=bool(res.max() <= tol), criterion="max_residual <= tol")
        why = f"max relative residual {res.max():.2e} > tol {tol:.1e}"
    else:
        moved = verdict.stationarity
        why = (f"loss still moving (its last {window} steps made {moved:.1e} of the run's change > tol {tol:.1e})"
               if moved is not None else
               f"{steps} step(s) are too few to tell whether the loss has settled" if np.size(history) < 2 * window
               else f"the loss never moved from its start (within float32 rounding over {steps} steps: lr too "
               "small to change it)")
    fix = "raise steps (or tune lr)"
    stuck = preset == "paper" and verdict.converged     # a still loss: a fixed point, or stuck (not converged)
    if stuck and saturated is not None and saturated > SATURATED:
        why = saturated_why(saturated)
        fix = "lower lr"
        verdict = dataclasses.replace(verdict, converged=False, kind=why)
    elif stuck and spread is not None and spread < COLLAPSED:
        why = collapsed_why(spread)
        fix = "raise lam (the paper's is 1)"
        verdict = dataclasses.replace(verdict, converged=False, kind=why)
    if not verdict.converged:
        warnings.warn(f"gd-{preset}: not converged after {steps} steps: {why}; {fix}, or use method='exact'",
                      RuntimeWarning, stacklevel=3)
    return dataclasses.replace(verdict, iterations=steps)


def _materialized(graphs, ws, aggregate: bool, materialize, dense_max: int, dense_bytes: float):
    """The graphs the loop iterates on: the originals, or dense ones built once (see the module docstring)."""
    if materialize is False:
        return graphs, ws
    n = [g.num_nodes for g in graphs]
    size = 4 * sum(k * k * (1 if aggregate else g.num_graphs) for k, g in zip(n, graphs))
    if materialize is None and (max(n) > dense_max or size > dense_bytes):
        return graphs, ws
    if aggregate:       # Σ_s w_s zᵀ P_s z = zᵀ (Σ_s w_s sym(P_s)) z: one operator per group, weight Σ_s w_s
        # (a group weighing 0 in all — a layer a mapping leaves out — keeps weight 0: divided by 1, not 0/0 = NaN)
        dense = [DenseGraph(weighted_sym_dense(g, w) / jnp.where(jnp.sum(w) > 0, jnp.sum(w), 1.0), g.grid, (),
                            g.num_images) for g, w in zip(graphs, ws)]
        return dense, [jnp.sum(w) for w in ws]
    return [DenseGraph(g.dense(), g.grid, g.batch_shape, g.num_images) for g in graphs], ws


def _progress(progress, total):
    if not progress:
        return None
    if callable(progress):
        return progress(total)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="gd", unit="step", leave=False)


def _ritz(graphs: Sequence[Graph], ws, base, nimg, x):
    """Rayleigh–Ritz on span(x): x `[B, K, H0, W0]` → (Ritz values `[K]`, vectors `[M0, K]`, their relative
    residuals `[K]`), largest first.

    Orthonormal in the linearised objective's B (= I when all graphs share the base grid). A and B are applied
    once, in one compiled program; the K×K algebra runs on the host in float64 (no per-op compiles). The residuals
    (`exact.residuals`) use the same products: A x = (A Q) y and B x = (B Q) y for x = Q y.
    """
    x = np.asarray(x, np.float64)
    q = _orthonormal_basis(np.transpose(x, (0, 2, 3, 1)).reshape(-1, x.shape[1]))
    aq, bq = (np.asarray(v, np.float64) for v in _apply_ab(graphs, ws, base, nimg, jnp.asarray(q, jnp.float32)))
    t, s = q.T @ aq, q.T @ bq
    low = np.linalg.cholesky(0.5 * (s + s.T))
    c = scipy.linalg.solve_triangular(low, scipy.linalg.solve_triangular(low, t, lower=True).T, lower=True)
    vals, y = np.linalg.eigh(0.5 * (c + c.T))
    y = scipy.linalg.solve_triangular(low.T, y, lower=False)[:, ::-1]
    vals = vals[::-1]
    res = residuals(lambda _: aq @ y, lambda _: bq @ y, q @ y, vals)
    return vals, q @ y, np.asarray(res, np.float64)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _apply_ab(graphs: Sequence[Graph], ws, base, nimg, q):
    """(A q, B q) of the linearised objective, q `[M0, K]`."""
    a_op, b_op, _ = linear_operators(graphs, ws, base, nimg)
    return a_op(q), b_op(q)
