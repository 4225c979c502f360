"""Red-team regressions (round 22), dataset side:

- a gd run with fresh timesteps each step (`timestep_draw="fresh"`, `--recipe main_cls --method gd`'s default)
  recorded the fixed schedule its backbone was loaded with — drawn from the seed, never run — as its timesteps:
  in summary.json's "model_options" and "provenance" and in `load_result(...).provenance.timesteps`. Now they
  name no fixed timesteps (the draw is in "timestep_draw", "timesteps_per_step" and "timestep_range"), and a
  resume compares the count only, so checkpoints written before (holding those values) still resume;
- `--recipe main_cls` set k_intra = k_inter = 50 as if typed, so at --size 64 (a 4×4 finest grid) the run was
  refused with "--k-intra: 50 is more than the 16 tokens", a flag the user never gave. The recipe's k (the
  default's 50) is now capped by the tokens available as the default is; a typed k is still checked;
- the dataset's note on a graph-reading layer-weight rule's "early" pick (`layer_weights.early_pick`) called a
  Stable Diffusion UNet's mid block (layer 6, the coarsest and most semantic) "an early one" of layers 6…12: a
  UNet's layer indices run through resolutions, not depth, and the finding behind the note is a ViT's. The note is
  now for models whose indices are depth order (`layer_weights.depth_ordered`: ViT-like encoders and the diffusion
  transformers, one block after the other), not for UNets.
"""

from __future__ import annotations

import json
import types

import numpy as np
import pytest

from spectral_jax import dataset
from spectral_jax.errors import InputError
from test_dataset_diffusion import square_folder

FRESH = dict(model="pixart_tiny", weights="random", size=32, batch_size=2, method="gd", num_eigs=3, k_intra=3,
             k_inter=3, layers="0,2", graph="knn-vv", figure_images=0, timestep_draw="fresh", epochs=1,
             inner_steps=1)


@pytest.mark.filterwarnings("ignore:dataset gd. not converged:RuntimeWarning")
def test_fresh_run_records_no_fixed_timesteps(tmp_path):
    """A fresh-draw gd run (the family's default schedule, drawn from the seed, loaded but never run): its
    summary's model_options and provenance, the returned result's and `load_result`'s provenance name no
    timesteps; the draw is recorded as before."""
    folder = square_folder(str(tmp_path / "imgs"), 4, 32)
    out = tmp_path / "out"
    res = dataset.run(folder, str(out), **FRESH)
    s = json.loads((out / "summary.json").read_text())
    assert s["timesteps"] is None and s["timestep_draw"] == "fresh" and s["timesteps_per_step"] == 4
    assert "timesteps" not in s["model_options"], s["model_options"]
    assert s["provenance"]["timesteps"] == [], s["provenance"]
    assert res.provenance.timesteps == () and dataset.load_result(str(out)).provenance.timesteps == ()


def test_fresh_resume_compares_the_count_not_the_unused_values(tmp_path):
    """`checkpoint.check_same` of a fresh run: a fingerprint written before (the loaded schedule's values in
    "timesteps", the given ones in model_options) resumes under today's; other values of the same count are the
    same run; another count, or the draw made fixed, is refused."""
    from spectral_jax.dataset.checkpoint import _resolved, check_same

    base = {"model": "sd_tiny", "seed": 0, "timestep_draw": "fresh", "timestep_max": 299,
            "model_options": {"latent": "mean"}}
    old = {**base, "timesteps": [213, 159], "model_options": {"latent": "mean", "timesteps": [213, 159]}}
    new = _resolved({**base, "timesteps": [5, 10]})
    check_same(str(tmp_path), old, new)
    check_same(str(tmp_path), new, _resolved({**base, "timesteps": [213, 159]}))
    for other, named in (({**base, "timesteps": [5, 10, 20]}, "timesteps_per_step 2 → 3"),
                         ({**base, "timestep_draw": "fixed", "timesteps": [5, 10]}, "timestep")):
        with pytest.raises(InputError, match=named):
            check_same(str(tmp_path), old, _resolved(other))


@pytest.mark.filterwarnings("ignore:dataset gd. not converged:RuntimeWarning")
def test_recipe_k_is_a_default_capped_by_the_tokens(tmp_path):
    """--recipe main_cls --method gd at 64² (grids 1×1, 2×2, 4×4): the recipe's k 50 is capped per grid, as the
    default is, instead of refused as a typed --k-intra 50; a typed 50 beside the recipe is still refused."""
    from spectral_jax.recipes import recipe_fields

    folder = square_folder(str(tmp_path / "imgs"), 4, 64)
    kw = {**recipe_fields("main_cls", "sd_tiny", "gd"), "recipe": "main_cls", "method": "gd", "model": "sd_tiny",
          "weights": "random", "size": 64, "batch_size": 2, "epochs": 1, "inner_steps": 1, "num_eigs": 3,
          "figure_images": 0, "model_options": {"timesteps": (10,)}}
    s = dataset.run(folder, str(tmp_path / "out"), **kw).summary()
    assert [(g["grid"], g["k_intra"], g["k_inter"]) for g in s["k_used"]] == [
        ([1, 1], 1, 1), ([2, 2], 4, 4), ([4, 4], 16, 16)]
    with pytest.raises(InputError, match=r"--k-intra: 50 is more than the 16 tokens .* pass --k-intra ≤ 16"):
        dataset.run(folder, str(tmp_path / "typed"), **{**kw, "k_intra": 50})
    assert not (tmp_path / "typed").exists()


def _note(model: str, layers, capsys) -> str:
    """What `whole.layer_weights` prints on stderr when "select" picks the first of `layers` for `model` (the
    graphs stand-ins: only their batch shapes and a given spectrum per layer are read)."""
    from spectral_jax.dataset import whole
    from spectral_jax.dataset.settings import Settings

    layers = list(layers)
    spectra = lambda gs, group_layers, k, ls: np.array([[1.0, 0.9, 0.1] if l == layers[0] else [1.0, 0.9, 0.8]
                                                        for l in ls])
    geom = types.SimpleNamespace(groups=[((4, 4), tuple(layers))])
    gs = [types.SimpleNamespace(batch_shape=(len(layers),))]
    settings = Settings(model=model, layer_weights="select", num_eigs=3)
    capsys.readouterr()
    _, chosen = whole.layer_weights(gs, geom, settings.layer_weights, settings, spectra=spectra)
    assert chosen["weights"][str(layers[0])] == 1.0
    return capsys.readouterr().err


def test_early_pick_note_only_where_layer_indices_are_depth(capsys):
    """The note for a UNet's mid block (sd_tiny's layer 6 of the recipe's 6…12) is gone; a ViT's and a diffusion
    transformer's layer 0 (depth order: one block after the other) still get it. `depth_ordered` reads the
    model's config, not its name; a model outside the registry has no known order."""
    assert _note("sd_tiny", range(6, 13), capsys) == ""
    for model in ("dinov2_vits14", "pixart_tiny"):
        assert "put all its weight on layer 0, an early one of the tapped layers 0…3" in _note(model, range(4),
                                                                                              capsys)
    from spectral_jax.layer_weights import depth_ordered

    assert [depth_ordered(m) for m in ("sd15", "sd_tiny", "dinov2_vits14", "pixart_tiny", "flux_tiny",
                                       "not_a_model")] == [False, False, True, True, True, False]
