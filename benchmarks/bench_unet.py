"""Stable Diffusion UNet forward: jitted Flax (`spectral_jax.models.sd.unet`) vs PyTorch eager (`diffusers`,
`torch.no_grad`), same weights and inputs.

Two sizes: the `sd_tiny` architecture at latent 16² (a 128² image) and the SD 1.x UNet (860M parameters; the same
architecture as sd14/sd15, random init) at latent 32² (a 256² image). Batch 1, float32, the empty-prompt-shaped
context `[1, 77, C]`, timestep 100. The diffusers UNet is random-initialised (torch's init), its state dict goes
through our key table (`weights.apply_table`) into the Flax model, so both sides hold identical weights.

Timed, each as the median of `--runs` calls after `--warmup` calls (Flax warm-up includes compilation), calls
interleaved so that load from other jobs falls on all alike:
    torch      diffusers `UNet2DConditionModel(sample, t, context).sample`
    flax       `sd.unet.jit_forward(unet)`: noise prediction + q/k/v taps of all 16 self-attention layers
    flax taps  one timestep of `spectral_jax.models.sd.diffusion.diffusion_taps` (its scan body, `unet_step`),
               compiled alone: add_noise, then the UNet up to its last self-attention, returning only the taps

    python benchmarks/bench_unet.py [--runs 5] [--warmup 1] [--sizes tiny,sd1] [--out benchmarks/results/unet.md]

`--dit` times the diffusion transformers instead (the SD rows are not re-run): PixArt-Σ, SD3 Medium and FLUX.1-dev
at full width but reduced depth (`DIT_CASES`: the full models do not fit a CPU benchmark), random-init diffusers
transformers whose state dicts go through our key tables (`dit.params.ARCHS`), one latent size each:
    torch      the diffusers transformer forward (`.sample`; FLUX fed the pipeline's packing and position ids)
    flax       the jitted transformer forward: output + q/k/v taps of every block

    python benchmarks/bench_unet.py --dit [--runs 3] [--warmup 1] [--models pixart,sd3,flux] [--latent 32]
        [--text 77] [--out benchmarks/results/unet_dit.md]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import sys
import time

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from spectral_jax.models import testing
from spectral_jax.models.convert import apply_table
from spectral_jax.models.convert import abstract_model as abstract_any
from spectral_jax.models.convert import assemble as assemble_any
from spectral_jax.models.dit.params import ARCHS
from spectral_jax.models.sd.config import SD_MODELS
from spectral_jax.models.sd.diffusion import image_noise, unet_step
from spectral_jax.models.sd.params import abstract_model, assemble, unet_table
from spectral_jax.models.sd.scheduler import DDPMSchedule
from spectral_jax.models.sd.unet import UNet2DConditionModel, count_params, jit_forward
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

jax.config.update("jax_default_matmul_precision", "float32")



@functools.partial(jax.jit, static_argnames=("graphdef", "schedule"))
def _step_taps(graphdef, state, latents, t, i, key, context, schedule):
    """One timestep of `diffusion_taps`: the taps of all 16 self-attention layers on add_noise(latents, ε_i, t)."""
    unet = nnx.merge(graphdef, state)
    return unet_step(unet, latents, image_noise(key, i, latents), t, context, schedule, None)


CASES = {"tiny": ("sd_tiny UNet", testing.MODELS["sd_tiny"].config.unet, 16),
         "sd1": ("SD 1.x UNet", SD_MODELS["sd15"].config.unet, 32)}


def pair(cfg):
    """(diffusers UNet, our UNet) with the same random weights."""
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(
        block_out_channels=cfg.block_out_channels, attention_head_dim=list(cfg.num_attention_heads),
        cross_attention_dim=cfg.cross_attention_dim, norm_num_groups=cfg.norm_num_groups,
        layers_per_block=cfg.layers_per_block, use_linear_projection=cfg.use_linear_projection).eval()
    tensors = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    params = apply_table(unet_table(cfg), abstract_model(UNet2DConditionModel, cfg)[2], tensors, "reference", "-")
    return ref, assemble(UNet2DConditionModel, cfg, params)


# full width (heads × head dim, text and pooled widths of the released models), reduced depth
DIT_CASES = {
    "pixart": ("PixArt-Σ, 2 of 28 blocks", "PixArtTransformer2DModel", dict(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=1152, caption_channels=4096, sample_size=128, patch_size=2,
        use_additional_conditions=False, norm_num_groups=1), 4),
    "sd3": ("SD3 Medium, 2 of 24 blocks", "SD3Transformer2DModel", dict(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=192), 16),
    "flux": ("FLUX.1-dev, 1 of 19 double + 1 of 38 single blocks", "FluxTransformer2DModel", dict(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56)), 16),
}


def dit_pair(cls_name, kwargs):
    """(diffusers transformer, our transformer) with the same random weights (torch's init, through our table)."""
    torch.manual_seed(0)
    ref = getattr(diffusers, cls_name)(**kwargs).eval()
    read = {a.cls.__name__: a for a in ARCHS.values()}[cls_name]
    cfg = read.read(json.loads(json.dumps(dict(ref.config))), "reference")   # as config.json reads
    tensors = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    params = apply_table(read.table, abstract_any(read.cls, cfg)[2], tensors, "reference", "-", read.title)
    return ref, assemble_any(read.cls, cfg, params)


def dit_inputs(key, ref, cfg, side, text, rng):
    """(torch call, our args) for one latent `[1, side, side, Z]` and `text` random text tokens."""
    z = DIT_CASES[key][3]
    x = rng.standard_normal((1, side, side, z)).astype(np.float32)
    c = rng.standard_normal((1, text, cfg.context_dim)).astype(np.float32)
    xt, ct = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(c)
    if key == "pixart":
        return (lambda: ref(xt, ct, torch.tensor([100])).sample), (jnp.asarray(x), 100, jnp.asarray(c)), \
            lambda out: out.permute(0, 2, 3, 1).numpy()
    p = rng.standard_normal((1, cfg.pooled_projection_dim)).astype(np.float32)
    pt, ours_args = torch.from_numpy(p), (jnp.asarray(x), 500.0, (jnp.asarray(c), jnp.asarray(p)))
    if key == "sd3":
        return (lambda: ref(xt, ct, pt, torch.tensor([500.0])).sample), ours_args, \
            lambda out: out.permute(0, 2, 3, 1).numpy()
    packed = diffusers.FluxPipeline._pack_latents(xt, 1, z, side, side)
    img_ids = diffusers.FluxPipeline._prepare_latent_image_ids(1, side // 2, side // 2, "cpu", torch.float32)
    txt_ids = torch.zeros(text, 3)
    return (lambda: ref(packed, ct, pt, torch.tensor([0.5]), img_ids, txt_ids, torch.tensor([cfg.guidance])).sample), \
        ours_args, lambda out: diffusers.FluxPipeline._unpack_latents(out, side * 8, side * 8, 8).permute(0, 2, 3, 1).numpy()


def dit_main(args) -> None:
    rows, threads = [], torch.get_num_threads()
    for key in args.models.split(","):
        label, cls_name, kwargs, _ = DIT_CASES[key]
        ref, ours = dit_pair(cls_name, kwargs)
        torch_call, ours_args, to_nhwc = dit_inputs(key, ref, ours.cfg, args.latent, args.text,
                                                    np.random.default_rng(0))
        graphdef, state = nnx.split(ours)
        fwd = jax.jit(lambda state, x, t, c: nnx.merge(graphdef, state)(x, t, c))

        def run_torch(n=threads):
            torch.set_num_threads(n)
            with torch.no_grad():
                return torch_call()

        def run_flax():
            return jax.block_until_ready(fwd(state, *ours_args))

        t0 = time.perf_counter()
        out, taps = run_flax()
        compile_s = time.perf_counter() - t0
        t = _common.median_seconds({"torch": run_torch, "torch1": lambda: run_torch(1), "flax": run_flax},
                                   args.runs, args.warmup)
        want = to_nhwc(run_torch())
        diff = float(np.abs(np.asarray(out) - want).max()) / float(np.abs(want).max())
        n_par = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(state))
        rows.append((label, f"{n_par / 1e6:.0f}M", f"{args.latent}² ({8 * args.latent}² image), "
                     f"{(args.latent // 2) ** 2} + {args.text} text tokens", len(taps.layers),
                     t["torch"], t["torch1"], t["flax"], compile_s, diff))
        print(rows[-1], flush=True)
        del ref, ours, state, fwd, out, taps
    header = (f"| model (full width, reduced depth) | params | latent, tokens | tapped layers | torch eager, {threads} "
              "threads (ms) | torch eager, 1 thread (ms) | flax jit, output + taps (ms) | ratio flax/torch (best "
              "torch) | first flax call incl. compile (s) | max rel diff |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [f"| {m} | {p} | {lat} | {nl} | {a * 1e3:.0f} | {a1 * 1e3:.0f} | {b * 1e3:.0f} | {b / min(a, a1):.2f} "
             f"| {s:.1f} | {d:.1e} |" for m, p, lat, nl, a, a1, b, s, d in rows]
    note = (f"# Diffusion transformers' forward: Flax (jit) vs diffusers (PyTorch eager)\n\n"
            f"Measured {datetime.datetime.now().isoformat(timespec='minutes')} with `python benchmarks/bench_unet.py "
            f"--dit --runs {args.runs} --warmup {args.warmup} --models {args.models} --latent {args.latent} --text "
            f"{args.text}`; load average before the run {args.load_before}, after {_loadavg()}. Batch 1, float32 "
            f"(matmul precision float32), random latents `[1, {args.latent}, {args.latent}, Z]` and random text "
            f"tokens `[1, {args.text}, C_text]` (+ pooled for SD3/FLUX); timestep 100 (PixArt), flow t = 500 "
            f"(SD3, FLUX: σ = 0.5, guidance 3.5). Median of {args.runs} runs after {args.warmup} warm-up call(s), "
            f"torch and Flax calls interleaved; same random weights on both sides (diffusers' init, converted "
            f"through our key tables).\n\nMachine: {_common.torch_machine_line(diffusers)}.\n\n"
            "**Reduced depth**: each model has its released width (heads × head dim, text and pooled widths, patch, "
            "latent channels) but only the blocks named in the table — the full models (PixArt-Σ 0.6B, SD3 Medium "
            "2B, FLUX.1 12B parameters) do not fit a benchmark on 2 shared CPU cores. Per-block cost is the same, "
            "so the time of a full model is roughly the embedders plus (blocks × per-block time).\n\n"
            "The machine is shared with other jobs (several engineers' tests on 2 CPUs): absolute times are "
            "several times an idle machine's and ratios move from run to run; torch is also timed with one thread "
            "(its OpenMP threads stall under contention) and the ratio uses the faster torch column. "
            "'flax jit' returns the output and the q/k/v taps of every block (image tokens). 'max rel diff': "
            "max |flax − torch| / max |torch| of the output.\n\n"
            "GPU: no accelerator was available to this session, so there are no GPU rows.\n\n")
    write_note(args.out, note, header, lines)


def write_note(path: str, note: str, header: str, lines: list[str]) -> None:
    """Print the table and write `note` followed by it to `path`."""
    table = "\n".join([header, *lines])
    print(table)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(note + table + "\n")


def _loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=None, help="default 5 (SD), 3 (--dit)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--sizes", default="tiny,sd1")
    ap.add_argument("--dit", action="store_true", help="time the diffusion transformers instead of the SD UNets")
    ap.add_argument("--models", default="pixart,sd3,flux", help="with --dit: which of " + ",".join(DIT_CASES))
    ap.add_argument("--latent", type=int, default=32, help="with --dit: latent side (even)")
    ap.add_argument("--text", type=int, default=77, help="with --dit: text tokens")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    results = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    if args.dit:
        args.runs = args.runs or 3
        args.out = args.out or os.path.join(results, "unet_dit.md")
        args.load_before = _loadavg()
        return dit_main(args)
    args.runs = args.runs or 5
    args.out = args.out or os.path.join(results, "unet.md")
    rows, threads = [], torch.get_num_threads()
    for key in args.sizes.split(","):
        label, cfg, side = CASES[key]
        ref, ours = pair(cfg)
        rng = np.random.default_rng(0)
        x = rng.standard_normal((1, side, side, 4)).astype(np.float32)
        ctx = rng.standard_normal((1, 77, cfg.cross_attention_dim)).astype(np.float32)
        xt, ct = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(ctx)
        xj, cj = jnp.asarray(x), jnp.asarray(ctx)
        fwd = jit_forward(ours)
        graphdef, state = nnx.split(ours)
        sched, k = DDPMSchedule(), jax.random.key(0)

        def run_torch(threads=threads):
            torch.set_num_threads(threads)
            with torch.no_grad():
                return ref(xt, 100, ct).sample

        def run_taps():
            return jax.block_until_ready(_step_taps(graphdef, state, xj, jnp.int32(100), jnp.int32(0), k, cj, sched))

        t0 = time.perf_counter()
        jax.block_until_ready(fwd(xj, 100, cj))
        compile_s = time.perf_counter() - t0
        t = _common.median_seconds({"torch": run_torch, "torch1": lambda: run_torch(1),
                            "flax": lambda: jax.block_until_ready(fwd(xj, 100, cj)), "taps": run_taps},
                           args.runs, args.warmup)
        diff = float(np.abs(np.asarray(fwd(xj, 100, cj)[0]) - run_torch().permute(0, 2, 3, 1).numpy()).max())
        scale = float(np.abs(run_torch().numpy()).max())
        rows.append((label, f"{count_params(ours) / 1e6:.1f}M", f"{side}² ({8 * side}² image)", t["torch"],
                     t["torch1"], t["flax"], t["taps"], compile_s, diff / scale))
        print(rows[-1], flush=True)
        del ref, ours, state, fwd
    header = (f"| model | params | latent | torch eager, {threads} threads (ms) | torch eager, 1 thread (ms) "
              "| flax jit (ms) | flax jit, taps only (ms) | ratio flax/torch (best torch) | ratio taps/torch (best "
              "torch) | first flax call incl. compile (s) | max rel diff |\n|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [f"| {m} | {p} | {lat} | {a * 1e3:.0f} | {a1 * 1e3:.0f} | {b * 1e3:.0f} | {c * 1e3:.0f} "
             f"| {b / min(a, a1):.2f} | {c / min(a, a1):.2f} | {s:.1f} | {d:.1e} |"
             for m, p, lat, a, a1, b, c, s, d in rows]
    note = (f"# Stable Diffusion UNet forward: Flax (jit) vs diffusers (PyTorch eager)\n\n"
            f"Measured {datetime.date.today().isoformat()} with `python benchmarks/bench_unet.py --runs {args.runs} "
            f"--warmup {args.warmup} --sizes {args.sizes}`; batch 1, float32 (matmul precision float32), timestep "
            f"100, context [1, 77, C]; median of {args.runs} runs after {args.warmup} warm-up call(s), torch and "
            f"Flax calls interleaved; same random weights on both sides.\n\nMachine: {_common.torch_machine_line(diffusers)}.\n\n"
            "The machine is shared with other jobs (several engineers' tests and benchmarks on 2 CPUs; load average "
            "above): absolute times are several times an idle machine's and ratios move from run to run. Under "
            "this contention PyTorch's OpenMP threads stall badly (spin-waiting for a descheduled peer), so torch is "
            "also timed with one thread; the ratios use the faster of the two torch columns. XLA ran with its "
            "default thread pool.\n"
            "'flax jit' returns the noise prediction and the q/k/v taps of all 16 self-attention layers; 'taps "
            "only' is the per-timestep step of `collect_taps` (noise + UNet up to the last self-attention, only the "
            "taps returned). 'max rel diff': max |flax − torch| / max |torch| of the noise prediction.\n\n"
            "GPU: no accelerator was available to this session, so there are no GPU rows.\n\n")
    write_note(args.out, note, header, lines)


if __name__ == "__main__":
    main()
