"""The compiled k-means of `analysis.cluster.kmeans`: k-means++ seeding and Lloyd iterations of n_init seeded runs as
one JAX program (`_runs`), with the padding that lets calls of different N and k share programs. Imported by
`kmeans` on first use, so `import spectral_jax.analysis` needs no JAX.

Structure: seeding in a `lax.fori_loop` over centres, Lloyd in a `lax.while_loop`, the `n_init` runs one after another
in a `lax.scan` that keeps the best labels by inertia (memory: one run's O(Np·kp) scores, never N×N and not n_init
copies; a vmap over runs would also make every run wait for the slowest one's iterations).

Precision: float32 on data the caller has centred on its mean. The assignment is the argmin over centres of
|c|² − 2x·c (the squared distance less |x|², which every centre shares), the matmul at HIGHEST precision (no TF32
on GPUs). Centring makes |x| and |c| of the order of the clusters' spread rather than of the data's offset from
the origin, so float32 rounding (~1e-7·|x|·|c|) only decides ties closer than that; seeding distances are Σ (x − c)²
(no cancellation). The caller recomputes the centres and the inertia of the winning labels in float64.

Recompilation: `_runs` compiles once per (Np, kp, F, n_init, trials; trials defaults to a function of kp): Np is N
rounded up to 2^e·{1, 1.25, 1.5, 1.75} (≤ 25 % padding, at least 256), kp is k rounded up to a power of two (at
least 16: every k ≤ 16 shares one program). seed, k and N within their buckets, iters and tol are traced: a
silhouette scan over k = 2…10 on images of one size compiles one program, once per process (the CLI's persistent
compilation cache keeps it between runs; compile and call times: benchmarks/results/history.md). The floor costs a k ≤ 8 call at most twice the
assignment matmul's columns, which only counts at dataset scale, where k ≤ 20 sits in kp = 32 anyway.

Shape legend
    N  points   F  features   k  clusters   Np, kp  N and k padded to their buckets   T  k-means++ candidates per centre
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_HI = lax.Precision.HIGHEST


def _bucket_n(n: int) -> int:
    """Padded point count Np: the smallest 2^e·(4 + j)/4 (j = 0…3) that is ≥ n, at least 256."""
    if n <= 256:
        return 256
    step = 1 << (math.floor(math.log2(n - 1)) - 2)
    return -(-n // step) * step


def _bucket_k(k: int) -> int:
    """Padded cluster count kp: the next power of two ≥ k, at least 16 (one program for the auto-k scan 2…10)."""
    return max(16, 1 << (int(k) - 1).bit_length())


def _sqdist_to(x, c):
    """Σ_f (x − c)² `[Np]` of points x `[Np, F]` to one point c `[F]` (no cancellation)."""
    return jnp.sum((x - c[None, :]) ** 2, 1)


def _seed_pp(key, x, valid, k, kp: int, trials: int):
    """k-means++ seeding: centres `[kp, F]` (rows ≥ k zero) of points x `[Np, F]` (valid `[Np]` bool). The first
    centre is uniform over the valid points; each next one is drawn with probability ∝ D², D = distance to the
    nearest centre so far (Gumbel-max over log D², so no float32 cumulative sum decides the draw). With `trials`
    T > 1, T candidates are drawn and the one that leaves the smallest Σ D² is kept ("greedy k-means++", Arthur &
    Vassilvitskii 2007 §6, scikit-learn's default). When every D is 0 (fewer distinct points than k) the draw is
    uniform over the valid points."""
    uniform = jnp.where(valid, 0.0, -jnp.inf)
    k0, key = jax.random.split(key)
    first = x[jax.random.categorical(k0, uniform)]
    c = jnp.zeros((kp, x.shape[1]), x.dtype).at[0].set(first)
    d = jnp.where(valid, _sqdist_to(x, first), 0.0)  # [Np] D² to the nearest centre

    def body(j, carry):
        c, d = carry
        logits = jnp.where(jnp.any(d > 0), jnp.where(d > 0, jnp.log(jnp.where(d > 0, d, 1.0)), -jnp.inf), uniform)
        cand = jax.random.categorical(jax.random.fold_in(key, j), logits, shape=(trials,))  # [T]
        d_new = jnp.minimum(d[None, :], jnp.where(valid, jax.vmap(lambda i: _sqdist_to(x, x[i]))(cand), 0.0))
        best = jnp.argmin(jnp.sum(d_new, 1))
        return c.at[j].set(x[cand[best]]), d_new[best]

    return lax.fori_loop(1, k, body, (c, d))[0]


def _fill_empty(labels, counts, own, valid, active):
    """Every empty active cluster j takes the valid point farthest from its own centre among clusters that keep
    at least one point (`own` `[Np]` squared distance to the own centre); returns (labels `[Np]`, counts `[kp]`)."""

    def one(j, carry):
        labels, counts, own = carry

        def take(carry):
            labels, counts, own = carry
            far = jnp.argmax(jnp.where(valid & (counts[labels] > 1), own, -1.0))
            counts = counts.at[labels[far]].add(-1).at[j].set(1)
            return labels.at[far].set(j), counts, own.at[far].set(-1.0)

        return lax.cond(active[j] & (counts[j] == 0), take, lambda c: c, carry)

    return lax.fori_loop(0, counts.shape[0], one, (labels, counts, own))[:2]


def _lloyd(x, valid, c, k, iters, tol):
    """Lloyd iterations of x `[Np, F]` from centres c `[kp, F]` until the assignments stop changing, the centres'
    total squared move is ≤ tol, or `iters` iterations. Returns (labels `[Np]` int32, centres = their means
    `[kp, F]`, inertia, converged: whether a stopping rule other than `iters` ended it)."""
    kp = c.shape[0]
    active = jnp.arange(kp) < k
    w = valid.astype(x.dtype)
    x2 = jnp.sum(x * x, 1)

    def step(state):
        it, labels, c, _ = state
        s = jnp.where(active[None, :], jnp.sum(c * c, 1)[None, :] - 2.0 * jnp.dot(x, c.T, precision=_HI), jnp.inf)
        new = jnp.argmin(s, 1).astype(jnp.int32)
        counts = jax.ops.segment_sum(valid.astype(jnp.int32), new, kp)
        own = jnp.maximum(jnp.take_along_axis(s, new[:, None], 1)[:, 0] + x2, 0.0)
        new, counts = lax.cond(jnp.any(active & (counts == 0)), _fill_empty, lambda lab, cnt, *_: (lab, cnt),
                               new, counts, own, valid, active)
        sums = jax.ops.segment_sum(x * w[:, None], new, kp)
        c_new = jnp.where((counts > 0)[:, None], sums / jnp.maximum(counts, 1)[:, None].astype(x.dtype), 0.0)
        same = jnp.all(jnp.where(valid, new == labels, True))
        return it + 1, new, c_new, same | (jnp.sum((c_new - c) ** 2) <= tol)

    start = (jnp.int32(0), jnp.full(x.shape[0], -1, jnp.int32), c, jnp.bool_(False))
    _, labels, c, done = lax.while_loop(lambda s: (s[0] < iters) & ~s[3], step, start)
    inertia = jnp.sum(w * jnp.sum((x - c[labels]) ** 2, 1))
    return labels, c, inertia, done


@partial(jax.jit, static_argnames=("kp", "n_init", "trials"))
def _runs(x, valid, key, k, iters, tol, *, kp: int, n_init: int, trials: int):
    """`n_init` seeded k-means runs of x `[Np, F]` float32 (centred; padding rows zero, valid `[Np]` False), kept
    in a scan: the labels `[Np]` int32 of the run with the smallest inertia (the first on ties), that inertia
    (float32) and whether that run converged (stopped before `iters`)."""

    def run(best, key):
        c0 = _seed_pp(key, x, valid, k, kp, trials)
        labels, _, inertia, done = _lloyd(x, valid, c0, k, iters, tol)
        better = inertia < best[1]
        return tuple(jnp.where(better, new, old) for new, old in zip((labels, inertia, done), best)), None

    init = (jnp.zeros(x.shape[0], jnp.int32), jnp.array(jnp.inf, x.dtype), jnp.bool_(False))
    (labels, inertia, done), _ = lax.scan(run, init, jax.random.split(key, n_init))
    return labels, inertia, done


def best_labels(xc: np.ndarray, k: int, seed: int, n_init: int, iters: int, tol: float,
                trials: int | None = None) -> tuple[np.ndarray, bool]:
    """(labels `[N]` int64 of the best (smallest inertia) of `n_init` k-means runs of centred points xc `[N, F]`,
    whether that run converged before `iters` iterations)
    (run r seeded from `jax.random.split(jax.random.key(seed), n_init)[r]`; `tol` absolute, on the centres' total
    squared move; `trials` k-means++ candidates per centre, None: 2 + ⌊ln kp⌋). Every cluster j < k holds at
    least one point."""
    n, f = xc.shape
    kp = _bucket_k(k)
    trials = 2 + int(math.log(kp)) if trials is None else int(trials)
    np_ = _bucket_n(n)
    xp = np.zeros((np_, f), np.float32)
    xp[:n] = xc
    labels, _, done = _runs(jnp.asarray(xp), jnp.asarray(np.arange(np_) < n), jax.random.key(seed), jnp.int32(k),
                         jnp.int32(iters), jnp.float32(tol), kp=kp, n_init=int(n_init), trials=trials)
    return np.asarray(labels)[:n].astype(np.int64), bool(done)
