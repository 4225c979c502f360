"""Section `unet`: the paper's single-image diffusion setting — an SD 1.5-size UNet (random weights, our own config:
the GPU image has no diffusers) at 512² (latent 64²), all 16 self-attention layers × 8 heads × 10 timesteps on the
grids 64², 32², 16², 8² — taps + exact multi-grid solve (`analyze(graph="qk", method="exact", num_eigs=20)`), vs a
PyTorch loop of the official recipe on the same GPU and the same q/k.

The official loop (`benchmarks/torch_official.py`: conv prior, softmax over K, 2 mean |R − 1| + 2 ortho, Adam
2e-3, 2000 passes with gradient accumulation over 20) is run on the device under `torch.device`, with every head's
dense P built once from our taps and kept (as the official code keeps them); the multi-grid loss is the official
one, the mean over every layer × head and eigenvector: Σ_grid (G_grid / G) · `paper_loss` at that grid. Only
`passes` of its 2000 passes are timed and the rest extrapolated (setup + 2000 × median seconds per pass, said so in
the row); the official code's UNet pass per step is not counted (it would add 2000 UNet passes).

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


def _official_passes(groups, base, k: int, passes: int, accum: int) -> tuple[float, float]:
    """(setup seconds, median seconds per pass) of the official loop over groups [(q, k `[L, T·H, N, D]`, grid)]."""
    import torch

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    with torch.device(torch_device()):
        t0 = time.perf_counter()
        ps = [(TO.attention_dense(q, kk), grid) for q, kk, grid in groups]     # [G_grid, N, N] each, kept
        sync()
        setup = time.perf_counter() - t0
        total = sum(p.shape[0] for p, _ in ps)
        torch.manual_seed(0)
        model = TO.ConvPrior(k, base)
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        per_pass = []
        for i in range(passes):
            t = time.perf_counter()
            x = model()
            loss = sum(p.shape[0] / total * TO.paper_loss(p, x, grid) for p, grid in ps) / accum
            loss.backward()
            float(loss.detach())                  # the official loop reads the loss every pass
            if (i + 1) % accum == 0:
                opt.step()
                opt.zero_grad()
            sync()
            per_pass.append(time.perf_counter() - t)
    return setup, float(np.median(per_pass[1:] if len(per_pass) > 1 else per_pass))


def run(st: Section) -> None:
    import spectral_jax
    from spectral_jax import graphs as G
    from spectral_jax.models import load_backbone

    plan = TINY if st.tiny else FULL
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
        base = max((g for _, _, g in groups), key=lambda g: g[0] * g[1])
        n_graphs = sum(q.shape[0] * q.shape[1] for q, _, _ in groups)
        setup, per_pass = _official_passes(groups, base, k, plan["passes"], plan["accum"])
        total = setup + plan["total_passes"] * per_pass
        return {"graphs": n_graphs, "official_pass_s": per_pass, "official_s": total,
                "speedup": total / row["analyze_s"],
                "note": f"official loop: {plan['passes']} of {plan['total_passes']} passes timed, extrapolated"}

    st.attempt(f"{plan['model']} {size}² official loop (torch)", official, **fields)
