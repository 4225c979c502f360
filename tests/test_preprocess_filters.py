"""Each family's preprocessing against its reference image processor, on a real photograph (the bundled
chelsea.png, 300×451) resized to one size both sides take (224×336: a multiple of every family's patch, a
downscale, so the filters' antialiasing counts).

The references are the PIL processors of `transformers` (DINOv2, DINO v1/MAE, CLIP, SigLIP, SigLIP 2 NaFlex) and
diffusers' `VaeImageProcessor` (Stable Diffusion, PixArt-Σ, SD3, FLUX), each with its class's default filter unless
said otherwise, compared to 1e-6. DINOv3's processor exists only as a torchvision ("fast") processor, and
torchvision is not installed: it is compared with PIL's bilinear (the filter it names), and with its own
rescale → antialiased bilinear (torch's `interpolate`, which torchvision calls) → normalise pipeline to within
one grey level (our resize runs on the 8-bit image, as DINOv3's own transform does).

Shape legend
    H, W  pixels of the model input   C = 3 channels   p  patch size
"""

import numpy as np
import pytest
from PIL import Image

from spectral_jax import io
from spectral_jax.errors import InputError
from spectral_jax.models import registry, testing
from spectral_jax.models.spec import PreprocessSpec

SIZE = (224, 336)


@pytest.fixture(scope="module")
def photo():
    return io.load_image(io.SAMPLE)                                   # uint8 [300, 451, 3]


def ours(name: str, img, size=SIZE):
    return registry.get_spec(name).preprocess.image(img, size)       # float32 [H, W, C]


def transformers_pixels(proc, img):
    return proc(images=img, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)   # [H, W, C]


def check(got, want, name):
    assert got.shape == want.shape, name
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("name,proc", [
    ("dinov2_vits14", "BitImageProcessorPil"),       # bicubic; do_center_crop off to compare at one size
    ("dinov2_vitb14_reg", "BitImageProcessorPil"),
    ("dino_vits16", "ViTImageProcessorPil"),         # bilinear
    ("mae_vitb16", "ViTImageProcessorPil"),
    ("clip_vitb16", "CLIPImageProcessorPil"),        # bicubic
])
def test_vits_match_their_transformers_processor(photo, name, proc):
    import transformers

    prep = registry.get_spec(name).preprocess
    ref = getattr(transformers, proc)(size={"height": SIZE[0], "width": SIZE[1]}, do_center_crop=False,
                                      image_mean=list(prep.mean), image_std=list(prep.std))
    check(ours(name, photo), transformers_pixels(ref, photo), name)


def test_siglip2_fixres_matches_siglip_processor_with_bilinear(photo):
    """The FixRes checkpoints are published as SigLIP (v1) models, read by `SiglipImageProcessor`, whose class
    default filter is bicubic; their own configuration (and big_vision's training `resize`) is bilinear, so the
    reference is that processor given resample=BILINEAR."""
    import transformers

    ref = transformers.SiglipImageProcessorPil(size={"height": SIZE[0], "width": SIZE[1]},
                                               resample=Image.Resampling.BILINEAR)
    for name in ("siglip2_b16", "siglip2_so400m14_224"):
        check(ours(name, photo), transformers_pixels(ref, photo), name)


def test_siglip2_naflex_matches_siglip2_processor(photo):
    """`Siglip2ImageProcessor` picks its own size (at most `max_num_patches`); ours is given the same size, and its
    patches (row, column, channel order) must be the processor's."""
    import transformers

    p = 16
    out = transformers.Siglip2ImageProcessorPil(patch_size=p, max_num_patches=300)(images=photo, return_tensors="np")
    gh, gw = (int(s) for s in out["spatial_shapes"][0])
    x = ours("siglip2_b16_naflex", photo, (gh * p, gw * p))                         # [H, W, C]
    patches = x.reshape(gh, p, gw, p, 3).transpose(0, 2, 1, 3, 4).reshape(gh * gw, p * p * 3)
    np.testing.assert_allclose(patches, out["pixel_values"][0][:gh * gw], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name,vae_scale", [("sd15", 8), ("sd_tiny", 8), ("pixart_sigma", 8), ("sd3_medium", 8),
                                            ("flux1_dev", 16)])
def test_diffusion_matches_vae_image_processor(photo, name, vae_scale):
    """The pipelines' `VaeImageProcessor` (FLUX's with twice the VAE factor): PIL Lanczos, then 2x − 1."""
    from diffusers.image_processor import VaeImageProcessor

    ref = VaeImageProcessor(vae_scale_factor=vae_scale)
    want = ref.preprocess(Image.fromarray(photo), height=SIZE[0], width=SIZE[1])[0].numpy().transpose(1, 2, 0)
    check(ours(name, photo), want, name)


def test_dinov3_is_pil_bilinear_within_a_grey_level_of_its_fast_processor(photo):
    """`DINOv3ViTImageProcessor` (torchvision only) names BILINEAR and resizes with antialias=True after rescaling
    to [0, 1]; torchvision's resize is torch's `interpolate`, reproduced here."""
    import torch

    name = "dinov3_vits16"
    prep = registry.get_spec(name).preprocess
    mean, std = np.asarray(prep.mean, np.float32), np.asarray(prep.std, np.float32)
    got = ours(name, photo)
    pil = np.asarray(Image.fromarray(photo).resize(SIZE[::-1], Image.Resampling.BILINEAR))
    check(got, (pil.astype(np.float32) / np.float32(255) - mean) / std, name)
    t = torch.tensor(photo).permute(2, 0, 1)[None].float() / 255
    t = torch.nn.functional.interpolate(t, size=SIZE, mode="bilinear", antialias=True, align_corners=False)
    fast = (t[0].permute(1, 2, 0).numpy() - mean) / std
    assert np.abs(got - fast).max() <= 1 / 255 / std.min() + 1e-6


@pytest.mark.parametrize("size", [SIZE, 448])
def test_dinov2_is_unchanged(photo, size):
    """DINOv2 (and the demo) keep the bicubic resize bit for bit."""
    prep = registry.get_spec("dinov2_vits14").preprocess
    got = prep.image(photo, size)
    h, w = io.target_size(photo.shape[:2], size, prep.patch_size)
    img = np.asarray(Image.fromarray(photo).resize((w, h), Image.Resampling.BICUBIC))
    want = (img.astype(np.float32) / np.float32(255) - np.asarray(prep.mean, np.float32)) / np.asarray(
        prep.std, np.float32)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(io.preprocess(photo, size, prep.patch_size, prep.mean, prep.std), want)


def test_every_entry_names_its_familys_filter():
    want = {"sd": "lanczos", "dit": "lanczos", "dinov3": "bilinear", "siglip2": "bilinear"}
    for name in [*registry.names(), *testing.MODELS]:
        spec = registry.get_spec(name)
        filt = spec.preprocess.resample
        if spec.family == "vit":
            expected = "bilinear" if name.startswith(("dino_", "mae_")) else "bicubic"
        else:
            expected = want[spec.family]
        assert filt == expected, name


def test_unknown_filter_is_refused(photo):
    with pytest.raises(InputError, match=r"PreprocessSpec.resample 'nearest'.*bicubic, bilinear, lanczos"):
        PreprocessSpec(224, 14, (0.5,) * 3, (0.5,) * 3, "nearest")
    with pytest.raises(InputError, match="resample 'area': is not a resize filter"):
        io.preprocess(photo, 224, 14, (0.5,) * 3, (0.5,) * 3, resample="area")
    assert PreprocessSpec(224, 14, (0.5,) * 3, (0.5,) * 3).resample == "bicubic"   # the default
