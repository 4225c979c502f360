"""Helpers shared by the tests (a uniquely named module: `conftest` names collide across test folders)."""

import importlib.util
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
BENCH = os.path.join(ROOT, "benchmarks")


def bench_module(name: str):
    """The benchmark script benchmarks/NAME.py as a module (its functions tested, its `main` not run)."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", os.path.join(BENCH, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def planted_qk(rng, grid=(12, 12), groups=3, layers=2, heads=2, dim=16, strength=3.0, noise=0.5):
    """q/k whose attention has a planted partition of the grid into `groups` vertical bands (plus noise)."""
    h, w = grid
    labels = (np.arange(w)[None, :].repeat(h, 0) * groups // w).reshape(-1)       # [N]
    centers = rng.normal(size=(groups, dim))
    q = strength * centers[labels] + noise * rng.normal(size=(layers, heads, h * w, dim))
    k = strength * centers[labels] + noise * rng.normal(size=(layers, heads, h * w, dim))
    return q.astype(np.float32), k.astype(np.float32), labels


def subspace_alignment(u, v):
    """Mean cosine of the principal angles between span(u) and span(v), u, v `[N, K]`."""
    qu, _ = np.linalg.qr(np.asarray(u, np.float64))
    qv, _ = np.linalg.qr(np.asarray(v, np.float64))
    return float(np.linalg.svd(qu.T @ qv, compute_uv=False).mean())


def perturb(model, seed):
    """A random-init torch reference moved off its initialisation (0.05·N(0, 1) on every parameter, from `seed`):
    zero-initialised layers (diffusers' output convs, LayerNorm biases) would otherwise hide mapping bugs."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def close_to_ref(ours, ref, tol, what):
    """max |ours − ref| ≤ tol · max |ref|, shapes equal, and the reference not ~0 (else the check tests nothing)."""
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} vs {ref.shape}"
    scale = float(np.abs(ref).max())
    assert scale > 0.05, f"{what}: reference is ~0 (max {scale}); the comparison would test nothing"
    err = float(np.abs(ours - ref).max())
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} × {scale:.3g}"
