"""The prepared GPU suite (`benchmarks/gpu/`) stays runnable between lent GPU machines: its tiny mode runs every
section on CPU through `run.sh` (the same script and section code as on the GPU, toy sizes, all sections in one
process), a section's child process (the GPU's isolation) is killed at its limit and reported, and the install
step of `run.sh` is checked to be offline-safe."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_SH = os.path.join(ROOT, "benchmarks", "gpu", "run.sh")
SECTIONS = ("forward", "analyze", "unet", "attention", "dataset", "knn")


def _needs_accelerator(row) -> bool:
    """A row that cannot run on a CPU by design: the cuDNN candidate of the attention section."""
    return "cudnn" in row["row"] and "cuDNN" in row["reason"]


def _numbers(row):
    return [v for v in row.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]


@pytest.mark.slow  # the GPU suite's CPU smoke run (~35 s); its child-kill and offline-install tests stay in CI
def test_tiny_suite_writes_every_section(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, JAX_PLATFORMS="cpu")
    p = subprocess.run(["bash", RUN_SH, "--tiny"], env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    md = (tmp_path / "gpu.md").read_text()
    assert (tmp_path / "gpu.log").stat().st_size > 0
    assert report["mode"] == "tiny"
    assert [s for s in report["sections"] if s in SECTIONS] == list(SECTIONS)      # and any sections added since
    for name, sec in report["sections"].items():
        assert sec["status"] == "ok", (name, sec.get("reason"))
        assert f"## {name}:" in md
        ok = [r for r in sec["rows"] if r["status"] == "ok"]
        assert ok, f"section {name}: no row finished: {[(r['row'], r['reason']) for r in sec['rows']]}"
        for r in sec["rows"]:
            assert r["status"] in ("ok", "skipped", "failed") and (r["status"] == "ok" or r["reason"]), r
            # on the CPU only what needs the accelerator may fail (a renamed helper once failed a row unnoticed)
            assert r["status"] != "failed" or _needs_accelerator(r), (name, r["row"], r["reason"])
        for r in ok:
            nums = _numbers(r)
            assert nums and all(math.isfinite(v) for v in nums), (name, r)
    rows = {s: {r["row"]: r for r in report["sections"][s]["rows"]} for s in SECTIONS}
    # both frameworks ran on the same weights and inputs: the last hidden states agree in float32
    fwd = [r for r in rows["forward"].values() if r["status"] == "ok" and r["dtype"] == "float32"]
    assert fwd and all(r["rel_diff"] < 1e-4 and r["torch_taps"] == 3 * 2 for r in fwd), fwd
    # the blockwise kernel against the dense float32 reference, at tiny N where dense fits
    att = [r for r in rows["attention"].values() if r["status"] == "ok" and r["variant"] == "blockwise f32"]
    assert att and all(r["reference"] == "dense f32" and r["matvec_err"] < 1e-5 and r["grad_err"] < 1e-5
                       for r in att), att
    # a batch of images through one analyze call, batched exact path and per-image loop, for both graphs
    batch = [r for r in rows["analyze"].values() if r["status"] == "ok" and r["images"] > 1]
    assert sorted(r["graph"] for r in batch) == ["qk", "vv"] and all(
        r["images_per_s"] > 0 and r["loop_images_per_s"] > 0 and r["speedup"] > 0 for r in batch), batch
    # the dataset solve went through a sparse exact path (ARPACK on the CPU, LOBPCG on an accelerator) and converged
    ds = [r for r in rows["dataset"].values() if r["status"] == "ok"]
    assert ds and ds[0]["method"] in ("exact-arpack", "exact-lobpcg-sparse") and ds[0]["converged"] is True, ds
    # the UNet row and the official PyTorch loop (torch_official.official_loop_grids) both ran
    un = [r for r in rows["unet"].values() if r["status"] == "ok"]
    assert len(un) == 2 and un[1]["graphs"] == 32 and un[1]["official_pass_s"] > 0, un
    # the kNN rows: ours exact, the checked JAX IVF, PyTorch's brute force and ncut's fit on the same array; at toy
    # size the IVF probes every cell (recall 1), and both find PyTorch's exact neighbours
    knn = {r["tool"]: r for r in rows["knn"].values() if r["status"] == "ok"}
    assert set(knn) == {"ours exact", "ours ivf (checked)", "torch exact", "ncut fit"}, rows["knn"]
    assert knn["ours ivf (checked)"]["recall"] == 1 and knn["ours ivf (checked)"]["agree"] == 1
    assert knn["ours exact"]["agree"] == 1 and knn["ncut fit"]["seconds"] > 0
    assert [t["result"] for t in report["targets"]] == ["not measured"] * 5
    assert "| target | result | evidence |" in md


def test_section_child_is_killed_at_its_limit(tmp_path):
    """The GPU run's isolation: a section's process that outlives its limit is killed and reported as such."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks", "gpu"))
    try:
        import suite
    finally:
        sys.path.pop(0)
    status, reason = suite._run_child("dataset", str(tmp_path / "rows.jsonl"), budget=0.1, limit=0.3, tiny=True)
    assert status == "killed" and reason.startswith("killed at"), (status, reason)


def test_knn_target_reads_ours_ivf_against_ncut_at_the_largest_planted_size():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks", "gpu"))
    try:
        import suite
    finally:
        sys.path.pop(0)

    def rows(*spec):
        return {"knn": {"rows": [dict(status="ok", input=i, n=n, tool=t, seconds=s, recall=r, note_row="")
                                 for i, n, t, s, r in spec]}}

    small = [("planted", 10, "ours ivf (checked)", 1.0, 0.99), ("planted", 10, "ncut fit", 9.0, None)]
    assert suite.knn_target(rows(*small, ("planted", 20, "ours ivf (checked)", 5.0, 0.96),
                                 ("planted", 20, "ncut fit", 6.0, None)))[0] == "met"
    assert suite.knn_target(rows(*small, ("planted", 20, "ours ivf (checked)", 7.0, 0.96),
                                 ("planted", 20, "ncut fit", 6.0, None)))[0] == "missed"      # slower
    assert suite.knn_target(rows(*small, ("planted", 20, "ours ivf (checked)", 5.0, 0.94),
                                 ("planted", 20, "ncut fit", 6.0, None)))[0] == "missed"      # recall short
    res, why = suite.knn_target(rows(*small, ("planted", 20, "ours ivf (checked)", 5.0, 0.99)))
    assert res == "not measured" and "ncut" in why                      # the largest size has no ncut row
    assert suite.knn_target({})[0] == "not measured"


def test_run_sh_install_step_is_offline():
    text = open(RUN_SH).read()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    # nothing fetched: no downloader, no VCS, no hub client, no package manager
    for word in ("curl", "wget", "git clone", "huggingface-cli", "hf download", "apt-get", "conda ", "uv "):
        assert word not in code, word
    # any pip install must stay off the network and leave dependencies alone
    for call in re.findall(r"pip[^\n]*install[^\n]*", code):
        assert "--no-index" in call and "--no-deps" in call, call
    # package indexes and model hubs are switched off for everything the script starts
    for var in ("PIP_NO_INDEX=1", "HF_HUB_OFFLINE=1", "TRANSFORMERS_OFFLINE=1"):
        assert re.search(rf"^export .*\b{var}\b", code, re.M), var
    # the checkout's code is what gets imported, staged in the installed layout (models/ as spectral_jax/models)
    assert re.search(r'^cp -r "\$root/models" "\$stage/spectral_jax/models"$', code, re.M)
    assert re.search(r'^export PYTHONPATH="\$stage', code, re.M)
    assert "set -euo pipefail" in code
