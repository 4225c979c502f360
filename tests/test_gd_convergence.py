"""The gradient solvers say whether they converged: `solvers.gd` (eigen: the Ritz pairs' relative residuals; paper:
the stationarity of its loss), per-image stacks, the dataset's minibatch gd (summary.json's "convergence") and the
CLI's one-line summaries."""

import json
import warnings

import numpy as np
import optax
import pytest
from sjtest import planted_qk

import spectral_jax as sj
from spectral_jax import graphs, solvers
from spectral_jax.cli import main
from spectral_jax.errors import InputError
from spectral_jax.dataset import summary
from spectral_jax.objective import dense_operators, normalised_weights
from spectral_jax.solvers import gd as gd_mod
from spectral_jax.solvers.gd import EIGEN_TOL, STATIONARITY_TOL, stationarity
from spectral_jax.taps import LayerTap, Taps

GRID = (8, 8)
REPORT = {"converged", "criterion", "iterations", "tol", "max_residual", "residuals", "stationarity",
          "stationarity_window"}


def _planted(rng, grid=GRID, groups=4):
    q, k, _ = planted_qk(rng, grid, groups=groups, layers=2, heads=2, dim=8)
    return q, k


def _no_warning(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        return fn()


def test_eigen_converges_with_enough_steps_and_measures_true_residuals(rng):
    """A planted problem, K at its gap: the default steps reach tol without a warning, and the reported residuals
    are the ones recomputed from the dense A of the linearised objective."""
    g = graphs.attention(*_planted(rng), GRID)
    res = _no_warning(lambda: solvers.gd.gd(g, 4, steps=150))
    c = res.convergence
    assert REPORT == set(c.as_dict()) and REPORT <= set(res.summary()) and c.converged is True, c
    assert c.iterations == res.steps == 150 and c.tol == EIGEN_TOL and c.criterion == "max_residual <= tol"
    assert c.max_residual <= EIGEN_TOL and len(c.residuals) == 4
    a, _ = dense_operators([g], normalised_weights([g], None), GRID, 1)
    a = np.asarray(a, np.float64)
    x = res.eigvecs[0].reshape(4, -1).T.astype(np.float64)
    ax = a @ x
    lam = res.eigvals[0].astype(np.float64)
    want = np.linalg.norm(ax - lam * x, axis=0) / (np.linalg.norm(ax, axis=0) + np.abs(lam))
    np.testing.assert_allclose(c.residuals, want, rtol=0.05, atol=2e-5)


def test_eigen_too_few_steps_is_not_converged_and_warns(rng):
    g = graphs.attention(*_planted(rng), GRID)
    with pytest.warns(RuntimeWarning, match=r"gd-eigen: not converged after 3 steps.*raise steps.*exact"):
        res = solvers.gd.gd(g, 4, steps=3)
    assert res.convergence.converged is False and res.convergence.max_residual > EIGEN_TOL
    # a tol the run meets: converged, no warning (the same run, the verdict is only the threshold)
    loose = _no_warning(lambda: solvers.gd.gd(g, 4, steps=3, tol=1.0))
    assert loose.convergence.converged is True and loose.convergence.residuals == res.convergence.residuals


def test_stationarity_measures_the_last_window_against_the_whole_change():
    assert stationarity(np.r_[9.0, np.full(19, 3.0)], 2) == 0.0             # moved, then flat: settled
    assert stationarity(np.full(20, 3.0), 2) is None                         # flat from the start: never moved
    assert stationarity(3.0 + 3e-7 * np.arange(20), 2) is None               # a change within float32 rounding
    assert gd_mod.unmoved(np.full(20, 3.0), 2) and not gd_mod.unmoved(np.r_[9.0, np.full(19, 3.0)], 2)
    ramp = np.arange(100.0)                                                  # steady slope: window / (S − …)
    assert stationarity(ramp, 10) == pytest.approx(10 / (94.5 - 0.0))
    settle = 1.0 + np.exp(-np.arange(200) / 10.0)                            # decays to 1
    assert stationarity(settle, 20) < 1e-6
    assert stationarity(np.ones(3), 2) is None                               # fewer than two windows
    assert stationarity([5.0, 4.0, 3.0, 2.0], 1, start=10.0) == pytest.approx(1 / 8)


def test_paper_stationarity_both_ways(rng):
    """paper: converged when its loss has stopped moving (not by residual: its fixed point is no eigenbasis)."""
    g = graphs.attention(*_planted(rng), GRID)
    with pytest.warns(RuntimeWarning, match=r"gd-paper: not converged after 20 steps: loss still moving"):
        short = solvers.gd.gd(g, 4, preset="paper", steps=20)
    assert short.convergence.converged is False and short.convergence.stationarity > STATIONARITY_TOL
    assert short.convergence.criterion == "stationarity <= tol"
    ran = _no_warning(lambda: solvers.gd.gd(g, 4, preset="paper", steps=400, lr=0.1))
    done, h = ran.convergence, ran.history[0]
    assert done.converged is True and done.stationarity <= STATIONARITY_TOL, done
    w = done.stationarity_window
    assert w == 40 and done.stationarity == pytest.approx(stationarity(h, w))
    assert len(done.residuals) == 4 and np.isfinite(done.max_residual)   # still reported
    with pytest.warns(RuntimeWarning, match="too few"):
        assert solvers.gd.gd(g, 4, preset="paper", steps=1).convergence.stationarity is None
    # a learning rate too small to move the loss: a still loss, not a fixed point found — not converged, and why
    with pytest.warns(RuntimeWarning, match="gd-paper: not converged after 100 steps: the loss never moved"):
        still = solvers.gd.gd(g, 4, preset="paper", steps=100, lr=1e-12).convergence
    assert still.converged is False and still.stationarity is None


def test_paper_saturated_softmax_is_a_stuck_point_not_convergence(rng):
    """A huge lr throws the logits apart in a step or two: every node's softmax one-hot to float32, no gradient,
    and a loss that then stands still (stationarity 0) where it landed — not converged, and `kind` says why."""
    g = graphs.attention(*_planted(rng), GRID)
    with pytest.warns(RuntimeWarning, match=r"gd-paper: not converged after 100 steps: the softmax maps saturated "
                                            r"\(100.0% of the nodes.*lower lr"):
        stuck = solvers.gd.gd(g, 4, preset="paper", steps=100, lr=1e6).convergence
    assert stuck.converged is False and stuck.stationarity <= STATIONARITY_TOL and "saturated" in stuck.kind
    assert gd_mod.saturation(np.eye(4, dtype=np.float32)[:, :, None, None].repeat(3, 2)) == 1.0
    maps = np.full((1, 4, 2, 2), 0.25, np.float32)
    assert gd_mod.saturation(maps) == 0.0                     # a settled run at the preset's lr: none one-hot
    ran = _no_warning(lambda: solvers.gd.gd(g, 4, preset="paper", steps=400, lr=0.1))
    assert ran.convergence.converged is True and ran.convergence.kind is None


def test_paper_collapsed_maps_are_not_converged_and_a_rank_loss_is_one_error(rng):
    """lam 0 (or tiny): nothing keeps the softmax maps apart, they fall onto one another and the loss stands still
    — not converged (`spread` < COLLAPSED, kind says so); maps spanning fewer than K dimensions (the conv prior
    at lam 1e-3) are one InputError naming lam, not LAPACK's 'Matrix is not positive definite'."""
    g = graphs.attention(*_planted(rng), GRID)
    with pytest.warns(RuntimeWarning, match=r"the maps collapsed onto one another \(their spread .* raise lam"):
        flat = solvers.gd.gd(g, 4, preset="paper", steps=400, lr=0.05, lam=0).convergence
    assert flat.converged is False and flat.stationarity <= STATIONARITY_TOL and "collapsed" in flat.kind
    x = np.random.default_rng(1).random((2, 4, 3, 3)).astype(np.float32)
    assert gd_mod.spread(np.eye(4, dtype=np.float32)[None, :, :, None]) == pytest.approx(1.0)
    assert 0 < gd_mod.spread(x) < 1
    whole = np.concatenate([m.reshape(4, -1).T for m in x.astype(np.float64)])          # [2·9, 4]
    sv = np.linalg.svd(whole / np.linalg.norm(whole, axis=0), compute_uv=False)
    assert gd_mod.spread(x) == pytest.approx(sv[-1] / sv[0], rel=1e-12)     # streamed QR: the whole SVD's ratio
    assert gd_mod.spread(np.repeat(x[:, :1], 4, 1)) < 1e-14                  # a Gram matrix's sqrt floors at ~1e-8
    assert gd_mod.spread(x[:1, :, :1, :3]) == 0.0                            # 3 nodes: fewer than K = 4 dimensions
    # the conv prior at lam 1e-3 (300 steps) reaches such maps: spread 1e-47, one map repeated
    with pytest.raises(InputError, match=r"^gd-paper: the 4 maps collapsed onto fewer dimensions .* at lam 0.001"):
        gd_mod._check_spread(np.repeat(x[:, :1], 4, 1), 1e-3)


@pytest.mark.parametrize("preset,fields,what", [("paper", {"lr": 1e38}, "loss"), ("eigen", {"lr": 1e30}, "objective")])
def test_a_diverged_run_is_one_input_error_naming_lr(rng, preset, fields, what):
    """A learning rate that takes the run out of float32 (NaN maps; the conv prior's at lr ≥ 0.1 already): one
    line naming the step and the fix, not LAPACK's 'Eigenvalues did not converge' from the Rayleigh–Ritz step."""
    g = graphs.attention(*_planted(rng), GRID)
    with pytest.raises(InputError, match=rf"gd-{preset}: diverged: the {what} left float32 \(NaN or Inf\) at step "
                                         r"\d+ of 50 at lr 1e?\+?\d* — lower lr \(the preset's default here is "):
        solvers.gd.gd(g, 4, preset=preset, steps=50, **fields)
    with pytest.raises(InputError, match="lower your optimizer's step size"):
        own = {name: v for name, v in fields.items() if name != "lr"}
        solvers.gd.gd(g, 4, preset=preset, steps=50, optimizer=optax.adam(fields["lr"]), **own)
    q, k = _planted(rng)
    q[0, 0, 0, 5] = np.nan                  # NaN graphs: the loss at the start is NaN — the graphs named, not lr
    with pytest.raises(InputError, match=r"^graphs: the problem's matrix holds NaN or inf .* pass finite features$"):
        solvers.gd.gd(graphs.attention(q, k, GRID), 4, preset=preset, steps=50, **fields)


def _taps(rng, batch=2):
    q, k = _planted(rng)
    q = np.repeat(q[:, None], batch, 1)
    k = np.repeat(k[:, None], batch, 1)
    return Taps({i: LayerTap(q[i], k[i], q[i] + k[i], GRID, 0) for i in range(2)})


def test_per_image_stack_claims_converged_only_when_every_image_does(rng):
    taps = _taps(rng)
    res = _no_warning(lambda: sj.solve(taps, "qk", 4, "gd", steps=150))
    c = res.convergence
    assert res.num_images == 2 and c.converged is True
    assert [p.converged for p in c.per_image] == [True, True]
    assert c.max_residual == max(p.max_residual for p in c.per_image)
    assert res.image(1).convergence == c.per_image[1] and not res.image(1).convergence.per_image
    assert "per_image" not in res.image(1).info
    s = res.summary()                    # summary.json: the aggregate, and each image's own keys
    assert s["converged"] is True and [p["converged"] for p in s["per_image"]] == [True, True]
    with pytest.warns(RuntimeWarning):
        short = sj.solve(taps, "qk", 4, "gd", steps=2)
    assert short.convergence.converged is False


def test_dataset_verdict_from_a_history():
    """Rows [loss_first, loss, objective, images]; 4 steps per epoch."""
    def rows(losses):
        return [[losses[0] + 1.0, x, -x, 4] for x in losses]
    settled = summary.gd_convergence(rows(list(1.0 + np.exp(-np.arange(40) / 3.0))), 4)
    assert settled.converged is True and settled.stationarity_window == 4 and settled.iterations == 40
    assert settled.criterion == "stationarity <= tol" and settled.max_residual is None   # no residual: not claimed
    sloped = summary.gd_convergence(rows(list(10.0 - 0.1 * np.arange(40))), 4)
    assert sloped.converged is False and sloped.stationarity > STATIONARITY_TOL
    one = summary.gd_convergence(rows([3.0, 2.0, 1.5, 1.4]), 4)
    assert one.converged is False and one.stationarity is None
    assert summary.gd_convergence(rows(list(np.linspace(5, 1, 200))), 4).stationarity_window == 20  # 5 epochs


def _dataset_cli(tmp_path, capsys, epochs):
    from test_dataset import make_folder

    folder = make_folder(str(tmp_path / "imgs"), 8)
    out = tmp_path / f"out{epochs}"
    assert main(["dataset", folder, "--model", "dinov2_vits14", "--graph", "knn-vv", "--method", "gd",
                 "--size", "32", "--batch-size", "4", "--num-eigs", "4", "--k-intra", "5", "--k-inter", "5",
                 "--epochs", str(epochs), "--out", str(out)]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    with open(out / "summary.json") as f:
        return line, json.load(f)


def test_dataset_gd_summary_and_cli_report_the_verdict(tmp_path, monkeypatch, capsys):
    """`spectral-jax dataset --method gd` on the synthetic backbone (one object: the second run reuses the
    compiled step): one epoch cannot tell (None, not converged, a warning); three epochs compare the last two."""
    from test_dataset import synthetic

    from spectral_jax.dataset import loop

    backbone = synthetic()
    monkeypatch.setattr(loop, "_load_backbone", lambda settings: backbone)
    with pytest.warns(RuntimeWarning, match=r"dataset gd: not converged after 2 steps: two epochs"):
        line, s = _dataset_cli(tmp_path, capsys, 1)
    assert s["convergence"]["converged"] is False and s["convergence"]["stationarity"] is None
    assert line["converged"] is False and "stationarity" in line and "max_residual" not in line
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        line, s = _dataset_cli(tmp_path, capsys, 3)
    c = s["convergence"]
    hist = np.asarray(s["history"])
    assert c["stationarity_window"] == 2 and c["iterations"] == len(hist) == 6
    assert c["stationarity"] == pytest.approx(stationarity(hist[:, 1], 2, hist[0, 0]))
    assert c["converged"] is (c["stationarity"] <= c["tol"]) and "not a residual" in c["kind"]
    assert line["converged"] is c["converged"] and line["stationarity"] == pytest.approx(c["stationarity"])
    back = sj.dataset.load_result(str(tmp_path / "out3"))          # typed again, the same record
    assert back.convergence.as_dict() == c and back.convergence.max_residual is None
    # a gd run's Result fields as documented (`DatasetResult`): no whole-dataset eigenvalues, the minibatch objective
    assert isinstance(back, sj.Result) and back.eigvals.shape == (8, 4) and np.isnan(back.eigvals).all()
    assert back.rq.shape == (8, 0, 4) and back.history.shape == (8, 0) and back.joint
    assert back.provenance.graph == "knn-vv" and back.provenance.layers == (0, 1)    # summary.json's, read back
    assert (back.objective == s["objective"]).all() and back.steps == 6 and back.method == "dataset-paper"
    assert s["eigvals_kind"] == summary.GD_EIGVALS and "eigvals" not in s


def test_solve_cli_prints_gd_verdict(tmp_path, rng, capsys):
    from spectral_jax.acts import save_acts

    acts = tmp_path / "a.npz"
    save_acts(str(acts), _taps(rng, 1), "test", (GRID[0] * 14, GRID[1] * 14))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert main(["solve", str(acts), "--graph", "qk", "--num-eigs", "4", "--method", "gd", "--steps", "150",
                     "--out", str(tmp_path / "r.npz")]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["converged"] is True and line["max_residual"] <= line["tol"] and line["iterations"] == 150
