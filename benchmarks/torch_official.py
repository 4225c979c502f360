"""The official single-image algorithm, re-implemented in PyTorch for measurement (CPU by default; `device=` runs it
on a GPU, as `benchmarks/gpu/` does).

Written from the description in /work/shared/REFERENCE.md ("What the official code does"), not from the official
code. What it does, per that description:

- affinity: every head's row-stochastic attention P = softmax(q kᵀ/√d), dense N×N, computed once and kept in
  memory (one image, one grid: nothing changes between passes);
- parameterisation: a 3-layer conv net (3×3 convs, ReLU between) over a learned random input → K channels,
  softmax over channels, so X ≥ 0 and each pixel sums to 1 (`in_channels`, `hidden` are not given by the
  description; 32 and 64 are used, as in `spectral_jax.solvers.gd.ConvPrior`);
- g_l: adaptive average pooling to the layer grid (identity when X's grid is the layer grid, the case here), then
  each channel L2-normalised over pixels → z_{l,k};
- loss: 2·mean_{l,k} |z_{l,k}ᵀ P_l z_{l,k} − 1| + 2·mean_{l,k≠k'} (z_{l,k}ᵀ z_{l,k'})², equal weight per layer/head;
- Adam lr 2e-3; 2000 forward/backward passes with gradient accumulation over 20 (the loss of each pass divided
  by 20; one optimizer update per 20 passes, ≈ 100 updates); K = 20;
- output: the K soft maps, and an SVD of them → K orthonormal "eigenvectors".

Implementation choice (does not change the maths): all heads' P are stacked as one `[G·N, N]` matrix so that each
pass's P z is a single GEMM — a fast baseline, not a strawman.

Several grids (a diffusion UNet's layers: 64², 32², ... on one image) go through `official_loop_grids`: one conv
prior at the largest grid, the loss the mean over every layer × head and eigenvector, i.e. Σ_grid (G_grid / G) ·
`paper_loss` at that grid; `official_loop` is its one-grid case.

Usable as a library (`official_loop`, `official_loop_grids`, `rayleigh_torch`, `attention_dense`) or from the
command line on random q/k: `python benchmarks/torch_official.py --layers 2 --heads 2 --grid 8 8 --passes 40`.

Shape legend
    L  layers   H  heads   G = L·H graphs   N  tokens of a grid   D  head dim   K  eigenvectors   (H0, W0) base grid
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F


def attention_dense(q: np.ndarray, k: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """P = softmax(q kᵀ/√d) row-wise for every head: q, k `[L, H, N, D]` → `[L·H, N, N]` float32 on `device`."""
    qt = torch.as_tensor(np.ascontiguousarray(q), dtype=torch.float32, device=device)
    kt = torch.as_tensor(np.ascontiguousarray(k), dtype=torch.float32, device=device)
    n, d = qt.shape[-2:]
    with torch.no_grad():
        logits = torch.matmul(qt.reshape(-1, n, d), kt.reshape(-1, n, d).transpose(1, 2)) / math.sqrt(d)
        return torch.softmax(logits, dim=-1)


def project(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """g(x): soft maps `[K, H0, W0]` → z `[N, K]`: adaptive average pool to `grid`, unit-norm columns."""
    if tuple(x.shape[-2:]) != tuple(grid):
        x = F.adaptive_avg_pool2d(x[None], grid)[0]
    z = x.reshape(x.shape[0], -1).T                                      # [N, K], row-major pixels
    return F.normalize(z, dim=0, eps=1e-12)


def rayleigh_torch(p: torch.Tensor, x: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """R_{g,k} = z_kᵀ P_g z_k for P `[G, N, N]` and maps x `[K, H0, W0]`; objective Σ_k mean_g R_{g,k}.

    The same quantity as `spectral_jax.objective.rayleigh` with equal weights (z = per-channel unit norm).
    """
    z = project(x, grid)
    g, n, _ = p.shape
    pz = (p.reshape(g * n, n) @ z).reshape(g, n, -1)                     # one GEMM for all heads
    r = (pz * z[None]).sum(1)                                            # [G, K]
    return r, r.mean(0).sum()


def paper_loss(p: torch.Tensor, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """2·mean_{g,k}|R_{g,k} − 1| + 2·mean_{g, k≠k'} (z_kᵀ z_k')² (one grid: the Gram term is the same for all g)."""
    z = project(x, grid)
    kk = z.shape[1]
    r, _ = rayleigh_torch(p, x, grid)
    gram = z.T @ z
    off = (gram * (1.0 - torch.eye(kk, dtype=z.dtype, device=z.device))) ** 2
    ortho = off.sum() / (kk * (kk - 1)) if kk > 1 else torch.zeros((), dtype=z.dtype, device=z.device)
    return 2.0 * (r - 1.0).abs().mean() + 2.0 * ortho


class ConvPrior(torch.nn.Module):
    """'Deep image prior': a learned random input `[1, C, H0, W0]` → 3×3 conv → ReLU → 3×3 conv → ReLU → 3×3 conv →
    K logits, softmax over K."""

    def __init__(self, num_eigs: int, grid: tuple[int, int], in_channels: int = 32, hidden: int = 64):
        super().__init__()
        self.input = torch.nn.Parameter(torch.rand(1, in_channels, *grid))
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(in_channels, hidden, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(hidden, hidden, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(hidden, num_eigs, 3, padding=1))

    def forward(self) -> torch.Tensor:
        return torch.softmax(self.net(self.input), dim=1)[0]             # [K, H0, W0]


def orthonormal(maps: torch.Tensor) -> torch.Tensor:
    """SVD of the K soft maps `[K, H0, W0]` → K orthonormal vectors as maps `[K, H0, W0]` (left singular vectors,
    largest singular value first)."""
    kk, h, w = maps.shape
    u, _, _ = torch.linalg.svd(maps.reshape(kk, h * w).T.double(), full_matrices=False)   # [N, K]
    return u.T.reshape(kk, h, w).float()


def _sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; nothing to wait for on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def official_loop(q: np.ndarray, k: np.ndarray, grid: tuple[int, int], num_eigs: int = 20, passes: int = 2000,
                  accum: int = 20, lr: float = 2e-3, seed: int = 0, threads: int | None = 2,
                  base_grid: tuple[int, int] | None = None,
                  progress: Callable[[int, float], None] | None = None,
                  device: str | torch.device = "cpu") -> dict:
    """Run the official single-image loop on q, k `[L, H, N, D]` (numpy) with patch grid `grid`, on `device`.

    Returns a dict: maps `[K, H0, W0]` (the soft maps), vecs `[1, K, H0, W0]` (SVD-orthonormalised, numpy float32),
    objective (Σ_k mean_g z_kᵀ P_g z_k of vecs, evaluated here), rq `[G, K]`, losses (per update: the summed
    accumulated loss), pass_seconds `[passes]` (each forward/backward pass, incl. its optimizer update),
    seconds_setup (building P), seconds_loop (the passes), seconds (total incl. SVD), updates.
    """
    return official_loop_grids([(q, k, grid)], num_eigs, passes, accum, lr, seed, threads, base_grid, progress,
                               device)


def official_loop_grids(groups: list[tuple[np.ndarray, np.ndarray, tuple[int, int]]], num_eigs: int = 20,
                        passes: int = 2000, accum: int = 20, lr: float = 2e-3, seed: int = 0,
                        threads: int | None = 2, base_grid: tuple[int, int] | None = None,
                        progress: Callable[[int, float], None] | None = None,
                        device: str | torch.device = "cpu") -> dict:
    """The official loop over layers on several grids: groups [(q, k `[L, H, N, D]` numpy, grid)], one conv prior at
    `base_grid` (default: the largest grid), loss Σ_grid (G_grid / G) · `paper_loss` (the mean over all G graphs).

    threads: `torch.set_num_threads` (None: leave it). Returns `official_loop`'s dict (rq `[G, K]` in group order).
    """
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device)
    torch.manual_seed(seed)
    grids = [(int(g[0]), int(g[1])) for _, _, g in groups]
    for (q, _, _), grid in zip(groups, grids):
        if q.shape[-2] != grid[0] * grid[1]:
            raise ValueError(f"q has {q.shape[-2]} tokens, grid {grid} needs {grid[0] * grid[1]}")
    base = max(grids, key=lambda g: g[0] * g[1]) if base_grid is None else (int(base_grid[0]), int(base_grid[1]))

    t0 = time.perf_counter()
    ps = [(attention_dense(q, k, device), grid) for (q, k, _), grid in zip(groups, grids)]  # [G_grid, N, N], kept
    _sync(device)
    t1 = time.perf_counter()
    total = sum(p.shape[0] for p, _ in ps)
    model = ConvPrior(num_eigs, base).to(device)                      # initialised on the CPU: same for any device
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    opt.zero_grad()
    losses, acc, pass_seconds = [], 0.0, []
    for i in range(passes):
        t = time.perf_counter()
        x = model()
        loss = sum(p.shape[0] / total * paper_loss(p, x, grid) for p, grid in ps) / accum
        loss.backward()
        acc += float(loss.detach())
        if (i + 1) % accum == 0 or i + 1 == passes:
            opt.step()
            opt.zero_grad()
            losses.append(acc)
            acc = 0.0
            if progress is not None:
                progress(i + 1, losses[-1])
        _sync(device)
        pass_seconds.append(time.perf_counter() - t)
    t2 = time.perf_counter()
    with torch.no_grad():
        maps = model()
        vecs = orthonormal(maps)
        rq = torch.cat([rayleigh_torch(p, vecs, grid)[0] for p, grid in ps])   # [G, K]
        obj = rq.mean(0).sum()
    t3 = time.perf_counter()
    return {"maps": maps.cpu().numpy(), "vecs": vecs.cpu().numpy()[None], "objective": float(obj),
            "rq": rq.cpu().numpy(), "losses": np.asarray(losses, np.float32),
            "pass_seconds": np.asarray(pass_seconds), "seconds_setup": t1 - t0, "seconds_loop": t2 - t1,
            "seconds": t3 - t0, "updates": len(losses), "passes": passes,
            "p_mib": sum(p.numel() for p, _ in ps) * 4 / 1024 ** 2}


def main(argv=None):
    ap = argparse.ArgumentParser(description="The official single-image loop (PyTorch) on random q/k.")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--grid", type=int, nargs=2, default=(8, 8))
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--num-eigs", type=int, default=20)
    ap.add_argument("--passes", type=int, default=2000)
    ap.add_argument("--accum", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    a = ap.parse_args(argv)
    rng = np.random.default_rng(a.seed)
    n = a.grid[0] * a.grid[1]
    q = rng.standard_normal((a.layers, a.heads, n, a.dim), np.float32)
    k = rng.standard_normal((a.layers, a.heads, n, a.dim), np.float32)
    r = official_loop(q, k, tuple(a.grid), a.num_eigs, a.passes, a.accum, seed=a.seed, threads=a.threads,
                      device=a.device)
    print(json.dumps({key: (round(v, 4) if isinstance(v, float) else v) for key, v in r.items()
                      if not isinstance(v, np.ndarray)}))


if __name__ == "__main__":
    main()
