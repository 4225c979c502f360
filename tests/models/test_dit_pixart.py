"""Our Flax PixArt-Σ transformer vs diffusers' `PixArtTransformer2DModel` (PyTorch), through our own converter.

References: random-init diffusers transformers with every parameter perturbed (so biases, the adaLN tables and the
caption projection are not at their 0/1/zero init and a swapped or missing tensor shows), saved with
`save_pretrained` (one of them sharded with an index) and loaded with `load_transformer`. Two configurations (sample
size 8 with interpolation scale 1; sample size 16 with scale 2 and caption width ≠ model width) on the trained grid
and on a non-square one (the sin-cos table recomputed), at t = 0 and t = 999. Compared stage by stage: the patch +
position embedding, the adaLN-single outputs (block modulation and head embedding), the caption projection, every
block's attn1 q/k/v (torch hooks on to_q/to_k/to_v) and output, and the final output (8 channels: ε and σ).

Tolerance: max |ours − ref| ≤ 2e-5 · max |ref| per stage. Both sides compute in float32 (matmul precision pinned
to float32 by tests/conftest.py); the differences are summation order in XLA vs torch kernels (measured ≤ 2e-6).
A mapping mistake (a transposed kernel, q/k swapped, a missing bias, the sin-cos halves or the shift/scale/gate
rows of the table in the wrong order, tanh vs erf GELU) moves these stages by 1e-3 to 1 relative.
"""

import json
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from sjtest import close_to_ref, perturb  # noqa: E402
from spectral_jax.errors import InputError  # noqa: E402
from spectral_jax.models.dit.config import PixArtConfig  # noqa: E402
from spectral_jax.models.dit.params import load_transformer  # noqa: E402
from spectral_jax.models.dit.pixart import sincos_pos_embed  # noqa: E402

TOL = 2e-5
CONFIGS = {
    "s8": dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=3,
               cross_attention_dim=16, caption_channels=12, sample_size=8, patch_size=2,
               use_additional_conditions=False, norm_num_groups=1),
    "s16": dict(num_attention_heads=3, attention_head_dim=4, in_channels=4, out_channels=8, num_layers=2,
                cross_attention_dim=12, caption_channels=20, sample_size=16, patch_size=2, interpolation_scale=2,
                use_additional_conditions=False, norm_num_groups=1),
}
SIZES = {"s8": [(8, 8), (6, 10)], "s16": [(16, 16), (12, 8)]}


def close(ours, ref, what):
    close_to_ref(ours, ref, TOL, what)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    torch.manual_seed(0)
    ref = perturb(diffusers.PixArtTransformer2DModel(**CONFIGS[request.param]), 0)
    path = tmp_path_factory.mktemp(f"pixart-{request.param}")
    # s16 is saved in shards with an index (the 1024-MS checkpoint's layout when sharded)
    ref.save_pretrained(path, **({"max_shard_size": "20KB"} if request.param == "s16" else {}))
    return request.param, ref, path, load_transformer(str(path))


def hooks(ref):
    """Forward hooks: every attn1 to_q/to_k/to_v output `[B, N, H·D]`, every block output, the stem's outputs."""
    caps = {}

    def keep(name):
        def hook(mod, args, out):
            caps[name] = out
        return hook

    for name, mod in ref.named_modules():
        if re.fullmatch(r"transformer_blocks\.\d+(\.attn1\.to_[qkv])?|pos_embed|adaln_single|caption_projection",
                        name):
            mod.register_forward_hook(keep(name))
    return caps


def test_config_read_from_checkpoint(pair):
    name, ref, path, ours = pair
    want = CONFIGS[name]
    cfg = ours.cfg
    assert (cfg.num_layers, cfg.num_attention_heads, cfg.attention_head_dim) == \
        (want["num_layers"], want["num_attention_heads"], want["attention_head_dim"])
    assert cfg.caption_channels == want["caption_channels"] and cfg.sample_size == want["sample_size"]
    assert cfg.pos_scale == ref.pos_embed.interpolation_scale
    if name == "s16":
        assert (path / "diffusion_pytorch_model.safetensors.index.json").exists()


@pytest.mark.parametrize("grid", [(4, 4), (3, 5), (6, 2)])
def test_sincos_position_embedding_matches_diffusers(grid):
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    for base, scale in ((4, 1), (8, 2)):
        want = get_2d_sincos_pos_embed(24, grid, base_size=base, interpolation_scale=scale, output_type="pt")
        np.testing.assert_allclose(sincos_pos_embed(24, grid, base, scale), want.float().numpy(), rtol=0, atol=1e-6)


def test_stages_match_diffusers(pair):
    name, ref, path, ours = pair
    caps = hooks(ref)

    @jax.jit
    def fwd(x, t, c):  # the forward and, separately, the stem's stages
        tt = jnp.full((x.shape[0],), t, jnp.float32)
        return ours(x, t, c, hidden=True), ours.pos_embed(x), ours.adaln_single(tt, x.dtype), ours.caption_projection(c)

    rng = np.random.default_rng(1)
    heads, dim = ours.cfg.num_attention_heads, ours.cfg.attention_head_dim
    for hw in SIZES[name]:
        x = rng.standard_normal((2, *hw, 4)).astype(np.float32)
        caption = rng.standard_normal((2, 5, ours.cfg.caption_channels)).astype(np.float32)
        for t in (0, 999):
            caps.clear()
            with torch.no_grad():
                out = ref(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(caption),
                          torch.tensor([t, t])).sample
            what = f"{name} {hw} t={t}"
            (eps, taps), stem, (m, e), cap = fwd(jnp.asarray(x), t, jnp.asarray(caption))
            close(stem, caps["pos_embed"].numpy(), f"{what} patch+position embedding")
            close(m, caps["adaln_single"][0].numpy(), f"{what} adaLN-single block modulation")
            close(e, caps["adaln_single"][1].numpy(), f"{what} adaLN-single embedded timestep")
            close(cap, caps["caption_projection"].numpy(), f"{what} caption projection")
            close(eps, out.permute(0, 2, 3, 1).numpy(), f"{what} output")
            assert sorted(taps.layers) == list(range(ours.cfg.num_layers))
            n = (hw[0] // 2) * (hw[1] // 2)
            for i, tap in taps.layers.items():
                assert tap.grid == (hw[0] // 2, hw[1] // 2) and tap.q.shape == (2, heads, n, dim)
                for proj, arr in (("to_q", tap.q), ("to_k", tap.k), ("to_v", tap.v)):
                    mine = np.asarray(arr).transpose(0, 2, 1, 3).reshape(2, n, heads * dim)
                    close(mine, caps[f"transformer_blocks.{i}.attn1.{proj}"].numpy(), f"{what} block {i} {proj}")
                close(taps.hidden[i], caps[f"transformer_blocks.{i}"].numpy(), f"{what} block {i} output")


def test_zero_caption_length_does_not_matter():
    """The documented default: one zero caption token is the same conditioning as zeros of any length."""
    from spectral_jax.models.convert import assemble, random_params
    from spectral_jax.models.dit.config import PIXART_TINY
    from spectral_jax.models.dit.pixart import PixArtTransformer2DModel

    cfg = PIXART_TINY.transformer
    ours = assemble(PixArtTransformer2DModel, cfg, random_params(PixArtTransformer2DModel, cfg, 0))
    x = jnp.asarray(np.random.default_rng(2).standard_normal((1, 8, 8, 4)), jnp.float32)
    run = jax.jit(lambda c: ours(x, 50, c)[0])
    one, many = run(jnp.zeros((1, 1, ours.cfg.caption_channels))), run(jnp.zeros((1, 300, ours.cfg.caption_channels)))
    np.testing.assert_allclose(np.asarray(one), np.asarray(many), rtol=0, atol=1e-6)


def test_half_precision_checkpoint_loads_its_values(pair, tmp_path):
    """An fp16 checkpoint loads to exactly its fp16 values (float32 state: one explicit cast) and, at dtype
    float16, keeps them."""
    name, ref, path, ours = pair
    ref.half().save_pretrained(tmp_path, variant="fp16")
    ref.float()
    ours16 = load_transformer(str(tmp_path))
    want = ref.transformer_blocks[0].attn1.to_q.weight.detach().half().float().numpy().T
    np.testing.assert_array_equal(np.asarray(ours16.transformer_blocks[0].attn1.to_q.kernel[...]), want)
    half = load_transformer(str(tmp_path), dtype=jnp.float16)
    assert half.transformer_blocks[0].attn1.to_q.kernel[...].dtype == jnp.float16


# ---------------------------------------------------------------------------------------------------------------
# Converter refusals
# ---------------------------------------------------------------------------------------------------------------

def _copy(src, dst, edit_config=None, edit_tensors=None):
    from safetensors.numpy import load_file, save_file

    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(edit_config(cfg) if edit_config else cfg))
    tensors = load_file(str(src / "diffusion_pytorch_model.safetensors"))
    save_file(edit_tensors(tensors) if edit_tensors else tensors, str(dst / "diffusion_pytorch_model.safetensors"))
    return str(dst)


@pytest.fixture(scope="module")
def s8_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pixart-refusals")
    diffusers.PixArtTransformer2DModel(**CONFIGS["s8"]).save_pretrained(path)
    return path


def test_converter_refuses_extra_and_missing_tensors(s8_dir, tmp_path):
    extra = lambda t: {**t, "transformer_blocks.0.norm1.weight": np.ones(16, np.float32)}
    with pytest.raises(InputError, match=r"1 tensor\(s\) not in the PixArt key table: transformer_blocks\.0\.norm1"):
        load_transformer(_copy(s8_dir, tmp_path, edit_tensors=extra))
    missing = lambda t: {k: v for k, v in t.items() if k != "transformer_blocks.1.scale_shift_table"}
    with pytest.raises(InputError, match=r"no tensor for 1 parameter\(s\): transformer_blocks\.1\.scale_shift_table"):
        load_transformer(_copy(s8_dir, tmp_path, edit_tensors=missing))


@pytest.mark.parametrize("edit, message", [
    (lambda c: {**c, "use_additional_conditions": True}, "use_additional_conditions=true"),
    (lambda c: {**c, "norm_type": "ada_norm_zero"}, "norm_type='ada_norm_zero'"),
    (lambda c: {**c, "num_layers": "two"}, "num_layers must be an integer ≥ 1"),
    (lambda c: {**c, "num_layers": 4}, "describes a different model: num_layers=4 (expected 3)"),
])
def test_config_refusals(s8_dir, tmp_path, edit, message):
    expected = PixArtConfig(**{k: v for k, v in CONFIGS["s8"].items()
                               if k not in ("use_additional_conditions", "norm_num_groups")})
    with pytest.raises(InputError, match=re.escape(message)):
        load_transformer(_copy(s8_dir, tmp_path, edit_config=edit), expected)


@pytest.mark.slow
def test_full_size_pixart_sigma(tmp_path):
    """PixArt-Σ XL/2 at full size (28 blocks, 16 heads × 72, T5 width 4096; the published 1024-MS config's fields):
    our preset is what diffusers builds from those fields, and the output and first/last block taps match."""
    from spectral_jax.models.dit.config import PIXART_SIGMA

    torch.manual_seed(0)
    ref = diffusers.PixArtTransformer2DModel(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
        cross_attention_dim=1152, caption_channels=4096, sample_size=128, patch_size=2, interpolation_scale=2,
        use_additional_conditions=False).eval()
    ref.save_pretrained(tmp_path)
    ours = load_transformer(str(tmp_path), PIXART_SIGMA.transformer)
    caps = hooks(ref)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 32, 24, 4)).astype(np.float32)
    caption = rng.standard_normal((1, 6, 4096)).astype(np.float32)
    with torch.no_grad():
        out = ref(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(caption), torch.tensor([500])).sample
    from flax import nnx

    graphdef, state = nnx.split(ours)    # the weights as an argument, not as constants of the compiled program
    run = jax.jit(lambda st, a, c: nnx.merge(graphdef, st)(a, 500, c, layers=[0, 27], hidden=True))
    eps, taps = run(state, jnp.asarray(x), jnp.asarray(caption))
    close(eps, out.permute(0, 2, 3, 1).numpy(), "full-size output")
    for i in (0, 27):
        q = np.asarray(taps.layers[i].q).transpose(0, 2, 1, 3).reshape(1, 16 * 12, 1152)
        close(q, caps[f"transformer_blocks.{i}.attn1.to_q"].numpy(), f"full-size block {i} q")
        close(taps.hidden[i], caps[f"transformer_blocks.{i}"].numpy(), f"full-size block {i} output")
