"""bfloat16 storage with float32 accumulation: graphs built from bfloat16 q/k/features compute their logits,
softmax, P z, dense P and kNN cosines in float32 — equal, to float32 rounding, to the float32 computation on the
bfloat16-rounded inputs — and stay within a stated tolerance of the float32 graphs; the CLI's --dtype flags.

Tolerances: bfloat16 keeps 8 significant bits (relative rounding ≤ 2⁻⁹ ≈ 2e-3 per entry). The qk fixture has
q, k ~ 3·N(0, 1), D = 32, so logits s = q·k/√D have std 9 and reach ~30: rounding q and k moves s by ~ 2⁻⁹·|s|/√2
(independent per-entry errors) ≈ 1e-2…4e-2, and P = softmax(s) by about as much, relatively — measured 2.0e-2 for
P z (max-norm relative), so the bound is 3e-2. vv rows are unit vectors scaled by 1/τ = 10, so |s| ≤ 10 and mostly
far smaller differences matter: measured 3.5e-4, bound 2e-3. The float32-accumulation checks are at 1e-5: float32
rounding of sums of ≤ 64 products.

Shape legend
    S  graphs (layers × heads)   N  nodes   D  feature dim   K  vectors
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spectral_jax import graphs as G
from spectral_jax import kernels
from spectral_jax.cli import main
from spectral_jax.errors import InputError
from spectral_jax.objective import weighted_sym_dense
from spectral_jax.taps import LayerTap, Taps

BF16 = jnp.bfloat16
GRID = (6, 8)                                     # N = 48: several kernel blocks at block=16


def _ref_softmax(q, k, scale):
    """float32 numpy softmax(scale · q kᵀ) of the given (already rounded) values, in float64 then float32."""
    s = scale * np.asarray(q, np.float64) @ np.asarray(k, np.float64).T
    p = np.exp(s - s.max(1, keepdims=True))
    return (p / p.sum(1, keepdims=True)).astype(np.float32), np.log(np.exp(s - s.max(1, keepdims=True)).sum(1)) \
        + s.max(1)


def _rel(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(x - ref).max() / np.abs(ref).max())


@pytest.fixture
def qkz():
    rng = np.random.default_rng(0)
    n, d = GRID[0] * GRID[1], 32
    q, k = (3.0 * rng.standard_normal((2, 2, 3, n, d))).astype(np.float32)  # [L=2, H=3, N, D]: large logits
    z = rng.standard_normal((n, 5)).astype(np.float32)
    return q, k, z


def test_bf16_qk_give_float32_logits_softmax_and_lse(qkz):
    q, k, z = qkz
    q16, k16 = jnp.asarray(q[0, 0], BF16), jnp.asarray(k[0, 0], BF16)
    qr, kr = np.asarray(q16, np.float32), np.asarray(k16, np.float32)             # the stored values
    scale = 1 / np.sqrt(q.shape[-1])
    lg = kernels.logits(q16, k16, scale)
    assert lg.dtype == jnp.float32
    np.testing.assert_allclose(lg, scale * (qr.astype(np.float64) @ kr.T.astype(np.float64)), rtol=1e-5, atol=1e-5)
    p_ref, lse_ref = _ref_softmax(qr, kr, scale)
    pz, lse = kernels.softmax_matmul(q16, k16, jnp.asarray(z), scale, 16)
    assert pz.dtype == lse.dtype == jnp.float32
    np.testing.assert_allclose(pz, p_ref @ z, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, lse_ref, rtol=1e-5, atol=1e-5)
    pt = kernels.softmax_apply(q16, k16, lse, jnp.asarray(z), scale, 16, transpose=True)
    assert pt.dtype == jnp.float32
    np.testing.assert_allclose(pt, p_ref.T @ z, rtol=1e-5, atol=1e-5)
    g = G.attention(q16, k16, GRID, block=16)
    assert g.q.dtype == BF16                                                      # taken as is
    dense = g.dense()
    assert dense.dtype == jnp.float32
    np.testing.assert_allclose(dense, p_ref, rtol=1e-5, atol=1e-6)
    # the bfloat16 logits a float32-accumulating kernel avoids are far off at these magnitudes
    assert _rel(np.asarray((q16 @ k16.T).astype(jnp.float32)) * scale, np.asarray(lg)) > 1e-3


def test_gradient_through_bf16_graph_is_float32_and_exact(qkz):
    q, k, z = qkz
    g = G.attention(q[0], k[0], GRID, block=16, dtype="bfloat16")               # [3, N, D] stored bfloat16
    w = jnp.asarray(np.random.default_rng(1).standard_normal((3, z.shape[0], z.shape[1])), jnp.float32)
    dz = jax.grad(lambda z_: jnp.sum(w * g.matvec(z_)))(jnp.asarray(z))
    assert dz.dtype == jnp.float32
    p = np.asarray(g.dense(), np.float64)                                       # [3, N, N] float32 of the stored
    np.testing.assert_allclose(dz, np.einsum("snm,snk->mk", p, np.asarray(w, np.float64)), rtol=1e-5, atol=1e-5)


def _taps(q, k, v):
    """Taps of one image with two layers: q, k, v `[2, H, N, D]` → per layer `[1, H, N, D]`."""
    return Taps({i: LayerTap(q[i][None], k[i][None], v[i][None], GRID, 0) for i in range(q.shape[0])})


def test_from_taps_bf16_storage_within_tolerance_of_float32(qkz):
    q, k, _ = qkz
    v = q + k
    taps = _taps(q, k, v)
    z = jnp.asarray(np.random.default_rng(2).standard_normal((GRID[0] * GRID[1], 4)), jnp.float32)
    for kind, tol in (("qk", 3e-2), ("vv", 2e-3)):
        (g32,), (g16,) = (G.from_taps(taps, kind, dtype=d, block=16) for d in ("float32", "bfloat16"))
        assert g32.q.dtype == jnp.float32 and g16.q.dtype == BF16
        for f in ("matvec", "sym_matvec"):
            a, b = getattr(g16, f)(z), getattr(g32, f)(z)
            assert a.dtype == jnp.float32
            err = _rel(a, b)
            assert 1e-5 < err < tol, (kind, f, err)                              # rounded, but only by bfloat16
        w = jnp.full(g32.batch_shape, 1.0 / g32.num_graphs)
        a16, a32 = weighted_sym_dense(g16, w), weighted_sym_dense(g32, w)          # the exact solver's dense A
        assert a16.dtype == jnp.float32 and _rel(a16, a32) < tol
    # vv: normalised in float32, then rounded once
    unit = np.asarray(G.value(jnp.asarray(v), GRID, dtype="bfloat16").q, np.float32)
    ref = v / np.linalg.norm(v, axis=-1, keepdims=True)
    np.testing.assert_array_equal(unit, np.asarray(jnp.asarray(ref, BF16), np.float32))


def test_bf16_forward_taps_are_stored_float32_by_default(qkz):
    q, k, _ = qkz
    taps = _taps(*(jnp.asarray(x, BF16) for x in (q, k, q)))                      # a bfloat16 forward's taps
    (g,) = G.from_taps(taps, "qk")
    assert g.q.dtype == jnp.float32
    (g,) = G.from_taps(taps, "knn-vv", k_intra=5, k_inter=0)
    assert g.w.dtype == g.deg.dtype == jnp.float32


def test_knn_bf16_search_overlaps_float32():
    rng = np.random.default_rng(3)
    nimg, per, d = 4, GRID[0] * GRID[1], 48
    centres = rng.standard_normal((6, d))
    a = (centres[rng.integers(0, 6, nimg * per)] + 0.7 * rng.standard_normal((nimg * per, d))).astype(np.float32)
    a = 5.0 * a                                                                    # lengths ≠ 1: normalised first
    kw = dict(k_intra=8, k_inter=8, min_cos=0.1, block=64)
    g32 = G.knn(a, a, GRID, nimg, **kw)
    g16 = G.knn(a, a, GRID, nimg, dtype="bfloat16", **kw)
    assert g16.w.dtype == g16.deg.dtype == jnp.float32
    i32, i16 = np.asarray(g32.idx), np.asarray(g16.idx)
    overlap = np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(i32, i16)])
    assert overlap > 0.9, overlap                  # ties within bfloat16 rounding may swap the last neighbours
    same = i32 == i16
    assert np.abs(np.asarray(g16.w)[same] - np.asarray(g32.w)[same]).max() < 1e-2   # cosines: 2⁻⁸ of |cos| ≤ 1
    z = jnp.asarray(rng.standard_normal((nimg * per, 3)), jnp.float32)
    assert _rel(g16.matvec(z), g32.matvec(z)) < 0.2  # a few swapped edges move P z more than rounding does


def test_storage_dtype_rejects_others():
    for bad in ("float16", "bf16", 3):
        with pytest.raises(InputError, match="choose one of float32, bfloat16"):
            G.storage_dtype(bad)
    assert G.storage_dtype(jnp.bfloat16) == BF16 and G.storage_dtype(None) is None


@pytest.mark.parametrize("cmd,flag", [("analyze", "--dtype"), ("extract", "--dtype"), ("analyze", "--graph-dtype")])
def test_cli_dtype_bad_value_exits_2(cmd, flag, tmp_path, capsys):
    from spectral_jax.io import SAMPLE

    out = tmp_path / ("x.npz" if cmd == "extract" else "x")
    with pytest.raises(SystemExit) as e:                      # argparse's usage error (one line, exit 2)
        main([cmd, SAMPLE, "--model", "dinov2_vits14", "--weights", "random", flag, "float16",
              "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and flag in err and "'bfloat16'" in err
    assert not out.exists()


def test_api_forward_and_graph_dtypes():
    """analyze(dtype=, graph_dtype=) reach the backbone and the graphs (the eigenvalues move) and bfloat16 stays
    close to float32 (a random ViT's graphs: near-uniform attention, so the eigenvalues are compared, not the
    subspaces); a bad dtype is one InputError before the model loads."""
    import spectral_jax as sj

    img = np.random.default_rng(0).integers(0, 256, (28, 42, 3), dtype=np.uint8)
    kw = dict(model="dinov2_vits14", weights="random", layers="0,1", num_eigs=3, size=(28, 42))
    ref = sj.analyze(img, **kw)
    for dt, gdt in (("bfloat16", "float32"), ("float32", "bfloat16")):
        res = sj.analyze(img, dtype=dt, graph_dtype=gdt, **kw)
        assert res.eigvals.dtype == ref.eigvals.dtype
        assert not np.array_equal(res.eigvals, ref.eigvals)          # the option reached the forward / the graphs
        np.testing.assert_allclose(res.eigvals, ref.eigvals, atol=5e-4)   # measured 4e-5 / 1.5e-5 (λ₂ ≈ 0.013)
    for bad, needle in ((dict(dtype="float16"), "forward dtype"), (dict(graph_dtype="bf16"), "float32, bfloat16"),
                        (dict(dtype="bfloat16", backbone=object()), "load_backbone instead")):
        with pytest.raises(InputError, match=needle):
            sj.analyze(img, **bad, **kw)


def test_cli_extract_bf16_forward(tmp_path, capsys):
    from spectral_jax.acts import load_acts
    from spectral_jax.io import SAMPLE

    outs = {}
    for d in ("float32", "bfloat16"):
        out = tmp_path / f"{d}.npz"
        assert main(["extract", SAMPLE, "--model", "dino_vits16", "--weights", "random", "--size", "32",
                     "--layers", "0,11", "--dtype", d, "--out", str(out)]) == 0
        assert json.loads(capsys.readouterr().out)["dtype"] == d
        outs[d] = load_acts(str(out)).taps.layers[11]
    t16, t32 = outs["bfloat16"], outs["float32"]
    assert t16.q.dtype == np.float32                                  # the ACTS contract: float32 on disk
    np.testing.assert_array_equal(t16.q, np.asarray(jnp.asarray(t16.q, BF16), np.float32))   # bf16 values
    assert 1e-4 < _rel(t16.q, t32.q) < 0.1                           # twelve layers of bfloat16 rounding
