"""`kill -9` mid-forward, then `--resume`, on diffusion backbones (issue #22 item 5), through the console script.

sd_tiny (knn-qk, layers on three grids 2², 4², 8², timesteps 10 and 200) and pixart_tiny (knn-vv, two timesteps):
`spectral-jax dataset` is killed with SIGKILL once 2 shards are on disk, a half-written shard folder (what a kill
inside `store.write_shard` leaves) is planted beside the finished ones, and `--resume` then
- computes only the missing images and says how many were read (stderr, summary.json's images_cached);
- leaves no hidden shard folder behind;
- gives features (every shard's arrays: the timesteps' noise and the VAE latents restored), graph, eigenvectors and
  eigenvalues bit-equal to an uninterrupted run of the same settings.

The uninterrupted run is the one reference of both the features and the solve; the kill helper is
test_dataset_store's, the images and models test_dataset_diffusion's.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from spectral_jax.dataset import store
from test_dataset_badinput import SCRIPT
from test_dataset_diffusion import CASES, KIND, TS, square_folder
from test_dataset_store import _cli, _shards, kill_mid_forward

IMAGES = 10


def _args(model: str, imgs: str) -> list[str]:
    size, layers, ki, ko = CASES[model]
    return [imgs, "--model", model, "--weights", "random", "--size", str(size), "--layers", ",".join(map(str, layers)),
            "--timesteps", ",".join(map(str, TS)), "--graph", KIND[model], "--method", "exact", "--batch-size", "1",
            "--num-eigs", "3", "--k-intra", str(ki), "--k-inter", str(ko)]


def _shard_bytes(out: str) -> dict[str, dict[str, bytes]]:
    """{shard: {array file: its bytes}} of OUT's store (meta.json left out: it holds the run's key)."""
    root = store.folder(os.path.join(out, "checkpoints"))
    return {d: {f: open(os.path.join(root, d, f), "rb").read() for f in sorted(os.listdir(os.path.join(root, d)))
                if f.endswith(".npy")} for d in _shards(out)}


@pytest.mark.parametrize("model", sorted(CASES))
def test_resume_after_kill_mid_forward_gives_the_uninterrupted_run_bit_for_bit(tmp_path, model):
    assert os.path.isfile(SCRIPT)
    imgs = square_folder(str(tmp_path / "imgs"), IMAGES, CASES[model][0])
    whole = str(tmp_path / "whole")
    r = _cli(*_args(model, imgs), "--out", whole)                  # first: its compiles fill the suite's cache
    assert r.returncode == 0, r.stderr[-3000:]
    out = str(tmp_path / "killed")
    kill_mid_forward(_args(model, imgs), out, 2)
    ck = os.path.join(out, "checkpoints")
    done = len(_shards(out))
    assert 2 <= done < IMAGES and not os.path.exists(os.path.join(ck, "graph.npz"))
    ref = _shard_bytes(whole)
    kept = _shard_bytes(out)
    assert kept == {d: ref[d] for d in kept}                      # what the killed run finished is already exact
    # a shard the kill caught half-written: its hidden folder, one array cut short
    last = os.path.join(store.folder(ck), _shards(out)[-1])
    half = os.path.join(store.folder(ck), ".tmp-p0-killed")
    shutil.copytree(last, half)
    with open(os.path.join(half, "a0.npy"), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(half, "a0.npy")) // 2)
    os.remove(os.path.join(half, "meta.json"))

    r = _cli(*_args(model, imgs), "--out", out, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{done} of {IMAGES} images' features read from {store.folder(ck)}; computing the other " \
           f"{IMAGES - done}" in r.stderr, r.stderr[-3000:]
    s = json.load(open(os.path.join(out, "summary.json")))
    ws = json.load(open(os.path.join(whole, "summary.json")))
    assert s["images_cached"] == done and ws["images_cached"] == 0 and s["cached"] == []
    assert s["timesteps"] == ws["timesteps"] == list(TS)
    assert not [d for d in os.listdir(store.folder(ck)) if not d.startswith("images-")]     # the half shard gone
    assert _shard_bytes(out) == ref and len(ref) == IMAGES        # every image's features, bit for bit
    g, wg = np.load(os.path.join(ck, "graph.npz")), np.load(os.path.join(whole, "checkpoints", "graph.npz"))
    groups = 3 if model == "sd_tiny" else 1                        # one graph per grid
    assert sorted(g.files) == sorted(wg.files) == sorted(["key", "valid", "failed", "info"] + [
        f"{x}{i}" for i in range(groups) for x in ("idx", "w", "deg")])
    for name in g.files:
        np.testing.assert_array_equal(g[name], wg[name], err_msg=name)
    a, b = np.load(os.path.join(out, "eigvecs.npz")), np.load(os.path.join(whole, "eigvecs.npz"))
    np.testing.assert_array_equal(a["eigvecs"], b["eigvecs"])
    assert s["eigvals"] == ws["eigvals"]
