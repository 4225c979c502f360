"""The approximate kNN searches (spectral_jax.knn_search) against the exact one; graphs.knn(search=...)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spectral_jax import graphs, kernels, knn_search
from spectral_jax.errors import InputError

GRID, PER = (4, 5), 20          # 20 tokens per image


def planted(rng, n_img, d=16, clusters=12, noise=0.35, batch=()):
    """Unit features `[*batch, n_img·PER, d]` drawn around `clusters` random centres (the structure real image
    features have), float32."""
    c = rng.normal(size=(clusters, d))
    x = c[rng.integers(0, clusters, size=(*batch, n_img * PER))] + noise * rng.normal(size=(*batch, n_img * PER, d))
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def exact_sets(x, k):
    """The exact inter-image top-k of every row, as numpy (idx, cos)."""
    img = jnp.arange(x.shape[0], dtype=jnp.int32) // PER
    i, c = kernels.topk_inter(jnp.asarray(x), jnp.asarray(x), img, img, jnp.ones(x.shape[0], bool), k, 256)
    return np.asarray(i), np.asarray(c)


def true_recall(approx_cos, exact_cos):
    """Share of the exact top-k matched (an approximate neighbour counts when its cosine reaches the exact k-th)."""
    kth = exact_cos[:, -1:]
    return float(np.mean(np.minimum((approx_cos >= kth - 1e-6).sum(1), exact_cos.shape[1]) / exact_cos.shape[1]))


@pytest.mark.parametrize("kind,opts", [("ivf", {}), ("ivf", dict(probe="list")),
                                       ("ivf", dict(probe="list", row_lists=2)), ("faiss", {})])
def test_approximate_recall_on_planted_clusters(rng, kind, opts):
    """Default nlist/nprobe on clustered features (each IVF probing: per row cell, per row, rows in two lists):
    ≥ 95 % of the exact inter-image neighbours found, and the recall the search reports agrees with the recall
    measured here on every row."""
    if kind == "faiss":
        pytest.importorskip("faiss", reason="faiss-cpu is not installed (optional extra `bench`)")
    x = planted(rng, 150)                                        # 3000 tokens, nlist 64
    k = 10
    img = np.arange(x.shape[0]) // PER
    s = knn_search.Search(kind, **opts)
    if kind == "ivf":
        idx, cos = knn_search.ivf_topk_jit(jnp.asarray(x), jnp.asarray(x), jnp.asarray(img), jnp.asarray(img),
                                           jnp.ones(x.shape[0], bool), k, s)
    else:
        idx, cos = knn_search.faiss_topk(x, x, img, img, np.ones(x.shape[0], bool), k, s)
    idx, cos = np.asarray(idx), np.asarray(cos)
    ei, ec = exact_sets(x, k)
    assert (img[idx] != img[:, None]).all(), "a neighbour in the row's own image"
    assert np.allclose(cos, np.einsum("nd,nkd->nk", x, x[idx]), atol=1e-5), "cosines are not the pairs' cosines"
    assert len({tuple(r) for r in np.sort(idx, 1)}) > 1 and all(len(set(r)) == k for r in idx), "duplicates"
    measured = true_recall(cos, ec)
    assert measured >= 0.95, measured
    reported = float(knn_search.recall(jnp.asarray(x), jnp.asarray(x), jnp.asarray(img), jnp.asarray(img),
                                       jnp.ones(x.shape[0], bool), jnp.asarray(cos), k, x.shape[0], 0))
    assert abs(reported - measured) < 1e-6
    # the estimate on a 300-row sample is close to the whole
    sample = float(knn_search.recall(jnp.asarray(x), jnp.asarray(x), jnp.asarray(img), jnp.asarray(img),
                                     jnp.ones(x.shape[0], bool), jnp.asarray(cos), k, 300, 1))
    assert abs(sample - measured) < 0.05


def test_faiss_leaves_out_the_own_group_when_its_columns_are_scattered(rng):
    """faiss_topk's per-group ID selector (FAISS_OVERFETCH lowered so that 20-token images take it): with the tokens
    shuffled (each image's columns no longer a range) every cell probed gives the exact inter-image top-k, never a
    column of the row's own image or a masked one; the same as over-fetching."""
    pytest.importorskip("faiss", reason="faiss-cpu is not installed (optional extra `bench`)")
    x = planted(rng, 30)
    k = 6
    perm = rng.permutation(x.shape[0])
    xs, img = x[perm], (np.arange(x.shape[0]) // PER)[perm]
    ok = np.ones(x.shape[0], bool)
    ok[img == 4] = False
    s = knn_search.Search("faiss", nlist=4, nprobe=4)
    over = knn_search.faiss_topk(xs, xs, img, img, ok, k, s)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(knn_search, "FAISS_OVERFETCH", PER - 1)
        idx, cos = knn_search.faiss_topk(xs, xs, img, img, ok, k, s)
    np.testing.assert_allclose(cos, over[1], atol=1e-6)
    _, ec = kernels.topk_inter(jnp.asarray(xs), jnp.asarray(xs), jnp.asarray(img), jnp.asarray(img),
                               jnp.asarray(ok), k, 64)
    np.testing.assert_allclose(cos, np.asarray(ec), atol=1e-5)
    assert (img[idx] != img[:, None]).all() and ok[idx].all()


def test_faiss_keeps_its_centroids_and_lists_between_tries(rng):
    """faiss_topk with `same` (each column's list taken from its row's probes) and a `cache` kept between tries (a
    retry with more lists probed reuses the centroids and lists, a changed nlist rebuilds them) gives what faiss's
    own IndexIVFFlat search gives — trained on the same sample, every column assigned and every row probed by faiss
    itself — on both of its paths (over-fetch, per-image ID selector), the rows' probes found in chunks."""
    faiss = pytest.importorskip("faiss", reason="faiss-cpu is not installed (optional extra `bench`)")
    x = planted(rng, 40)
    k, c = 6, x.shape[0]
    img = np.arange(c) // PER
    ok = np.ones(c, bool)
    ok[img == 3] = False

    def reference(s):                               # faiss's own train / add / search, the own image dropped after
        pl = knn_search.plan(c, k, s)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(x.shape[1]), x.shape[1], pl["nlist"], faiss.METRIC_INNER_PRODUCT)
        index.cp.seed, index.cp.niter = s.seed, s.iters
        index.cp.max_points_per_centroid = pl["sample"] // pl["nlist"]
        index.cp.min_points_per_centroid = min(index.cp.min_points_per_centroid, index.cp.max_points_per_centroid)
        index.train(x[np.random.default_rng(s.seed).choice(c, pl["sample"], replace=False)])
        index.add_with_ids(x[ok], np.flatnonzero(ok).astype(np.int64))
        index.nprobe = pl["nprobe"]
        cos, ids = index.search(x, k + PER)
        cos = np.where((ids < 0) | (img[np.maximum(ids, 0)] == img[:, None]), -np.inf, cos)
        return -np.sort(-cos, axis=1)[:, :k]

    for over in (PER, PER - 1):                     # groups of PER tokens: over-fetched, then the selector
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(knn_search, "FAISS_OVERFETCH", over)
            mp.setattr(knn_search, "FAISS_QUANT_ROWS", 37)          # the rows' probes (and searches) in chunks
            kept = {}
            for s in (knn_search.Search("faiss", nlist=16, nprobe=2), knn_search.Search("faiss", nlist=16, nprobe=4),
                      knn_search.Search("faiss", nlist=8, nprobe=3)):
                before = kept.get("centroids")
                idx, cos = knn_search.faiss_topk(x, x, img, img, ok, k, s, same=True, cache=kept)
                assert (kept["centroids"] is before) == (s.nprobe == 4), "kept between tries, rebuilt for nlist 8"
                np.testing.assert_allclose(cos, reference(s), atol=1e-6)
                alone = knn_search.faiss_topk(x, x.copy(), img, img, ok, k, s)
                np.testing.assert_array_equal(idx, alone[0])
                assert (img[idx] != img[:, None]).all() and ok[idx].all()


def test_recall_counts_what_is_missing(rng):
    """recall is 1 for the exact result and drops by the share of neighbours replaced with worse ones."""
    x = planted(rng, 30)
    k = 6
    img = jnp.arange(x.shape[0], dtype=jnp.int32) // PER
    ok = jnp.ones(x.shape[0], bool)
    _, ec = exact_sets(x, k)
    r = lambda c: float(knn_search.recall(jnp.asarray(x), jnp.asarray(x), img, img, ok, jnp.asarray(c), k, 10_000, 0))
    assert r(ec) == 1.0
    worse = ec.copy()
    worse[:, k // 2:] = -1.0                                      # half of every row's neighbours lost
    assert abs(r(worse) - 0.5) < 1e-6


@pytest.mark.parametrize("kind,opts", [("ivf", {}), ("ivf", dict(probe="list")),
                                       ("ivf", dict(probe="list", row_lists=3)), ("faiss", {})])
def test_knn_graph_with_all_cells_probed_is_the_exact_graph(rng, kind, opts):
    """Probing every cell makes the approximate search exact: the same graph (indices, weights, degrees) as
    search="exact", batched over S = 2 graphs, with a dropped image, and reported recall 1 (row_lists 3: a column
    found from several lists is not a duplicate neighbour)."""
    if kind == "faiss":
        pytest.importorskip("faiss", reason="faiss-cpu is not installed (optional extra `bench`)")
    n_img = 12
    x = planted(rng, n_img, batch=(2,))
    valid = np.ones(n_img, bool)
    valid[3] = False
    kw = dict(k_intra=4, k_inter=7, min_cos=0.1, valid=valid)
    ge = graphs.knn(x, x, GRID, n_img, search="exact", **kw)
    ga, info = graphs.knn(x, x, GRID, n_img, search=knn_search.Search(kind, nlist=8, nprobe=10_000, **opts),
                          info=True, **kw)
    assert info["search"] == kind and info["nlist"] == 8
    np.testing.assert_array_equal(np.asarray(info["recall"]), [1.0, 1.0])
    we, wa = np.asarray(ge.w), np.asarray(ga.w)
    np.testing.assert_allclose(wa, we, atol=1e-6)
    live = we > 0
    np.testing.assert_array_equal(np.asarray(ga.idx)[live], np.asarray(ge.idx)[live])
    np.testing.assert_allclose(np.asarray(ga.deg), np.asarray(ge.deg), atol=1e-5)
    assert (wa.reshape(2, n_img, PER, -1)[:, 3] == 0).all()
    assert not np.isin(np.asarray(ga.idx)[wa > 0] // PER, [3]).any(), "a dropped image is somebody's neighbour"


@pytest.mark.parametrize("probe", knn_search.PROBES)
def test_ivf_graph_under_jit_and_deterministic(rng, probe):
    """search="ivf" (each probing) runs under jit; the same seed gives the identical graph and recall, twice."""
    n_img = 40
    x = planted(rng, n_img)
    s = knn_search.Search("ivf", nlist=16, nprobe=4, seed=3, probe=probe)

    def build(x):
        g, info = graphs.knn(x, x, GRID, n_img, 3, 8, search=s, info=True)
        return g, info["recall"]

    f = jax.jit(build)
    (g1, r1), (g2, r2), (g3, r3) = f(x), f(x), build(x)
    for g in (g2, g3):
        np.testing.assert_array_equal(np.asarray(g.idx), np.asarray(g1.idx))
        np.testing.assert_array_equal(np.asarray(g.w), np.asarray(g1.w))
    assert float(r1) == float(r2) == float(r3)
    assert 0.5 < float(r1) <= 1.0


def test_auto_picks_the_checked_ivf_only_above_its_size(rng, monkeypatch):
    """auto: exact below AUTO_MIN_COLUMNS, under jit (tracers) and with a mesh, with or without faiss; above it on
    concrete inputs, the checked search (lists of ≈ 2·AUTO_CELL columns, min_recall AUTO_MIN_RECALL): faiss with
    AUTO_FAISS_NPROBE lists where faiss is installed and the backend is the CPU, else the IVF (probe list,
    AUTO_NPROBE cells), keeping the caller's seed; ivf by name runs once, as asked."""
    for faiss in (True, False):
        monkeypatch.setattr(knn_search, "faiss_available", lambda: faiss)
        assert knn_search.resolve("auto", knn_search.AUTO_MIN_COLUMNS - 1, True, None).kind == "exact"
        s = knn_search.resolve(knn_search.Search("auto", seed=5), 10 ** 6, True, None)
        want = ("faiss", knn_search.AUTO_FAISS_NPROBE) if faiss else ("ivf", knn_search.AUTO_NPROBE)
        assert (s.kind, s.nprobe, s.min_recall, s.seed) == (*want, knn_search.AUTO_MIN_RECALL, 5)
        assert knn_search.auto_search(10 ** 6, kind="ivf").probe == "list"
        assert s.nlist == knn_search.AUTO_MAX_NLIST              # 10⁶ / 128 → 8192, capped
        assert knn_search.resolve("auto", 10 ** 6, False, None).kind == "exact"
        assert knn_search.resolve("auto", 10 ** 6, True, object()).kind == "exact"
        assert knn_search.resolve(knn_search.Search("auto", recall_rows=0), 10 ** 6, True, None).kind == "exact"
    n_img = 10
    x = planted(rng, n_img)
    assert graphs.knn(x, x, GRID, n_img, 3, 5, info=True)[1]["search"] == "exact"
    g, info = graphs.knn(x, x, GRID, n_img, 3, 5, search="ivf", info=True)
    assert info["search"] == "ivf" and "tries" not in info


def test_next_try_doubles_until_its_kind_s_share_of_the_columns():
    """`next_try`: twice the cells (ivf) or lists (faiss) until a try would probe 1/AUTO_MAX_SHARE[kind] of the
    columns, then exact — the JAX IVF to 1/8 (its scan ≈ 2–3× the exact kernel's cost per pair), faiss to 1/32. At 10⁶
    columns auto's IVF (4096 lists, cells of 128) makes a second try of 512 cells (6.5 %); at 2·10⁵ its first
    try already probes 7 % and the next would pass 1/8; faiss tries 24, 48, 96 of 4096 lists."""
    def tries(c, kind):
        s, out = knn_search.auto_search(c, kind=kind), []
        while s.kind != "exact":
            out.append(s.nprobe)
            s = knn_search.next_try(c, 10, s)
        return out

    assert tries(10 ** 6, "ivf") == [256, 512]
    assert knn_search.plan(10 ** 6, 10, knn_search.auto_search(10 ** 6, kind="ivf"))["cap"] == 128
    assert tries(2 * 10 ** 5, "ivf") == [256]
    assert tries(4 * 10 ** 5, "ivf") == [256, 512]
    assert tries(10 ** 6, "faiss") == [24, 48, 96]
    assert knn_search.last_try(10 ** 6, 10, knn_search.auto_search(10 ** 6, kind="ivf")).nprobe == 512
    for c in (10 ** 5, 10 ** 6, 10 ** 7):                       # the last try is within the share
        pl = knn_search.plan(c, 10, knn_search.last_try(c, 10, knn_search.auto_search(c, kind="ivf")))
        share = knn_search.AUTO_MAX_SHARE["ivf"]
        assert pl["nprobe"] == knn_search.AUTO_NPROBE or pl["nprobe"] * pl["cap"] * share <= c


def test_checked_ivf_probes_more_until_its_recall_is_reached_or_goes_exact(rng, monkeypatch):
    """A checked IVF (min_recall) searches again with twice the cells while the sampled recall of the worst graph is
    short: the tries double nprobe, the last one reaches min_recall and the graph is that try's (the same as one
    unchecked search at its nprobe); where no affordable try reaches it (min_recall 1 on unstructured features),
    the exact graph (AUTO_MAX_SHARE lowered so that the tries go further at this small N). auto above a (lowered)
    AUTO_MIN_COLUMNS does the same; a seed gives the same result twice."""
    monkeypatch.setitem(knn_search.AUTO_MAX_SHARE, "ivf", 2)     # tries up to half the columns at this small N
    n_img = 60                                                   # 1200 tokens
    x = planted(rng, n_img, d=24, clusters=40, noise=0.5, batch=(2,))
    kw = dict(k_intra=3, k_inter=8, min_cos=-0.9)
    s = knn_search.Search("ivf", nlist=64, nprobe=1, probe="list", min_recall=0.9, recall_rows=400)
    calls, truth = [], graphs._recall_truth
    monkeypatch.setattr(graphs, "_recall_truth", lambda *a: calls.append(a[-2:]) or truth(*a))
    g, info = graphs.knn(x, x, GRID, n_img, search=s, info=True, **kw)
    ps = [t["nprobe"] for t in info["tries"]]
    assert len(ps) >= 2 and ps == [2 ** i for i in range(len(ps))], info["tries"]
    assert calls == [(400, 0)], "the sample's exact search: once for all the tries"
    assert all(t["recall"] < 0.9 for t in info["tries"][:-1]) and info["tries"][-1]["recall"] >= 0.9
    assert info["search"] == "ivf" and info["nprobe"] == ps[-1] and float(np.min(info["recall"])) >= 0.9
    once, oi = graphs.knn(x, x, GRID, n_img, search=dataclasses.replace(s, nprobe=ps[-1], min_recall=None),
                          info=True, **kw)
    np.testing.assert_array_equal(np.asarray(g.idx), np.asarray(once.idx))
    assert info["tries"][-1]["recall"] == round(float(np.min(oi["recall"])), 6)     # the reused sample's recall
    g2, info2 = graphs.knn(x, x, GRID, n_img, search=s, info=True, **kw)
    assert info2["tries"] == info["tries"]
    np.testing.assert_array_equal(np.asarray(g2.w), np.asarray(g.w))

    u = rng.normal(size=(n_img * PER, 48)).astype(np.float32)    # unstructured: recall 1 is not affordable
    ge = graphs.knn(u, u, GRID, n_img, search="exact", **kw)
    gx, ix = graphs.knn(u, u, GRID, n_img, search=dataclasses.replace(s, nprobe=16, min_recall=1.0), info=True,
                        **kw)                                    # tries at 16 and 32 cells, then exact
    assert ix["search"] == "exact" and len(ix["tries"]) >= 1 and float(ix["recall"]) == 1.0
    np.testing.assert_array_equal(np.asarray(gx.idx), np.asarray(ge.idx))

    monkeypatch.setattr(knn_search, "AUTO_MIN_COLUMNS", 1000)
    monkeypatch.setattr(knn_search, "AUTO_CELL", 8)
    ga, ia = graphs.knn(x[0], x[0], GRID, n_img, info=True, **kw)
    first = knn_search.AUTO_FAISS_NPROBE if knn_search.faiss_available() else knn_search.AUTO_NPROBE
    cells = knn_search.plan(n_img * PER, 8, knn_search.auto_search(n_img * PER))["cells"]   # 139 cells here
    assert ia["search"] in ("ivf", "faiss", "exact") and ia["tries"][0]["nprobe"] == min(first, cells)
    assert ia["min_recall"] == knn_search.AUTO_MIN_RECALL and float(ia["recall"]) >= knn_search.AUTO_MIN_RECALL
    with pytest.raises(InputError, match="min_recall"):
        jax.jit(lambda x: graphs.knn(x, x, GRID, n_img, search=s, **kw).w)(x)


def test_checked_faiss_probes_more_lists_until_its_recall_is_reached(rng):
    """The checked search with faiss: nprobe (lists) doubles until the sampled recall reaches min_recall, and the
    graph is that of one faiss search at the last nprobe."""
    pytest.importorskip("faiss", reason="faiss-cpu is not installed (optional extra `bench`)")
    n_img = 60
    x = planted(rng, n_img, d=24, clusters=40, noise=0.5)
    kw = dict(k_intra=3, k_inter=8, min_cos=-0.9)
    s = knn_search.Search("faiss", nlist=64, nprobe=1, min_recall=0.9, recall_rows=400)
    g, info = graphs.knn(x, x, GRID, n_img, search=s, info=True, **kw)
    ps = [t["nprobe"] for t in info["tries"]]
    assert len(ps) >= 2 and ps == [2 ** i for i in range(len(ps))] and info["search"] == "faiss", info["tries"]
    assert info["tries"][-1]["recall"] >= 0.9 > info["tries"][-2]["recall"]
    once = graphs.knn(x, x, GRID, n_img, search=dataclasses.replace(s, nprobe=ps[-1], min_recall=None), **kw)
    np.testing.assert_array_equal(np.asarray(g.idx), np.asarray(once.idx))


def test_top_k_grouped_is_top_k(rng):
    """top_k by group maxima (`kernels.top_k_grouped`, the exact search's and the list scan's): lax.top_k's values
    and indices — ties across and within groups to the lower index, ±0.0 in top_k's order, −inf rows, NaN, and
    widths g does not divide included."""
    x = rng.normal(size=(6, 7, 96)).astype(np.float32)
    x[0, 0] = -np.inf
    x[1, :, 10:20] = 2.0                                          # ties across groups
    x[2, :, ::3] = -np.inf
    x[3] = np.where(rng.random((7, 96)) < 0.5, 0.0, -0.0)         # zeros of both signs: +0.0 ranks above −0.0
    x[3, :, 50] = 0.5
    x[4, :, ::7] = 1.0                                            # a tie at the k-th value in groups with larger maxima
    x[4, :, 40] = 3.0
    x[5, 2, 33] = np.nan
    for w, k in ((96, 10), (96, 1), (90, 10), (96, 13), (24, 5), (96, 12)):
        v, i = kernels.top_k_grouped(jnp.asarray(x[..., :w]), k)
        rv, ri = jax.lax.top_k(jnp.asarray(x[..., :w]), k)
        np.testing.assert_array_equal(np.asarray(v), np.asarray(rv))
        np.testing.assert_array_equal(np.asarray(i), np.asarray(ri))
        assert np.array_equal(np.signbit(np.asarray(v)), np.signbit(np.asarray(rv)))
    assert knn_search.top_k_grouped is kernels.top_k_grouped


@pytest.mark.parametrize("search,match", [
    ("bogus", "search='bogus'"),
    (7, "search=7"),
    (dict(kind="ivf", nprobe=0), "nprobe=0"),
    (dict(kind="ivf", nlist=2.5), "nlist=2.5"),
    (dict(kind="ivf", seed=-1), "seed=-1"),
    (dict(kind="ivf", recall_rows=True), "recall_rows=True"),
    (dict(kind="ivf", probe="cell"), "probe='cell'"),
    (dict(kind="ivf", row_lists=0), "row_lists=0"),
])
def test_bad_search_arguments(rng, search, match):
    """Each bad search argument is one InputError naming it, raised before any search."""
    x = planted(rng, 4)
    with pytest.raises(InputError) as e:
        s = knn_search.Search(**search) if isinstance(search, dict) else search
        graphs.knn(x, x, GRID, 4, 2, 3, search=s)
    assert str(e.value).startswith(match) and "\n" not in str(e.value)


def test_search_that_cannot_run_is_an_input_error(rng, monkeypatch):
    x = planted(rng, 4)
    with pytest.raises(InputError, match="sharded over a mesh"):
        graphs.knn(x, x, GRID, 4, 2, 3, search="ivf", mesh=jax.make_mesh((1,), ("data",)))
    if knn_search.faiss_available():
        with pytest.raises(InputError, match="cannot run under jit"):
            jax.jit(lambda x: graphs.knn(x, x, GRID, 4, 2, 3, search="faiss").w)(x)
    monkeypatch.setattr(knn_search, "faiss_available", lambda: False)
    with pytest.raises(InputError, match="pip install faiss-cpu"):
        graphs.knn(x, x, GRID, 4, 2, 3, search="faiss")


def test_search_options_are_frozen_and_hashable():
    s = knn_search.Search("ivf", nlist=4)
    assert hash(s) == hash(knn_search.Search("ivf", nlist=4))
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.nlist = 5


def test_recall_sample_is_not_the_kmeans_sample():
    """The reported recall estimates the whole graph's: its row sample is drawn independently of the k-means sample
    (the same seed once drew both, so the sampled rows were the centroids' seeds — rows in the middle of their
    lists — and on unstructured features the estimate came out several times the true recall)."""
    rng = np.random.default_rng(0)
    n_img, k = 200, 8
    x = rng.normal(size=(n_img * PER, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    s = knn_search.Search("ivf", nlist=64, nprobe=2, recall_rows=64, seed=0)
    g, info = graphs.knn(x, x, GRID, n_img, 0, k, min_cos=-0.999, search=s, info=True)
    _, ec = exact_sets(x, k)
    cos = np.einsum("nd,nkd->nk", x, x[np.asarray(g.idx)])
    whole = true_recall(np.where(np.asarray(g.w) != 0, cos, -np.inf), ec)
    assert whole < 0.9, whole                                     # the search misses some: the test can tell
    assert abs(float(info["recall"]) - whole) < 0.1, (float(info["recall"]), whole)


def test_nearest_centroid_is_top_k_of_one(rng):
    """`_best` with k = 1 (every list assignment: k-means, the columns, a probe's rows) is `lax.top_k(·, 1)`'s answer
    — the score and, among tied centroids, the lowest index — in other tiles and with a mask; rows past a tile
    boundary, a zero row and a NaN row (top_k's order: NaN above every number) included."""
    from jax import lax

    x = planted(rng, 70)                                                 # 1400 rows: two tiles of NEAREST_BLOCK
    c = x[rng.choice(1400, 40, replace=False)]
    x[5] = 0.0                                                           # cosines ±0.0 only: +0.0 ranks higher
    x[1100, 3] = np.nan                                                  # NaN ranks above every number
    x = jnp.asarray(x)
    c = jnp.asarray(np.concatenate([c, c[::3]]))                         # every third centroid twice: ties
    cos = jnp.dot(x, c.T, preferred_element_type=jnp.float32)
    for ok in (None, jnp.asarray(rng.random(c.shape[0]) < 0.6), jnp.zeros(c.shape[0], bool)):
        ref_s, ref_i = lax.top_k(cos if ok is None else jnp.where(ok[None, :], cos, -jnp.inf), 1)
        s, i = knn_search._best(x, c, 1, ok)
        assert s.shape == (1400, 1) and i.dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(i), np.asarray(ref_i))
        np.testing.assert_array_equal(np.asarray(s), np.asarray(ref_s))
    tied = np.asarray(knn_search._best(x, c, 1)[1][:, 0])
    assert np.isin(tied, np.arange(0, 40, 3)).any()                        # the lower twin of a tied pair won
