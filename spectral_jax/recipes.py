"""Recipes: named settings that reproduce a published experiment, as `dataset.Settings` fields (no JAX imported).

    fields = recipe_fields("main_cls", "sd15")           # {"layers": "6,…,12", "layer_weights": "6:4,…", …}
    Settings(**{**fields, "model": "sd15", "graph": "knn-vv"})
    spectral-jax dataset FOLDER --model sd15 --recipe main_cls --graph knn-vv --out OUT

`main_cls` — the seed paper's dataset-level experiment (the official `main_cls.py` with its `srun.sh`):
  - layers: the self-attention of the UNet's mid block and of the decoder blocks whose grid is coarser than the
    finest at 512² (the official hook skips the 4096-token layers): for SD 1.x/2.x the mid layer (8×8) and the
    first two attention up blocks (3 layers at 16×16, 3 at 32×32) — our layers 6, 7–9 and 10–12; heads merged
    (each layer's heads concatenated into one kNN graph per timestep, as the official code's un-split q/k/v);
  - layer weights 32/res (res the layer's grid side at 512²: 4, 2, 1), each layer's weight shared by its
    timesteps (w_l / T each, `layer_weights.group_weights`);
  - k_intra = k_inter = 50 (the dataset's default k, so, as it, capped by the tokens of smaller grids and inputs:
    `recipe_fields` leaves it None), edges with cos ≤ 0.1 dropped; 512² inputs, so the table grid is the finest
    tapped grid, 32×32 (the official table is K×32×32, pooled to each layer's grid as here);
  - for --method gd the official optimiser setting is ours by default (batch 40, 5 AdamW steps per batch at lr 1e-2,
    weight decay 0, EMA 0.99; `--preset paper`: its loss and softmax table); it is set here all the same, and so
    are its fresh timesteps: every step draws new timesteps and noise (`timestep_draw="fresh"`, t ~ U{0..299}: the
    official `noise_max_t` 300, truncated to an integer), unless --timesteps or --schedule fix them.
Where ours differs: (1) the default method is the exact whole-dataset solve (the converged top-K of
Σ_l w_l sym(P_l) over one kNN graph of all images) instead of 2000 epochs of AdamW + EMA on minibatch graphs of 40
images (use --method gd for those); (2) exact keeps the timesteps fixed for the run — the family's default, T = 4
drawn from --seed over [0, 250], or --timesteps — since one solve needs one objective; gd draws them fresh each step
as the official code does, but T timesteps (--num-timesteps, default 4) and their noise per step shared by the
batch's images, where the official code draws one t and one noise per image per step; (3) the latent is the
family's (posterior mean by default, the official code samples it); (4) K is --num-eigs (the official srun.sh:
100); (5) the kNN graph is `graphs.knn`'s: a token's intra-image neighbours may include itself (the official code
removes the diagonal), and each part (own image, other images) is searched on its own, where the official code
zeroes the other part's cosines before its top-k (the same edges wherever a token's top cosines are positive);
(6) the images: the official `main_cls.py` resizes the shorter side to 256 and centre-crops 256² (torchvision,
bilinear), then its diffusion extractor upsamples that bilinearly to 512²; ours resizes the whole image to 512² at
once (the family's Lanczos, no crop: a non-square image is squeezed, not cropped, and keeps its full resolution).
The graph kind is --graph (the official code: QK by default, VV with --vv_graph, as in its srun.sh).

Layer indices and grids come from the model's UNet config (`UNetConfig.attn_layers`), so the recipe holds for any
SD 1.x/2.x UNet; a model without one is refused in one line.
"""

from __future__ import annotations

from spectral_jax.errors import InputError

RECIPES = ("main_cls",)
MAIN_CLS_SIZE = 512       # the official code's UNet input (images resized to 512²)
MAIN_CLS_K = 50           # top-50 intra-image + top-50 inter-image neighbours
MAIN_CLS_MIN_COS = 0.1    # edges with cos ≤ 0.1 dropped


def unet_layer_grids(model: str, size: int = MAIN_CLS_SIZE) -> list[tuple[int, str, int]]:
    """[(layer, where, grid side)] of every self-attention layer of `model`'s UNet at `size`² inputs, in layer
    order: where as `UNetConfig.attn_layers` names it ("down_blocks.0", "mid_block", "up_blocks.1", …), the side
    the latent (size / 8) has at that block's level. A model without a UNet config is one `InputError`."""
    from spectral_jax.models import get_spec

    spec = get_spec(model)
    unet = getattr(spec.config, "unet", None)
    if unet is None or not hasattr(unet, "attn_layers"):
        raise InputError("--recipe main_cls", f"reproduces a Stable Diffusion UNet experiment; {model!r} has no UNet",
                         "use it with a Stable Diffusion 1.x/2.x model (e.g. --model sd14, the official one)")
    levels = len(unet.block_out_channels)
    latent = size // spec.config.vae.downscale                  # the VAE's 8× downscale: 512² → 64² latents
    out = []
    for i, (where, _, _) in enumerate(unet.attn_layers()):
        kind, _, idx = where.partition(".")
        level = {"down_blocks": lambda j: j, "mid_block": lambda j: levels - 1,
                 "up_blocks": lambda j: levels - 1 - j}[kind](int(idx) if idx else 0)
        out.append((i, where, latent >> level))
    return out


def main_cls(model: str) -> dict:
    """The `main_cls` recipe's `Settings` fields for `model` (module docstring): layers, layer_weights (32/res),
    k_intra, k_inter, min_cos, size, and gd's batch_size, inner_steps, lr, weight_decay, ema, preset."""
    grids = unet_layer_grids(model, MAIN_CLS_SIZE)
    finest = max(side for _, _, side in grids)
    chosen = [(layer, side) for layer, where, side in grids
              if (where == "mid_block" or where.startswith("up_blocks")) and side < finest]
    weights = ",".join(f"{layer}:{32 / side:g}" for layer, side in chosen)
    return {"layers": ",".join(str(layer) for layer, _ in chosen), "layer_weights": weights,
            "k_intra": MAIN_CLS_K, "k_inter": MAIN_CLS_K, "min_cos": MAIN_CLS_MIN_COS, "size": MAIN_CLS_SIZE}


MAIN_CLS_T_MAX = 299      # main_cls.py: t = long(U[noise_min_t 0, noise_max_t 300)), fresh each batch
# gd's official optimiser setting (the dataset's gd defaults already; named so that the recipe says it) and its
# fresh timesteps each step.
MAIN_CLS_GD = {"batch_size": 40, "inner_steps": 5, "lr": 1e-2, "weight_decay": 0.0, "ema": 0.99, "preset": "paper",
               "timestep_draw": "fresh", "timestep_max": MAIN_CLS_T_MAX}


def recipe_fields(name: str, model: str, method: str = "exact") -> dict:
    """The `Settings` fields of recipe `name` for `model` and `method` (gd adds its optimiser setting and fresh
    timesteps); an unknown name is one `InputError`. A recipe's k equal to the dataset's default (`DEFAULT_K`,
    main_cls' 50) is left as the default, None: like it, capped by the tokens available (a grid too small for 50
    takes all of its tokens), where a k the user gives must fit."""
    if name not in RECIPES:
        raise InputError(f"--recipe {name}", "unknown recipe", f"choose one of {', '.join(RECIPES)}")
    from spectral_jax.options import DEFAULT_K

    fields = main_cls(model)
    fields.update({k: None for k in ("k_intra", "k_inter") if fields[k] == DEFAULT_K})
    if method == "gd":                     # exact's --batch-size is images per forward only: the user's to choose
        fields.update(MAIN_CLS_GD)
    return fields


__all__ = ["MAIN_CLS_GD", "MAIN_CLS_K", "MAIN_CLS_MIN_COS", "MAIN_CLS_SIZE", "MAIN_CLS_T_MAX", "RECIPES", "main_cls",
           "recipe_fields", "unet_layer_grids"]
