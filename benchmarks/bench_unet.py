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
    flax taps  the compiled step `spectral_jax.models.sd.diffusion.collect_taps` runs per timestep: add_noise, then
               the UNet up to its last self-attention, returning only the taps

    python benchmarks/bench_unet.py [--runs 5] [--warmup 1] [--sizes tiny,sd1] [--out benchmarks/results/unet.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from spectral_jax.models.convert import apply_table
from spectral_jax.models.sd.config import SD_MODELS
from spectral_jax.models.sd.diffusion import _step_taps
from spectral_jax.models.sd.params import abstract_model, assemble, unet_table
from spectral_jax.models.sd.scheduler import DDPMSchedule
from spectral_jax.models.sd.unet import UNet2DConditionModel, count_params, jit_forward
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

jax.config.update("jax_default_matmul_precision", "float32")

CASES = {"tiny": ("sd_tiny UNet", SD_MODELS["sd_tiny"].config.unet, 16),
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--sizes", default="tiny,sd1")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "unet.md"))
    args = ap.parse_args()
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
    table = "\n".join([header, *lines])
    print(table)
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
            "GPU: no accelerator was available to this session, so there are no GPU rows.\n\n" + table + "\n")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(note)


if __name__ == "__main__":
    main()
