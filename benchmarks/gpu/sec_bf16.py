"""Section `bf16`: the graphs' bfloat16 storage option (`graphs.from_taps(..., dtype="bfloat16")`: q/k, unit v and
kNN features stored in bfloat16, every product accumulated in float32) against float32 storage, on DINOv2-B-size
synthetic taps (12 layers × 12 heads, head dim 64, heads concatenated F = 768 for kNN), each row timed and its
error vs the float32 row measured:

    dense A     `objective.dense_operators` — mean of sym(P) over all 144 graphs, N × N — for qk (P = softmax(q kᵀ/8))
                and vv (P ∝ exp(cos(v_i, v_j)/0.1)) at N = 32² and 64² (448² and 896² DINOv2-B images); error:
                max |A − A_fp32| / max |A_fp32|
    exact solve `graphs.attention` + `solvers.exact` (K = 20) at N = 32²; error: max relative eigenvalue error and
                the subspace overlap ‖Q_fp32ᵀ Q‖²_F / K (`eval_bf16.subspace`)
    kNN search  `graphs.knn` (knn-vv, k_intra = k_inter = 50) over 16 images × 32² tokens per layer; error: the
                neighbour-set overlap with the float32 search (`eval_bf16.neighbour_overlap`)
The float32 rows run true float32 products (`jax.default_matmul_precision("float32")`, no TF32); the bfloat16 rows
the default for bfloat16 operands (float32 accumulation). The bfloat16 forward itself is timed by section `forward`.
Taps: tokens drawn around shared cluster centres (`sec_dataset.features`), so graphs have structure and neighbour
sets are not decided by noise: q = 8·x, k = 8·(x + noise) (same-cluster logits ≈ 8, as peaked as a trained ViT's).

Shape legend
    L  layers   H  heads   N  tokens per image (grid h·w)   D  head dim   I  images   F = H·D   K  eigenvectors
"""

from __future__ import annotations

import contextlib
import os
import sys

import numpy as np

from sec_dataset import features
from timing import Section, jax_blocking, medians, rel_err

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import eval_bf16  # noqa: E402  (benchmarks/eval_bf16.py: the error measures, shared with the CPU evaluation)

FULL = dict(layers=12, heads=12, dim=64, grids=((32, 32), (64, 64)), solve_grid=(32, 32), knn_images=16,
            k=50, num_eigs=20, clusters=24, runs=5, warmup=1)
TINY = dict(layers=2, heads=2, dim=8, grids=((4, 4),), solve_grid=(4, 4), knn_images=3, k=4, num_eigs=4,
            clusters=3, runs=2, warmup=1)
DTYPES = ("float32", "bfloat16")

COLUMNS = [("what", "what"), ("size", "size"), ("dtype", "storage"), ("ms", "ms"), ("vs_fp32", "speed-up vs fp32"),
           ("err", "error vs fp32"), ("err_kind", "error measure"), ("overlap", "subspace / neighbour overlap")]


def _precision(dtype: str):
    """True float32 products for the float32 rows; the bfloat16 operands' default (float32 accumulation) else."""
    import jax

    return jax.default_matmul_precision("float32") if dtype == "float32" else contextlib.nullcontext()


def _taps(plan: dict, grid: tuple[int, int], seed: int):
    """(q, k, v) `[L, H, N, D]` float32: per graph, N tokens around `clusters` shared centres."""
    n, g = grid[0] * grid[1], plan["layers"] * plan["heads"]
    x = features(g, n, plan["dim"], plan["clusters"], seed).reshape(plan["layers"], plan["heads"], n, plan["dim"])
    noise = np.random.default_rng(seed + 1).standard_normal(x.shape).astype(np.float32) * (0.5 / np.sqrt(plan["dim"]))
    return 8.0 * x, 8.0 * (x + noise), x


def _timed_pair(st: Section, label: str, build, run_one, error, plan: dict, **fields) -> None:
    """One row per storage dtype: `build(dtype)` → inputs, `run_one(inputs)` → outputs (timed, interleaved),
    `error(out, out_fp32)` → the row's error fields."""
    made: dict[str, object] = {}
    outs: dict[str, object] = {}
    times: dict[str, float] = {}
    for dtype in DTYPES:
        def measure(dtype=dtype):
            made[dtype] = build(dtype)
            with _precision(dtype):
                outs[dtype] = run_one(made[dtype])
                t = medians({dtype: jax_blocking(run_one, made[dtype])}, plan["runs"], plan["warmup"])[dtype]
            times[dtype] = t
            err = {"err": 0.0} if dtype == "float32" else error(outs[dtype], outs["float32"]) if "float32" in outs \
                else {}
            return {"ms": 1e3 * t, "vs_fp32": times["float32"] / t if "float32" in times else None, **err}

        st.attempt(f"{label} {dtype}", measure, dtype=dtype, **fields)


def run(st: Section) -> None:
    import jax.numpy as jnp

    from spectral_jax import graphs as G
    from spectral_jax import objective as O
    from spectral_jax import solvers

    plan = TINY if st.tiny else FULL

    def dense_a(gs):
        base, nimg = O.check_graphs(gs)
        return O.dense_operators(gs, O.normalised_weights(gs, None), base, nimg)[0]

    def a_err(a, ref):
        return {"err": rel_err(np.asarray(a), np.asarray(ref)), "err_kind": "max abs ΔA ÷ max abs A"}

    for grid in plan["grids"]:
        q, k, v = _taps(plan, grid, 0)
        for graph in ("qk", "vv"):
            build = ((lambda d: [G.attention(q, k, grid, dtype=d)]) if graph == "qk"
                     else (lambda d: [G.value(v, grid, dtype=d)]))
            _timed_pair(st, f"dense A {graph} {grid[0]}×{grid[1]}", build, dense_a, a_err, plan,
                        what=f"dense A {graph}", size=f"N = {grid[0]}×{grid[1]}")

    grid = plan["solve_grid"]
    q, k, _ = _taps(plan, grid, 0)

    def solve_err(res, ref):
        gs = [G.attention(q, k, grid)]
        sub = eval_bf16.subspace(eval_bf16.node_vectors(res.eigvecs), eval_bf16.node_vectors(ref.eigvecs),
                                 lambda b: eval_bf16.apply_a(gs, b))
        return {"err": eval_bf16.eig_rel_err(res.eigvals[0], ref.eigvals[0]),
                "err_kind": "max over k of abs Δλ_k ÷ λ_k", "overlap": sub["overlap"]}

    _timed_pair(st, f"exact solve qk {grid[0]}×{grid[1]}", lambda d: [G.attention(q, k, grid, dtype=d)],
                lambda gs: solvers.exact.exact(gs, plan["num_eigs"]), solve_err, plan,
                what=f"graphs + exact solve qk (K = {plan['num_eigs']})", size=f"N = {grid[0]}×{grid[1]}")

    n, f = grid[0] * grid[1], plan["heads"] * plan["dim"]
    a = np.stack([features(plan["knn_images"], n, f, plan["clusters"], seed) for seed in range(plan["layers"])])
    a = jnp.asarray(a)                                           # [L, I·N, F]
    kw = dict(k_intra=min(plan["k"], n), k_inter=plan["k"])
    _timed_pair(st, f"kNN search {plan['knn_images']}×{n}", lambda d: (a, d),
                lambda inp: G.knn(inp[0], inp[0], grid, plan["knn_images"], dtype=inp[1], **kw),
                lambda g, ref: {"err": float(1.0 - eval_bf16.neighbour_overlap(g.idx, ref.idx)),
                                "err_kind": "1 − neighbour overlap",
                                "overlap": eval_bf16.neighbour_overlap(g.idx, ref.idx)},
                plan, what=f"kNN search knn-vv (k = {kw['k_intra']} + {kw['k_inter']})",
                size=f"{plan['knn_images']} images × {n} tokens × {plan['layers']} layers")
