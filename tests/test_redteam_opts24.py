"""Red-team regressions (round 24: what a run silently got wrong, reported wrongly or left behind):

- vv at a tiny tau (1/tau far above the features' cosines: τ ≤ 1e-3 on random features) is the identity graph —
  every token's softmax row on itself, every vector an eigenvector —, and at a huge one (τ ≳ 1e5) the uniform
  graph; both were solved and reported converged with arbitrary maps. They are now one `InputError` naming tau,
  before the solve (`graphs.degenerate_gaps`), as the kNN graph of self-edges only is (tests/test_redteam_opts22.py);
- `--layers 3,3` (or 3,-9 on 12 layers) was de-duplicated silently, so numbers given per named layer in
  --layer-weights paired with the wrong layer or were refused as too many; a layer named twice is now refused by
  every reader (`models.parse_layers`, `solve --layers`);
- a run killed outright (kill -9) left its hidden staging — OUT/.tmp-OUT-XXXXXXXX/ (analyze), .tmp-XXXXXXXX.npz
  beside --out (solve, extract) — for good; staging is now held under a flock while its run lives and the next
  writer into the same place removes what nothing holds (`files._sweep`);
- the dataset's summary "edges" counted knn-vv's edge from each token to itself; it counts edges between tokens;
- the sharded path's graph-rows of another process count stayed on disk for good; they go once a run's own are kept.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import spectral_jax as sj
from spectral_jax import graphs as G
from spectral_jax.errors import InputError
from spectral_jax.models import parse_layers
from spectral_jax.taps import LayerTap, Taps


def _taps(rng, grid=(4, 4), dim=8):
    n = grid[0] * grid[1]
    q, k, v = (rng.normal(size=(1, 2, n, dim)).astype(np.float32) for _ in range(3))
    return Taps({i: LayerTap(q, k, v, grid) for i in (0, 1)})


@pytest.mark.parametrize("tau,what,fix", [(1e-30, "the identity", "raise"), (1e-3, "the identity", "raise"),
                                          (1e8, "uniform", "lower"), (1e30, "uniform", "lower")])
def test_vv_at_a_tau_that_leaves_a_degenerate_graph_is_refused(rng, tau, what, fix):
    """τ → 0: every row on its own token (P = I); τ → ∞: every row 1/N (P = 11ᵀ/N). Either way any vector (⊥ 1)
    is an eigenvector and the solve returned noise, reported converged."""
    taps = _taps(rng)
    with pytest.raises(InputError, match=rf"^tau {re.escape(f'{tau:g}')}: leaves every vv graph {what} .* — {fix} tau "
                                         r"\(--tau; the default is 0\.1\)(, or pass images with content)?$"):
        sj.solve(taps, "vv", 3, tau=tau)


def test_qk_graphs_of_tokens_all_alike_are_refused_as_uniform(rng):
    """Every token of an image alike (a constant image under a backbone without positions): the qk graph is 11ᵀ/N,
    and the solve returned rounding noise (eigvals 1, 2e-7, …) reported converged, which `describe` segmented.
    Refused as vv's uniform graph is, naming the images; an image with content beside it is not."""
    alike = np.repeat(rng.normal(size=(2, 2, 1, 4)), 36, axis=2).astype(np.float32)       # [B, H, N, D]
    taps = Taps({0: LayerTap(alike, alike * 0.5, alike, (6, 6))})
    with pytest.raises(InputError, match=r"^qk graphs: every qk graph is uniform \(.*queries and keys are alike"):
        sj.solve(taps, "qk", 3)
    mixed = alike.copy()
    mixed[0] = rng.normal(size=mixed[0].shape)                      # image 0 has content, image 1 not
    with pytest.raises(InputError, match=r"every qk graph of image\(s\) 1 is uniform"):
        sj.solve(Taps({0: LayerTap(mixed, mixed * 0.5, mixed, (6, 6))}), "qk", 3)
    res = sj.solve(Taps({0: LayerTap(mixed[:1], mixed[:1] * 0.5, mixed[:1], (6, 6))}), "qk", 3)
    assert res.convergence.converged


def test_degenerate_gaps_read_the_identity_and_the_uniform_graph(rng):
    res = sj.solve(_taps(rng), "vv", 3, tau=0.1)
    assert res.convergence.converged and not np.allclose(res.eigvals, 1.0)
    x = rng.normal(size=(2, 16, 8)).astype(np.float32)
    gaps = {tau: np.asarray(G.degenerate_gaps(G.value(x, (4, 4), tau=tau))) for tau in (1e-30, 0.1, 1e30)}
    assert gaps[0.1].shape == (2, 2) and (gaps[0.1] > 1e-2).all()          # neither: every gap well above tol
    assert (gaps[1e-30][:, 0] == 0).all() and (gaps[1e-30][:, 1] > 1).all()   # P = I exactly
    assert (gaps[1e30][:, 1] == 0).all() and (gaps[1e30][:, 0] > 0.9).all()   # every row 1/16 exactly


def test_solve_cli_refuses_the_identity_vv_graph_before_writing(tmp_path, capsys, rng):
    from spectral_jax.cli import main

    img, acts, out = tmp_path / "a.png", tmp_path / "a.npz", tmp_path / "r.npz"
    Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(img)
    assert main(["extract", str(img), "--model", "dinov2_vits14", "--weights", "random", "--size", "28",
                 "--layers", "10,11", "--out", str(acts)]) == 0
    capsys.readouterr()
    assert main(["solve", str(acts), "--graph", "vv", "--tau", "1e-30", "--num-eigs", "3", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tau 1e-30: leaves every vv graph the identity" in err[0] and not out.exists()
    assert main(["solve", str(acts), "--layers", "11,-1", "--graph", "qk", "--num-eigs", "3", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--layers 11,-1: names layer(s) 11 more than once (a negative index counts back from the model's 12" in err
    assert not out.exists()
    assert main(["solve", str(acts), "--layers", "10,11", "--layer-weights", "1,0.5", "--graph", "qk",
                 "--num-eigs", "3", "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["layers"] == [10, 11]


@pytest.mark.parametrize("layers", ["3,3", "3,-9", [3, -9], (0, 11, -1)])
def test_a_layer_named_twice_is_refused(layers):
    with pytest.raises(InputError, match=r"names layer\(s\) (3|11) more than once .*model's 12 layers\) — name "
                                         r"each layer once$"):
        parse_layers(layers, 12, "--layers")
    assert parse_layers("3,-1", 12) == (3, 11) and parse_layers("all", 12) is None


def test_extract_refuses_a_layer_named_twice_before_the_model_loads(tmp_path, capsys, rng):
    from spectral_jax.cli import main

    img = tmp_path / "a.png"
    Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(img)
    assert main(["extract", str(img), "--model", "dinov2_vits14", "--weights", "random", "--size", "28",
                 "--layers", "2,2", "--out", str(tmp_path / "a.npz")]) == 2
    assert "--layers 2,2: names layer(s) 2 more than once" in capsys.readouterr().err
    assert not (tmp_path / "a.npz").exists()


# ------------------------------------------------------------------- staging a run killed outright left behind


def _killed(code: str) -> str:
    """Run `code` (with `files` imported) in a child that then SIGKILLs itself; returns what it printed."""
    full = f"import os, signal\nfrom spectral_jax import files\n{code}\nos.kill(os.getpid(), signal.SIGKILL)\n"
    r = subprocess.run([sys.executable, "-c", full], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == -signal.SIGKILL, r.stderr
    return r.stdout.strip()


def test_the_next_writer_removes_staging_a_killed_run_left_and_nothing_live_or_foreign(tmp_path):
    """kill -9 during `analyze` left OUT/.tmp-OUT-XXXXXXXX/ (an `OutputDir`'s staging) and during `solve`/`extract`
    .tmp-XXXXXXXX.npz beside --out (an `OutputFile`'s): hidden, never removed. The staging is now held under a
    flock while its run lives, and the next writer into the same place removes the unheld ones of its own pattern —
    not a live run's, not one holding entries a merge replaced (.old-*), not another output's, not a link."""
    from spectral_jax import files

    out = tmp_path / "out"
    out.mkdir()
    stuck = _killed(f"od = files.OutputDir({str(out)!r}); os.mkdir(os.path.join(od.tmp, '.old-x')); print(od.tmp)")
    dead_dir = _killed(f"od = files.OutputDir({str(out)!r}); open(os.path.join(od.tmp, 'a.txt'), 'w').close(); "
                       "print(od.tmp)")                    # (its own start kept `stuck`: it holds replaced entries)
    dead_file = _killed(f"o = files.OutputFile({str(tmp_path / 'r.npz')!r}); print(o.tmp)")
    assert os.path.isdir(dead_dir) and os.path.isfile(dead_file) and os.path.isdir(stuck)
    foreign = [out / ".tmp-other-abcdefgh", tmp_path / ".tmp-abcdefgh.txt", tmp_path / ".tmp-x.npz"]
    foreign[0].mkdir()
    for f in foreign[1:]:
        f.write_bytes(b"x")
    (out / ".tmp-out-linkedab").symlink_to(foreign[0])
    with files.OutputDir(str(out)) as live, files.OutputFile(str(tmp_path / "s.npz")) as live_file:
        with files.OutputDir(str(out)) as od, files.OutputFile(str(tmp_path / "t.npz")):
            assert not os.path.exists(dead_dir) and not os.path.exists(dead_file)
            assert os.path.isdir(live.tmp) and os.path.isfile(live_file.tmp) and os.path.isdir(stuck)
            assert all(os.path.lexists(f) for f in [*foreign, out / ".tmp-out-linkedab"])
            with open(os.path.join(od.tmp, "b.txt"), "w") as f:
                f.write("b")
            od.commit()
    assert (out / "b.txt").read_text() == "b" and not os.path.exists(live.tmp)


def test_analyze_into_an_out_a_killed_analyze_left_staging_in_leaves_none(tmp_path, rng):
    from spectral_jax.cli import main

    img, out = tmp_path / "a.png", tmp_path / "an"
    Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(img)
    out.mkdir()
    left = _killed(f"od = files.OutputDir({str(out)!r}); os.mkdir(os.path.join(od.tmp, 'a')); print(od.tmp)")
    assert left.startswith(str(out / ".tmp-an-"))
    assert main(["analyze", str(img), "--model", "dinov2_vits14", "--weights", "random", "--size", "28",
                 "--layers", "11", "--num-eigs", "3", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a", "summary.json"]


def test_dataset_edges_count_edges_between_tokens_not_a_tokens_own(tmp_path):
    """summary.json's "edges" counted every stored edge, knn-vv's edge from a token to itself (cosine 1) included:
    at k_intra 2, k_inter 0 and min_cos −1 every token keeps itself and one other, so it read about twice the
    edges between tokens. It now counts those only (`graphs.other_edges`), the same on both exact paths."""
    from test_dataset import make_folder, synthetic

    from spectral_jax import dataset

    folder = make_folder(str(tmp_path / "imgs"), 4)
    kw = dict(backbone=synthetic(), size=32, batch_size=4, num_eigs=3, graph="knn-vv", k_intra=2, k_inter=0,
              min_cos=-1.0, figure_images=0, method="exact")
    got = {p: dataset.run(folder, str(tmp_path / p), exact_solver=p, **kw).summary() for p in ("gathered", "sharded")}
    z = np.load(tmp_path / "gathered" / "checkpoints" / "graph.npz")
    idx, w = z["idx0"], z["w0"]                                   # [2 layers, 4 images · 16 tokens, k 2]
    own = idx == np.arange(idx.shape[1])[:, None]
    assert own[..., 0].all() and np.allclose(w[..., 0], 1, atol=1e-6)   # each first edge: the token itself, cos 1
    assert got["gathered"]["edges"] == got["sharded"]["edges"] == int(((w > 0) & ~own).sum()) > 100
    assert got["sharded"]["exact_solver"]["path"] == "sharded"


def test_a_sharded_run_drops_the_graph_rows_of_another_process_count(tmp_path):
    """The sharded path caches each process's rows as graph-rows/rows-p-of-P.npz; a run with another process count
    left the old layout's files (the whole graph again) on disk for good. Once a run's own rows are kept, process 0
    removes those of other counts — not its own, not anything else."""
    import shutil

    from test_dataset import make_folder, synthetic

    from spectral_jax import dataset

    folder = make_folder(str(tmp_path / "imgs"), 4)
    out = tmp_path / "out"
    kw = dict(backbone=synthetic(), size=32, batch_size=4, num_eigs=3, k_intra=3, k_inter=3, figure_images=0,
              method="exact", exact_solver="sharded")
    dataset.run(folder, str(out), **kw)
    rows = out / "checkpoints" / "graph-rows"
    for name in ("rows-0-of-2.npz", "rows-1-of-2.npz"):                  # as a two-process run left them
        shutil.copy(rows / "rows-0-of-1.npz", rows / name)
    (rows / "notes.txt").write_text("mine")
    again = dataset.run(folder, str(out), resume=True, **{**kw, "num_eigs": 4}).summary()
    assert "graph" in again["cached"]                                     # its own rows, read back
    assert sorted(os.listdir(rows)) == ["notes.txt", "rows-0-of-1.npz"]
