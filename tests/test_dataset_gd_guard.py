"""The dataset gd's guards on what a run can say:

1. a run that leaves float32 stops at the first step whose loss is not finite, in one `InputError` naming the step
   and --lr; no checkpoint holding NaN is written (the checkpoint writer refuses such a state), nothing is
   exported, and the earlier (finite) checkpoints still resume — at a lower --lr too, the lr each span of steps
   ran at recorded in the checkpoints and the summary ("lr_history");
2. a paper run whose table's softmax saturated (a huge lr) is not converged, however still its loss: a stuck point;
   nor is one whose maps collapsed onto one another (lam too small);
3. --min-cos leaving no edge between two tokens is refused as exact refuses it, before anything is written; a loss
   that never moved is not told it needs two epochs;
4. a resume compares resolved settings: --layer-weights uniform resumes a run that left them out (and one made
   before the fingerprint resolved them); --lr at the preset's default adds no span to the lr history.

The synthetic backbone and SMALL settings of test_dataset.
"""

from __future__ import annotations

import json
import os
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from spectral_jax import dataset
from spectral_jax.dataset import checkpoint, loop, step, summary, whole
from spectral_jax.errors import InputError
from test_dataset import SMALL, make_folder, synthetic

GD = {**SMALL, "batch_size": 2, "checkpoint_every": 1}


def _run(folder, out, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)        # "not converged": not what these tests look at
        return dataset.run(folder, out, backbone=synthetic(), **kw)


def _poisoned(monkeypatch, at: int, loss: bool):
    """The compiled step, its state's table NaN after step `at` (and its loss too where `loss`)."""
    real = step.compile_step

    def compile_step(*a, **k):
        compiled = real(*a, **k)

        def call(state, *rest):
            new, m, nonfinite = compiled(state, *rest)
            if int(new.step) == at:
                new = new._replace(table=new.table * jnp.nan)
                m = m._replace(loss=m.loss * jnp.nan) if loss else m
            return new, m, nonfinite

        return call

    monkeypatch.setattr(step, "compile_step", compile_step)


# ----------------------------------------------------------------------------------------------- 1. divergence


def test_diverged_run_is_one_line_naming_lr_and_leaves_nothing(tmp_path):
    folder = make_folder(str(tmp_path / "imgs"), 4)
    out = str(tmp_path / "out")
    with pytest.raises(InputError) as e:
        _run(folder, out, **{**GD, "preset": "eigen", "lr": 1e30, "epochs": 2})
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("dataset gd-eigen: diverged: the loss left float32")
    assert "at step 1 at lr 1e+30" in msg and "lower --lr" in msg and "--method exact" in msg
    assert not os.path.exists(out)                               # no checkpoint, no export


def test_divergence_after_checkpoints_keeps_the_finite_ones_and_they_resume(tmp_path, monkeypatch):
    folder = make_folder(str(tmp_path / "imgs"), 4)
    out = str(tmp_path / "out")
    _poisoned(monkeypatch, at=4, loss=True)
    with pytest.raises(InputError) as e:
        _run(folder, out, **{**GD, "epochs": 3})
    assert "diverged: the loss left float32 (NaN or Inf) at step 4 at lr 0.01" in str(e.value)
    assert "pass --resume to go on from step 3, the last checkpoint (finite)" in str(e.value)
    assert checkpoint.steps(str(tmp_path / "out" / "checkpoints")) == [2, 3]
    assert not os.path.exists(os.path.join(out, "eigvecs.npz"))
    monkeypatch.undo()
    res = _run(folder, out, resume=True, **{**GD, "epochs": 3})   # the kept checkpoints are not "damaged"
    assert res.summary()["steps"] == 6 and res.summary()["resumed_from"] == 3
    assert res.summary()["lr_history"] == [[0, 0.01]]             # one lr throughout


def _diverge_at_4(folder, out, monkeypatch):
    """A run of 3 epochs (6 steps) at lr 0.01 that diverges at step 4: checkpoints 2 and 3 kept."""
    _poisoned(monkeypatch, at=4, loss=True)
    with pytest.raises(InputError, match="diverged"):
        _run(folder, out, **{**GD, "epochs": 3})
    monkeypatch.undo()


def test_a_diverged_run_resumes_at_a_lower_lr_and_records_each_lr(tmp_path, monkeypatch, capsys):
    folder = make_folder(str(tmp_path / "imgs"), 4)
    out, again, plain = (str(tmp_path / n) for n in ("out", "again", "plain"))
    _diverge_at_4(folder, out, monkeypatch)
    capsys.readouterr()
    res = _run(folder, out, resume=True, **{**GD, "epochs": 3, "lr": 0.005})
    said = capsys.readouterr().err
    assert "resuming after step 3: steps 4 on run at lr 0.005, steps 1–3 ran at lr 0.01" in said
    got = res.summary()
    assert got["steps"] == 6 and got["resumed_from"] == 3
    assert got["lr_history"] == [[0, 0.01], [3, 0.005]] and got["lr"] == 0.005
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["lr_history"] == [[0, 0.01], [3, 0.005]]
    assert checkpoint.read_meta(os.path.join(out, "checkpoints"), 6)["lr_history"] == [[0, 0.01], [3, 0.005]]
    # the same recovery again gives the same table; the run that never lowered its lr another one
    _diverge_at_4(folder, again, monkeypatch)
    np.testing.assert_array_equal(_run(folder, again, resume=True, **{**GD, "epochs": 3, "lr": 0.005}).table,
                                  res.table)
    assert np.abs(_run(folder, plain, **{**GD, "epochs": 3}).table - res.table).max() > 1e-4
    # a re-export runs no step: another --lr changes nothing and adds no span; the same lr further adds none
    assert _run(folder, out, resume=True, **{**GD, "epochs": 3, "lr": 1.0}).summary()["lr_history"] == \
        [[0, 0.01], [3, 0.005]]
    assert _run(folder, out, resume=True, **{**GD, "epochs": 4, "lr": 0.005}).summary()["lr_history"] == \
        [[0, 0.01], [3, 0.005]]
    # a resume without --lr keeps the lr the run's last steps ran at (the preset's default, 0.01, diverged here)
    kept = _run(folder, out, resume=True, **{**GD, "epochs": 4})
    assert kept.summary()["lr_history"] == [[0, 0.01], [3, 0.005]] and kept.summary()["lr"] == 0.005
    # a damaged lr history is refused in one line naming the step folder, nothing changed
    meta = os.path.join(out, "checkpoints", "8", "meta", "metadata")
    with open(meta) as f:
        record = json.load(f)
    for bad in ([[1, 0.01]], [[0, 0.01], [3, -1.0]], [[0, 0.01], [9, 0.005]], "0.01"):
        with open(meta, "w") as f:
            json.dump({**record, "lr_history": bad}, f)
        with pytest.raises(InputError, match=r"checkpoints/8: is damaged \(its lr history is not"):
            _run(folder, out, resume=True, **{**GD, "epochs": 5})
        assert checkpoint.steps(os.path.join(out, "checkpoints")) == [7, 8]


def test_a_state_holding_nan_is_never_checkpointed(tmp_path, monkeypatch):
    folder = make_folder(str(tmp_path / "imgs"), 4)
    out = str(tmp_path / "out")
    _poisoned(monkeypatch, at=2, loss=False)                     # the loss finite, the table not
    with pytest.raises(InputError) as e:
        _run(folder, out, **{**GD, "epochs": 2})
    assert "diverged: the state left float32 (NaN or Inf) at step 2" in str(e.value)
    assert checkpoint.steps(str(tmp_path / "out" / "checkpoints")) == [1]


def test_a_loss_an_lr_cut_froze_is_not_converged(tmp_path):
    """Judged against the whole run's change of the loss, steps at a near-zero lr after a resume looked still:
    converged, no warning. The verdict reads the steps since the last lr change."""
    folder = make_folder(str(tmp_path / "imgs"), 4)
    out = str(tmp_path / "out")
    kw = {**SMALL, "preset": "paper", "lr": 0.05}
    _run(folder, out, **kw, epochs=6)
    with pytest.warns(RuntimeWarning, match=r"not converged after 24 steps: the loss never moved from its start "
                                            r"since the lr changed at step 6 .*raise --lr"):
        res = dataset.run(folder, out, backbone=synthetic(), resume=True, **{**kw, "lr": 1e-12, "epochs": 24})
    conv = res.summary()["convergence"]
    assert conv["converged"] is False and "since the lr changed at step 6" in conv["kind"]
    assert summary.gd_verdict([[2.0, 2.0 - 0.1 * i, 0, 4] for i in range(6)] + [[1.4, 1.4, 0, 4]] * 18, 1,
                              since=0).convergence.converged         # the same history read whole: "converged"


# ------------------------------------------------------------------------------------------------ 2. saturation


def test_saturated_paper_run_is_a_stuck_point_not_converged(tmp_path):
    folder = make_folder(str(tmp_path / "imgs"), 4)
    with pytest.warns(RuntimeWarning, match="softmax maps saturated .*a stuck point, not a fixed point; lower --lr"):
        res = dataset.run(folder, str(tmp_path / "out"), backbone=synthetic(), **{**SMALL, "lr": 10, "epochs": 12})
    conv = res.summary()["convergence"]
    assert conv["stationarity"] is not None and conv["stationarity"] <= conv["tol"]     # the loss stood still
    assert conv["converged"] is False and "saturated" in conv["kind"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert summary.gd_convergence([[2.0, 2.0 - 0.1 * i, 0, 4] for i in range(10)] + [[1.0, 1.0, 0, 4]] * 10,
                                      1, saturated=0.1).converged             # below SATURATED: the loss decides


def test_collapsed_paper_run_is_not_converged_and_says_raise_lam(tmp_path):
    """lam 0: nothing keeps the softmax maps apart; the loss settles (stationarity ≪ tol) with the maps collapsed
    onto one another (spread ≈ 3e-3 < COLLAPSED), which is not convergence — lam 1, the same run otherwise, is."""
    folder = make_folder(str(tmp_path / "imgs"), 4)
    kw = {**SMALL, "lr": 0.1, "epochs": 100}
    with pytest.warns(RuntimeWarning, match=r"not converged after 100 steps: the maps collapsed onto one another "
                                            r"\(their spread .* < 0\.05.*; raise lam \(the paper's is 1\)"):
        res = dataset.run(folder, str(tmp_path / "lam0"), backbone=synthetic(), lam=0.0, **kw)
    conv = res.summary()["convergence"]
    assert conv["stationarity"] <= conv["tol"] and conv["converged"] is False and "collapsed" in conv["kind"]
    conv = _run(folder, str(tmp_path / "lam1"), lam=1.0, **kw).summary()["convergence"]
    assert conv["converged"] is True and "collapsed" not in conv["kind"]
    still = [[2.0, 2.0 - 0.1 * i, 0, 4] for i in range(10)] + [[1.0, 1.0, 0, 4]] * 10
    assert summary.gd_convergence(still, 1, spread=0.1).converged                # above COLLAPSED: the loss decides
    moving = [[2.0, 2.0 - 0.1 * i, 0, 4] for i in range(20)]
    assert "collapsed" not in summary.gd_convergence(moving, 1, spread=1e-3).kind  # a moving loss says so first


# ------------------------------------------------------------------------------------------------ 3. no edges


def test_min_cos_leaving_no_edge_is_refused_as_exact_refuses_it(tmp_path):
    folder = make_folder(str(tmp_path / "imgs"), 4)
    out = str(tmp_path / "out")
    with pytest.raises(InputError) as e:
        _run(folder, out, **{**SMALL, "preset": "eigen", "min_cos": 0.999, "epochs": 10})
    with pytest.raises(InputError) as ex:
        whole.check_edges(0, {"min_cos": 0.999, "fraction": {}})
    assert (e.value.what, e.value.problem) == (ex.value.what, ex.value.problem)
    assert "lower --min-cos" in e.value.fix and "\n" not in str(e.value)
    assert not os.path.exists(out)


def test_a_loss_that_never_moved_is_not_told_it_needs_two_epochs():
    verdict = summary.gd_verdict([[0.0, 0.0, 0.0, 4]] * 10, 1)
    assert verdict.convergence.stationarity is None and not verdict.convergence.converged
    with pytest.warns(RuntimeWarning) as w:
        loop._warn_unconverged(verdict)
    msg = str(w[0].message)
    assert "two epochs" not in msg and "never moved" in msg and "raise --lr" in msg
    with pytest.warns(RuntimeWarning, match="two epochs at least"):               # one epoch: too few to tell
        loop._warn_unconverged(summary.gd_verdict([[1.0, 0.5, 0.0, 4]], 1))
    settled = summary.gd_verdict([[2.0, 2.0 - 0.1 * i, 0, 4] for i in range(10)] + [[1.0, 1.0, 0, 4]] * 10, 1)
    assert settled.convergence.converged and settled.why is settled.fix is None
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        loop._warn_unconverged(settled)                                          # converged: nothing to say


# --------------------------------------------------------------------------------------- 4. resolved defaults


def test_resume_given_the_default_lr_or_uniform_weights_continues_and_old_records_still_resume(tmp_path):
    folder = make_folder(str(tmp_path / "imgs"), 4)
    out = str(tmp_path / "out")
    fast = {**SMALL, "checkpoint_every": 1}
    _run(folder, out, **fast, epochs=1)
    assert _run(folder, out, resume=True, **fast, epochs=2, lr=0.01).summary()["lr_history"] == [[0, 0.01]]
    assert _run(folder, out, resume=True, **fast, epochs=3, layer_weights="uniform").summary()["steps"] == 3
    with pytest.raises(InputError, match="other settings: layer_weights 'uniform' → 'geometric'"):
        _run(folder, out, resume=True, **fast, epochs=3, layer_weights="geometric")
    meta = os.path.join(out, "checkpoints", "3", "meta", "metadata")   # as a run made before the fix recorded it
    with open(meta) as f:
        record = json.load(f)
    assert record["config"]["lr"] == 0.01 and record["config"]["layer_weights"] == "uniform"
    record["config"].update(lr=None, layer_weights=None)
    with open(meta, "w") as f:
        json.dump(record, f)
    res = _run(folder, out, resume=True, **fast, epochs=4, lr=0.01, layer_weights="uniform")
    assert res.summary()["steps"] == 4
    np.testing.assert_equal(res.summary()["lr"], 0.01)
    assert res.summary()["lr_history"] == [[0, 0.01]]            # no history in the meta: the one lr it ran at
