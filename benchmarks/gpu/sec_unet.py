"""Section `unet`: the paper's single-image diffusion setting — an SD 1.5-size UNet (random weights, our own config:
the GPU image has no diffusers) at 512² (latent 64²), all 16 self-attention layers × 8 heads × 10 timesteps on the
grids 64², 32², 16², 8² — taps + exact multi-grid solve (`analyze(graph="qk", method="exact", num_eigs=20)`), vs a
PyTorch loop of the official recipe on the same GPU and the same q/k.

The official loop (`torch_official.official_loop_grids`: conv prior, softmax over K, 2 mean |R − 1| + 2 ortho,
Adam 2e-3, 2000 passes with gradient accumulation over 20) runs on the device (`device=`), with every head's dense P
built once from our taps and kept (as the official code keeps them); the multi-grid loss is the official one, the
mean over every layer × head and eigenvector: Σ_grid (G_grid / G) · `paper_loss` at that grid. Only `passes` of its
2000 passes are run and the rest extrapolated (setup + 2000 × median seconds per pass, said so in the row); the
official code's UNet pass per step is not counted (it would add 2000 UNet passes).

Shape legend
    L  layers of one grid   T·H  timesteps × heads   N  tokens of a grid   D  head dim   K  eigenvectors
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

from timing import Section, jax_blocking, medians, torch_device

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch_official as TO  # noqa: E402

FULL = dict(model="sd15", size=512, timesteps=tuple(range(25, 251, 25)), num_eigs=20, runs=3, warmup=1,
            passes=100, accum=20, total_passes=2000)
TINY = dict(model="sd_tiny", size=64, timesteps=(50,), num_eigs=4, runs=2, warmup=1, passes=4, accum=2,
            total_passes=2000)

COLUMNS = [("model", "model"), ("image", "image"), ("graphs", "graphs (layers × heads × timesteps)"),
           ("taps_s", "taps (s)"), ("analyze_s", "taps + exact solve (s)"), ("first_s", "first call incl. compile (s)"),
           ("official_pass_s", "official loop: s / pass"), ("official_s", "official loop, 2000 passes (s, extrapolated)"),
           ("speedup", "official / ours")]


def run(st: Section) -> None:
    import spectral_jax
    from spectral_jax import graphs as G
    from spectral_jax.models import load_backbone, testing

    plan = TINY if st.tiny else FULL
    if st.tiny:
        testing.enable()                # sd_tiny is a test model, outside the registry unless enabled
    size, k = plan["size"], plan["num_eigs"]
    bb = load_backbone(plan["model"], "random", timesteps=list(plan["timesteps"]))
    img = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    x = bb.preprocess_image(img, (size, size))
    call = lambda: spectral_jax.analyze(img, graph="qk", num_eigs=k, size=(size, size), backbone=bb).eigvecs
    fields = dict(model=plan["model"], image=f"{size}²", target=not st.tiny)

    def ours():
        t0 = time.perf_counter()
        jax_blocking(call)()
        first = time.perf_counter() - t0
        t = medians({"analyze": jax_blocking(call), "taps": jax_blocking(bb.taps, x[None])}, plan["runs"],
                    plan["warmup"])
        return {"first_s": first, "analyze_s": t["analyze"], "taps_s": t["taps"]}

    row = st.attempt(f"{plan['model']} {size}² ours", ours, **fields)
    if row is None:
        return

    def official():
        taps = bb.taps(x[None]).patches()
        groups = []
        for grid, layers in G.group_layers(taps):
            q = np.stack([np.asarray(taps.layers[i].q[0], np.float32) for i in layers])
            kk = np.stack([np.asarray(taps.layers[i].k[0], np.float32) for i in layers])
            groups.append((q, kk, grid))
        n_graphs = sum(q.shape[0] * q.shape[1] for q, _, _ in groups)
        r = TO.official_loop_grids(groups, k, plan["passes"], plan["accum"], threads=None, device=torch_device())
        times = r["pass_seconds"]
        per_pass = float(np.median(times[1:] if len(times) > 1 else times))     # the first pass warms up
        total = r["seconds_setup"] + plan["total_passes"] * per_pass
        return {"graphs": n_graphs, "official_pass_s": per_pass, "official_s": total,
                "speedup": total / row["analyze_s"],
                "note": f"official loop: {plan['passes']} of {plan['total_passes']} passes timed, extrapolated"}

    st.attempt(f"{plan['model']} {size}² official loop (torch)", official, **fields)
