"""benchmarks/bench_peers.py --tiny end to end (issue #25 item 1): every part runs on generated data, through the
script, against the installed ncut-pytorch; skipped (saying why) where the `bench` extra is not installed."""

import json
import os
import subprocess
import sys

import pytest
from sjtest import BENCH

pytest.importorskip("torch", reason="torch is not installed (the `bench` extra: pip install -e '.[bench]')")
pytest.importorskip("ncut_pytorch",
                    reason="ncut-pytorch is not installed (the `bench` extra: pip install -e '.[bench]')")
pytest.importorskip("sklearn", reason="scikit-learn (an ncut-pytorch dependency) is not installed")


def test_bench_peers_tiny(tmp_path):
    out = tmp_path / "peers.md"
    r = subprocess.run([sys.executable, os.path.join(BENCH, "bench_peers.py"), "--tiny", "--data",
                        str(tmp_path / "absent"), "--work", str(tmp_path / "work"), "--out", str(out)],
                       capture_output=True, text=True, timeout=900, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((tmp_path / "peers.json").read_text())
    assert rep["data"].startswith("generated")
    fg = rep["fg"]
    assert fg["methods"] == ["ours-feat", "ours-vv", "ncut"] and len(fg["rows"]) == 2
    assert all(0.0 <= row[m] <= 1.0 for row in fg["rows"] for m in fg["methods"])
    d = rep["dataset"]
    assert d["images"] == 4 and d["classes"] == 3
    assert set(d["scores"]) == {"ours knn-vv + our segments", "ncut (layer-11 v) + k-means",
                                "ncut (layer-11 v) + our segments"}
    assert all(0.0 <= s["miou"] <= 1.0 and 0.0 <= s["pixel_acc"] <= 1.0 for s in d["scores"].values())
    e = rep["eigen"]
    assert e["ours"]["eig_err"] < 1e-4 and e["ours"]["overlap"] > 0.999       # an exact solve of its own operator
    assert 0.0 < e["ncut"]["overlap"] <= 1.0 + 1e-9
    sc = {(row["data"], row["n"], row["tool"]): row for row in rep["scale"]}
    assert set(sc) == {("clustered", 3000, "ncut"), ("clustered", 3000, "ours")}
    assert all("error" not in row and row["seconds"] > 0 and row["rss_peak_delta_mib"] is not None
               for row in sc.values())
    ours = sc["clustered", 3000, "ours"]
    assert ours["search"] == "ivf" and 0.9 <= ours["recall"] <= 1.0
    md = out.read_text()
    for heading in ("## Single image", "## Dataset level", "## Eigen-accuracy", "## Scale"):
        assert heading in md


def test_bench_peers_without_data_says_where_it_looks(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(BENCH, "bench_peers.py"), "--data", str(tmp_path / "absent"),
                        "--parts", "fg", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "p.md")],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode != 0 and "lacks horse-dev/ or coco-mini/" in r.stderr
    assert not (tmp_path / "p.md").exists()


def test_merged_total_counts_only_the_runs_in_the_report(tmp_path):
    """--merge: the header's Total is the parts' seconds plus the wall time of the scale points kept — not the sum
    of the merged runs' totals, which counted points a later merge leaves out."""
    machine = {"date": "d", "load_avg_1_5_15": [0, 0, 0]}
    quality = {"command": "q", "peer": "p", "data": "d", "seconds_total": 100.0, "machine": machine,
               "eigen": {"n": 10, "k": 2, "knn_k": 3, **{t: {"method": "m", "eig_err": 0.0, "overlap": 1.0,
                                                               "seconds": 1.0} for t in ("ours", "ncut")}}}
    row = dict(n=1000, data="clustered", tool="ncut", seconds=1.0, rss_peak_delta_mib=1.0)
    scale = {"command": "s", "peer": "p", "data": "generated features only", "seconds_total": 500.0,
             "machine": machine, "seconds_parts": {"scale data and process starts": 5.0},
             "scale": [dict(row, wall=10.0), dict(row, wall=15.0)]}
    paths = []
    for name, rep in (("q", quality), ("s", scale)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(rep))
    out = tmp_path / "merged.md"
    r = subprocess.run([sys.executable, os.path.join(BENCH, "bench_peers.py"), "--merge", *map(str, paths),
                        "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "merged.json").read_text())["seconds_total"] == 130.0      # 100 + 5 + 10 + 15
    assert "Total 130 s: eigen 100 s; scale data and process starts 5 s; 2 scale points 25 s" in out.read_text()


def test_view_features_are_five_views_per_photo(tmp_path, monkeypatch):
    """bench_peers.view_features (the scale part's "views" data): each photo gives VIEWS · 1024 tokens (five 448²
    views, all 32×32 tokens), PCA'd to 64-d unit rows, cached under --work; too few photos: one line saying so."""
    import numpy as np
    from PIL import Image

    monkeypatch.syspath_prepend(BENCH)
    import bench_peers

    img = tmp_path / "data" / "horse-dev" / "images"
    img.mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (300, 420, 3), dtype=np.uint8)).save(img / "horse001.jpg")
    args = bench_peers.parse(["--data", str(tmp_path / "data"), "--work", str(tmp_path), "--weights", "random"])
    n = bench_peers.VIEWS * 1024
    path = bench_peers.view_features(args, n)
    x = np.load(path)
    assert x.shape == (n, 64) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    assert len({tuple(np.round(v, 4)) for v in x[::1024]}) == bench_peers.VIEWS   # five different views
    mtime = os.path.getmtime(path)
    assert bench_peers.view_features(args, n) == path and os.path.getmtime(path) == mtime     # cached
    with pytest.raises(SystemExit, match="needs a multiple of 5120 tokens and 2 images"):
        bench_peers.view_features(args, 2 * n)


def test_cached_features_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """_common.save_npy (the scale part's cached features): a save that fails midway leaves no file at the path,
    so the next run computes the features again instead of reading a partial cache."""
    import numpy as np

    monkeypatch.syspath_prepend(BENCH)
    import _common

    path = str(tmp_path / "x.npy")
    _common.save_npy(path, np.arange(6.0))
    np.testing.assert_array_equal(np.load(path), np.arange(6.0))

    def broken(f, x):
        f.write(b"\x93NUMPY partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        _common.save_npy(str(tmp_path / "y.npy"), np.arange(6.0))
    assert sorted(os.listdir(tmp_path)) == ["x.npy"]


def test_scale_on_a_users_own_features(tmp_path, monkeypatch):
    """--scale file:PATH (a user's own `[N, D]` features, groups of --group-size rows): checked before any work (one
    line naming the point and the fix, exit 2, no report), then timed like the built-in data — rows scaled to unit
    length, the report's row naming the file."""
    import numpy as np

    monkeypatch.syspath_prepend(BENCH)
    import bench_peers

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((12, 24))[rng.integers(0, 12, 1200)] + 0.3 * rng.standard_normal((1200, 24))) * 5.0
    good = tmp_path / "feats.npy"
    np.save(good, x.astype(np.float32))
    for name, arr, group, says in (("feats.npy", None, 7, "not ≥ 2 groups of --group-size 7"),
                                   ("feats.npy", None, 1200, "not ≥ 2 groups of --group-size 1200"),
                                   ("cube.npy", np.zeros((4, 3, 2)), 1, "expected real features [N ≥ 2, D]"),
                                   ("zero.npy", np.where(np.arange(10)[:, None] == 3, 0.0, np.ones((10, 4))), 1,
                                    "1 rows are zero or not finite (the first: row 3)"),
                                   ("absent.npy", None, 1, "cannot read")):
        if arr is not None:
            np.save(tmp_path / name, arr)
        out = tmp_path / f"{name}.md"
        r = subprocess.run([sys.executable, os.path.join(BENCH, "bench_peers.py"), "--parts", "scale", "--scale",
                            f"file:{tmp_path / name}", "--group-size", str(group), "--work", str(tmp_path / "w"),
                            "--out", str(out)], capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and says in r.stderr.splitlines()[-1] and not out.exists(), r.stderr[-2000:]
    before = good.read_bytes()                                    # --out onto the input: refused, the input kept
    r = subprocess.run([sys.executable, os.path.join(BENCH, "bench_peers.py"), "--parts", "scale", "--scale",
                        f"file:{good}", "--group-size", "100", "--out", str(good)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "would overwrite the --scale file" in r.stderr and good.read_bytes() == before

    args = bench_peers.parse(["--parts", "scale", "--scale", f"uniform:1000,file:{good}", "--group-size", "100"])
    assert args.points == [("uniform", 1000, None), ("file", 1200, str(good))]
    spec = dict(n=1200, data="file", tool="ours", seed=0, num_eigs=4, k=5, search="exact", nprobe=None, nlist=None,
                graph_only=False, probe="row", path=str(good), group_size=100, name="feats.npy")
    row = bench_peers._scale_child(spec)
    assert row["dim"] == 24 and row["search"] == "exact" and row["recall"] == 1.0 and row["converged"]
    u = bench_peers.file_features(str(good))
    np.testing.assert_allclose(np.linalg.norm(u, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(u * np.linalg.norm(x, axis=1, keepdims=True), x, rtol=1e-5, atol=1e-5)
    args.out = str(tmp_path / "own.md")
    bench_peers.write(args, {"command": "c", "peer": "p", "data": "generated features only", "seconds_total": 1.0,
                             "machine": {"date": "d", "load_avg_1_5_15": [0, 0, 0]},
                             "scale": [dict(spec, **row, wall=1.0)]})
    assert "| file feats.npy (24-d, groups of 100) | 1200 | ours |" in (tmp_path / "own.md").read_text()
