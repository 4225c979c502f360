"""`Result`: frozen, a typed convergence record (the same in summary.json), `stack` refusing what it cannot stack,
and RESULT.npz with the image axis always (files of the old layout still read)."""

import dataclasses
import json
import warnings

import numpy as np
import pytest
from sjtest import planted_qk

from spectral_jax import graphs, solvers
from spectral_jax.solvers.result import Convergence, Result, stack

GRID = (6, 6)


def _graph(rng, batch=None):
    q, k, _ = planted_qk(rng, GRID, groups=3, layers=2, heads=2, dim=8)
    return graphs.attention(q, k, GRID)


def _gd(g, steps):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return solvers.gd.gd(g, 3, steps=steps, chunks=1)


def test_result_is_frozen_and_replace_makes_a_copy(rng):
    res = solvers.exact.exact(_graph(rng), 3)
    for field, value in [("eigvals", np.zeros((1, 3))), ("info", {}), ("provenance", None), ("convergence", None)]:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(res, field, value)
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.convergence.converged = False
    other = dataclasses.replace(res, method="other")
    assert other.method == "other" and res.method == "exact-dense" and other.eigvals.shape == (1, 3)


def test_convergence_record_is_typed_and_the_same_in_summary_json(rng, tmp_path):
    g = _graph(rng)
    for res in (solvers.exact.exact(g, 3), solvers.exact.exact(g, 3, dense_max=16, maxiter=400), _gd(g, 20)):
        c = res.convergence
        assert isinstance(c, Convergence) and isinstance(c.converged, bool) and isinstance(c.iterations, int)
        assert isinstance(c.max_residual, float) and len(c.residuals) == 3 and c.max_residual == max(c.residuals)
        assert not {"converged", "iterations", "max_residual"} & set(res.info)      # not an untyped second copy
        path = res.save(str(tmp_path / f"{res.method}.npz"))
        with np.load(path) as f:
            summary = json.loads(str(f["summary"]))
        for key, value in c.as_dict().items():                                      # summary.json's keys stay
            assert summary[key] == pytest.approx(value), key
        assert Result.load(path).convergence == c
    assert _gd(g, 20).convergence.stationarity_window == 2                        # gd also measures stationarity


def test_stack_refuses_histories_of_different_lengths(rng):
    g = _graph(rng)
    a, b = _gd(g, 4), _gd(g, 6)
    with pytest.raises(ValueError, match="history length"):
        stack([a, b])
    both = stack([a, _gd(g, 4)])
    assert both.history.shape == (2, 4) and both.convergence.per_image[0] == a.convergence
    np.testing.assert_array_equal(both.history[0], a.history[0])


@pytest.mark.parametrize("batch", [1, 3])
def test_result_npz_holds_the_design_contract(rng, tmp_path, batch):
    """DESIGN.md's RESULT.npz: eigvecs [B, K, h0, w0], eigvals [K], rq [G, K] for one image (an earlier layout wrote
    [1, K] and [1, G, K], which a script reading eigvals[k] takes a row of); B > 1 images solved one by one, which
    one [K] cannot hold, keep the image axis in front."""
    g = _graph(rng)
    parts = [solvers.exact.exact(g, 3) for _ in range(batch)]
    res = stack(parts)
    path = res.save(str(tmp_path / "r.npz"))
    lead = (batch,) if batch > 1 else ()
    with np.load(path) as f:
        assert f["eigvecs"].shape == (batch, 3, *GRID) and f["eigvals"].shape == (*lead, 3)
        assert f["rq"].shape == (*lead, 4, 3) and f["history"].shape == (*lead, 0)
    back = Result.load(path)
    np.testing.assert_array_equal(back.eigvals, res.eigvals)
    np.testing.assert_array_equal(back.rq, res.rq)
    assert back.convergence == res.convergence
    if batch > 1:                                   # select keeps each image's own record
        two = res.select([0, 2])
        assert two.num_images == 2 and two.convergence.per_image == (parts[0].convergence, parts[2].convergence)
        np.testing.assert_array_equal(two.eigvecs[1], parts[2].eigvecs[0])


def test_result_load_reads_both_layouts(rng, tmp_path):
    """One image and a joint kNN solve of 2 images are written as DESIGN.md says (eigvals [K], rq [G, K], history
    [S]: one solve's values) and read back whole; files of the interim layout that always kept the image axis
    (eigvals [B, K], ...) read the same."""
    g = _graph(rng)
    feats = rng.standard_normal((1, 2 * 36, 8)).astype(np.float32)
    joint = solvers.exact.exact(graphs.knn(feats, feats, GRID, 2, 5, 5), 3)
    for res in (_gd(g, 4), joint):
        new = res.save(str(tmp_path / "new.npz"))
        with np.load(new) as f:
            data = {k: f[k] for k in f.files}
        assert data["eigvals"].shape == (3,) and data["rq"].ndim == 2 and data["history"].ndim == 1
        interim = str(tmp_path / "interim.npz")
        b = res.num_images
        np.savez(interim, **{k: (np.broadcast_to(v, (b, *v.shape)) if k in ("eigvals", "rq", "history") else v)
                             for k, v in data.items()})
        for path in (new, interim):
            back = Result.load(path)
            assert back.joint == res.joint and back.num_images == res.num_images
            np.testing.assert_array_equal(back.eigvals, res.eigvals)
            np.testing.assert_array_equal(back.rq, res.rq)
            np.testing.assert_array_equal(back.history, res.history)
            assert back.convergence.converged == res.convergence.converged


def test_result_load_refuses_what_the_contract_does_not_hold(rng, tmp_path):
    """rq of another K (it was reshaped to [1, 18, 4] silently), NaN eigvecs, and a crafted member whose header
    claims 40 TB: each one InputError line naming the file, nothing allocated for the crafted one."""
    import io
    import zipfile

    from spectral_jax.errors import InputError

    path = solvers.exact.exact(_graph(rng), 3).save(str(tmp_path / "r.npz"))
    d = dict(np.load(path))
    cases = {"rq": {**d, "rq": np.ones((4, 5), np.float32)}, "nan": {**d, "eigvecs": d["eigvecs"] * np.nan}}
    for name, arrays in cases.items():
        np.savez(tmp_path / f"{name}.npz", **arrays)
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": "<f4", "fortran_order": False, "shape": (10 ** 13,)})
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w") as z:
        for k in ("eigvals", "rq", "summary"):
            b = io.BytesIO()
            np.save(b, d[k])
            z.writestr(k + ".npy", b.getvalue())
        z.writestr("eigvecs.npy", head.getvalue() + b"\0" * 64)
    for name, needle in (("rq", r"rq \(4, 5\) is not \[G, K\] or \[B, G, K\] for eigvecs \(1, 3, 6, 6\)"),
                         ("nan", "eigvecs hold NaN or Inf"), ("bomb", "declares shape .* but holds 64 bytes")):
        with pytest.raises(InputError, match=needle) as e:
            Result.load(str(tmp_path / f"{name}.npz"))
        assert f"{name}.npz" in str(e.value) and "\n" not in str(e.value)
    assert Result.load(path).rq.shape == (1, 4, 3)                    # the file as written still reads (2 × 2 graphs)
