"""Every graph's matvec, rmatvec and gradient against its dense form; kNN structure."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spectral_jax import graphs, kernels

# fp32 with float32 matmul precision: blockwise online-softmax sums differ from the dense product only by
# summation order, O(eps·log N) relative; 2e-5 absolute on O(1) outputs leaves two orders of margin over
# the ~1e-7 observed and still catches any masking/normalisation bug (those are O(1/N) ≥ 1e-3 here).
ATOL = 2e-5


def _qk(rng, s, n, d, scale=1.0):
    return [(scale * rng.normal(size=(*s, n, d))).astype(np.float32) for _ in range(2)]


# every N with a block that does not divide it and one larger than N; small blocks only where tiles stay few; one
# N in the thousands (summation over several tiles of a realistic size: 9 row × 9 column tiles, the last ragged)
@pytest.mark.parametrize("n,block", [(7, 4), (7, 512), (64, 16), (64, 48), (1031, 128)])
def test_attention_matvec_and_grad_match_dense(rng, n, block):
    q, k = _qk(rng, (2,), n, 8, scale=1.5)
    g = graphs.attention(q, k, (1, n), block=block)
    z = rng.normal(size=(n, 5)).astype(np.float32)
    p = np.asarray(g.dense(), np.float64)
    assert p.shape == (2, n, n)
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(g.matvec(z), p @ z, atol=ATOL, err_msg="matvec")
    np.testing.assert_allclose(g.rmatvec(z), np.swapaxes(p, 1, 2) @ z, atol=ATOL, err_msg="rmatvec")
    np.testing.assert_allclose(g.sym_matvec(z), 0.5 * (p + np.swapaxes(p, 1, 2)) @ z, atol=ATOL, err_msg="sym")
    c = rng.normal(size=(2, n, 5)).astype(np.float32)
    grad = jax.grad(lambda z: jnp.sum(c * g.matvec(z)))(jnp.asarray(z))       # = Σ_s P_sᵀ c_s
    np.testing.assert_allclose(grad, np.einsum("snm,snk->mk", p, c), atol=ATOL * 4, err_msg="gradient")


def test_attention_grad_is_blockwise_not_dense(rng):
    """The VJP runs the blocked transpose kernel: its jaxpr holds no [N, N] intermediate."""
    n, block = 1031, 128
    q, k = _qk(rng, (), n, 8)
    g = graphs.attention(q, k, (1, n), block=block)
    jaxpr = jax.make_jaxpr(jax.grad(lambda z: jnp.sum(g.matvec(z) ** 2)))(jnp.ones((n, 3)))
    shapes = {tuple(v.aval.shape) for eqn in jaxpr.jaxpr.eqns for v in eqn.outvars} | {
        tuple(v.aval.shape) for eqn in jaxpr.jaxpr.eqns for sub in jax.core.jaxprs_in_params(eqn.params)
        for e in sub.eqns for v in e.outvars}
    assert not any(s.count(n) >= 2 or (len(s) >= 2 and s[-1] * s[-2] >= n * n) for s in shapes), shapes


@pytest.mark.parametrize("n", [7, 300])
def test_value_and_features_graph(rng, n):
    v = rng.normal(size=(3, n, 8)).astype(np.float32)
    g = graphs.value(v, (1, n), tau=0.2, block=64)
    vn = v / np.linalg.norm(v, axis=-1, keepdims=True)
    logits = np.einsum("snd,smd->snm", vn, vn) / 0.2
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(g.dense(), p, atol=1e-5)
    z = rng.normal(size=(n, 4)).astype(np.float32)
    np.testing.assert_allclose(g.matvec(z), p @ z, atol=ATOL)


def test_row_lse_matches_logsumexp(rng):
    q, k = _qk(rng, (), 300, 8, scale=3.0)
    lse = kernels.row_lse(jnp.asarray(q), jnp.asarray(k), 0.5, 64)
    ref = jax.scipy.special.logsumexp(0.5 * q @ k.T, axis=1)
    np.testing.assert_allclose(lse, ref, rtol=1e-5)


def test_bad_shapes_raise(rng):
    q, k = _qk(rng, (), 10, 4)
    with pytest.raises(ValueError, match="tokens"):
        graphs.attention(q, k, (3, 4))
    with pytest.raises(ValueError, match="same shape"):
        graphs.attention(q, k[:5], (2, 5))


@pytest.mark.parametrize("n_img,k_intra,k_inter,block", [(1, 5, 0, 16), (3, 4, 3, 16), (3, 6, 2, 512)])
def test_knn_matches_dense_construction(rng, n_img, k_intra, k_inter, block):
    grid = (4, 5)
    n = n_img * 20
    a, b = _qk(rng, (), n, 6)
    g = graphs.knn(a, b, grid, n_img, k_intra=k_intra, k_inter=k_inter, min_cos=0.1, block=block)
    # dense reference: cosine, per-row top-k within / across images, threshold, symmetrise, row-normalise
    an = a / np.linalg.norm(a, axis=1, keepdims=True)
    bn = b / np.linalg.norm(b, axis=1, keepdims=True)
    cos = an @ bn.T
    img = np.arange(n) // 20
    adj = np.zeros((n, n))
    for i in range(n):
        same = np.where(img == img[i])[0]
        other = np.where(img != img[i])[0]
        for cand, kk in ((same, k_intra), (other, k_inter)):
            if kk:
                top = cand[np.argsort(-cos[i, cand], kind="stable")[:kk]]
                adj[i, top] = np.where(cos[i, top] > 0.1, cos[i, top], 0.0)
    s = 0.5 * (adj + adj.T)
    deg = s.sum(1)
    p = np.where(deg[:, None] > 0, s / np.where(deg > 0, deg, 1)[:, None], 0)
    np.testing.assert_allclose(g.dense(), p, atol=1e-5)
    # intra/inter split: exactly k_intra slots in the own image, k_inter in others
    idx = np.asarray(g.idx)
    assert idx.shape == (n, k_intra + k_inter)
    assert (img[idx[:, :k_intra]] == img[:, None]).all()
    assert (img[idx[:, k_intra:]] != img[:, None]).all()
    # structure: S symmetric, P row sums 1 where the node has any edge
    dense = np.asarray(g.dense())
    np.testing.assert_allclose((dense * deg[:, None]), (dense * deg[:, None]).T, atol=1e-5)
    np.testing.assert_allclose(dense.sum(1)[deg > 0], 1.0, atol=1e-5)
    z = rng.normal(size=(n, 3)).astype(np.float32)
    np.testing.assert_allclose(g.matvec(z), p @ z, atol=ATOL)
    np.testing.assert_allclose(g.rmatvec(z), p.T @ z, atol=ATOL)
    grad = jax.grad(lambda z: jnp.sum(g.matvec(z) ** 2))(jnp.asarray(z))
    np.testing.assert_allclose(grad, 2 * p.T @ (p @ z), atol=1e-4)


def test_knn_batched_over_layers(rng):
    a, b = _qk(rng, (3,), 40, 6)
    g = graphs.knn(a, b, (5, 8), 1, k_intra=7)
    assert g.batch_shape == (3,) and g.num_graphs == 3
    z = rng.normal(size=(40, 2)).astype(np.float32)
    np.testing.assert_allclose(g.matvec(z), np.asarray(g.dense()) @ z, atol=ATOL)


def test_knn_rejects_bad_k(rng):
    a, b = _qk(rng, (), 20, 4)
    with pytest.raises(ValueError, match="k_inter"):
        graphs.knn(a, b, (4, 5), 1, k_intra=3, k_inter=2)
    with pytest.raises(ValueError, match="k_intra"):
        graphs.knn(a, b, (4, 5), 1, k_intra=21)


def test_select_picks_flat_batch(rng):
    q, k = _qk(rng, (2, 3), 16, 4)
    g = graphs.attention(q, k, (4, 4))
    sub = g.select(jnp.array([4, 0]))
    np.testing.assert_allclose(sub.dense()[0], g.dense()[1, 1], atol=1e-6)
    np.testing.assert_allclose(sub.dense()[1], g.dense()[0, 0], atol=1e-6)


@pytest.mark.parametrize("n", [64, 4100])       # under and over graphs.DENSE_QUADRATIC_MAX
def test_quadratic_one_graph_at_a_time_matches_dense(rng, n, monkeypatch):
    """`quadratic(z, sequential=True)` (one graph at a time; small attention graphs applied densely) = zᵀ P z of the
    dense P = the vmapped route, for an attention graph with batch dims, a kNN graph and a value graph; and its
    gradient matches the vmapped route's."""
    if n > graphs.DENSE_QUADRATIC_MAX:
        monkeypatch.setattr(graphs, "DENSE_QUADRATIC_MAX", 32)    # the blocked route, at a size tests can afford
        n = 64
    q, k = _qk(rng, (2, 3), n, 8)
    g = graphs.attention(jnp.asarray(q), jnp.asarray(k), (8, n // 8))
    z = jnp.asarray(rng.standard_normal((n, 5)), jnp.float32)
    want = np.einsum("nk,snm,mk->sk", np.asarray(z, np.float64),
                     np.asarray(g.dense(), np.float64).reshape(6, n, n), np.asarray(z, np.float64)).reshape(2, 3, 5)
    for seq in (False, True):
        got = g.quadratic(z, sequential=seq)
        assert got.shape == (2, 3, 5)
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
    grad = [jax.grad(lambda z, s=s: g.quadratic(z, sequential=s).sum())(z) for s in (False, True)]
    np.testing.assert_allclose(np.asarray(grad[1]), np.asarray(grad[0]), rtol=2e-4, atol=2e-5)
    a = jnp.asarray(rng.standard_normal((2, n, 8)), jnp.float32)
    for other in (graphs.knn(a, a, (8, n // 8), k_intra=5), graphs.value(a, (8, n // 8))):
        np.testing.assert_allclose(np.asarray(other.quadratic(z, sequential=True)),
                                   np.asarray(other.quadratic(z)), rtol=2e-5, atol=2e-6)


def test_topk_inter_with_k_wider_than_an_even_chunk(rng, monkeypatch):
    """Regression: with a column budget under k per row tile, the even-chunk width (⌈C / chunks⌉) fell below k and
    `top_k` raised (k > ~32 768 at the default budget). Now every chunk is ≥ k wide; the result is the brute force's."""
    monkeypatch.setattr(kernels, "INTER_BUDGET", 10 * 8)         # 10 columns per chunk for a block of 8 rows
    r, c, k = 8, 100, 40                                         # width max(40, 10) → 3 chunks of ⌈100/3⌉ = 34 < k
    a = kernels.unit_rows(jnp.asarray(rng.normal(size=(r, 6)), jnp.float32))
    b = kernels.unit_rows(jnp.asarray(rng.normal(size=(c, 6)), jnp.float32))
    row_img, col_img = jnp.zeros(r, jnp.int32), jnp.arange(c, dtype=jnp.int32) % 5 + 1
    ok = jnp.arange(c) % 7 != 0
    idx, cos = kernels.topk_inter(a, b, row_img, col_img, ok, k, 8)
    ref = np.where(np.asarray(ok)[None, :], np.asarray(a) @ np.asarray(b).T, -np.inf)
    want = np.argsort(-ref, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(np.asarray(idx), want)
    np.testing.assert_allclose(np.asarray(cos), np.take_along_axis(ref, want, 1), rtol=1e-6)
