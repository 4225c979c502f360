"""Section `forward`: DINOv2 forward with every layer's q/k/v taps, Flax (jit) vs `transformers` Dinov2Model
(PyTorch eager; and `torch.compile` where the budget allows), identical random weights and inputs.

The torch model is `transformers.Dinov2Model` with its default attention (sdpa), random-initialised by torch; its
state dict goes through our key table (`vit.params.convert`) into the Flax `ViT`, so both sides hold the same
weights (the 'rel diff' column compares the last hidden states). The torch side returns q/k/v through forward hooks
on every layer's q/k/v projections (outputs kept, `[B, T, C]`, as the Flax side keeps `[B, H, T, D]`) — the
analogue of the Flax taps, which `benchmarks/bench_forward.py` leaves out on CPU. float32 rows run true float32
products on both sides (`timing.matched_precision`); bfloat16 rows cast weights and inputs.

Shape legend
    B  batch   S  image side (pixels)   T  tokens (1 + (S/14)²)   C  hidden size   H  heads   D  head dim
"""

from __future__ import annotations

import numpy as np

from timing import Section, free_torch_memory, jax_blocking, matched_precision, medians, rel_err, torch_blocking, \
    torch_device

# name → (hidden size, layers, heads) of the DINOv2 presets (image_size 518, patch 14 → the 37² position grid)
FULL = dict(models={"DINOv2-S": (384, 12, 6), "DINOv2-B": (768, 12, 12), "DINOv2-L": (1024, 24, 16)},
            sizes=(448, 896), batches=(1, 32), dtypes=("float32", "bfloat16"), runs=5, warmup=2,
            compile_rows={("DINOv2-B", 448, 32)}, compile_backend="inductor", image_size=518)
TINY = dict(models={"tiny": (32, 2, 2)}, sizes=(28,), batches=(2,), dtypes=("float32", "bfloat16"), runs=2,
            warmup=1, compile_rows=set(), compile_backend="eager", image_size=28)    # no torch.compile: ~3 s

COLUMNS = [("model", "model"), ("image", "image"), ("batch", "batch"), ("dtype", "dtype"),
           ("flax_ms", "Flax jit, all taps (ms)"), ("torch_ms", "torch eager + hooks (ms)"),
           ("ratio", "Flax / torch eager"), ("compiled_ms", "torch.compile (ms)"),
           ("ratio_compiled", "Flax / torch.compile"), ("rel_diff", "rel diff"),
           ("flax_first_s", "Flax first call incl. compile (s)")]


def _pair(label: str, arch: tuple[int, int, int], image_size: int, dtype_name: str):
    """(torch Dinov2Model on the device, its q/k/v hook outputs list, our compiled forward) with equal weights."""
    import jax.numpy as jnp
    import torch
    import transformers

    from spectral_jax.models.vit import jit_forward
    from spectral_jax.models.vit.config import PRESETS
    from spectral_jax.models.vit.params import assemble, config_from_hf, convert

    c, layers, heads = arch
    torch.manual_seed(0)
    ref = transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=c, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=4 * c,
        image_size=image_size, patch_size=14)).eval()
    cfg = config_from_hf(ref.config.to_dict(), f"{label} config")
    preset = {"DINOv2-S": "dinov2_vits14", "DINOv2-B": "dinov2_vitb14", "DINOv2-L": "dinov2_vitl14"}.get(label)
    if preset is not None and cfg != PRESETS[preset]:
        raise AssertionError(f"{label}: the torch config maps to {cfg}, not the preset {preset}")
    params = convert(cfg, {k: v.detach().numpy() for k, v in ref.state_dict().items()}, f"random {label}")
    jdt = jnp.float32 if dtype_name == "float32" else jnp.bfloat16
    ours = jit_forward(assemble(cfg, params, dtype=jdt))
    ref = ref.to(device=torch_device(), dtype=getattr(torch, dtype_name))
    taps: list = []
    for name, mod in ref.named_modules():
        if name.endswith(("q_proj", "k_proj", "v_proj", "attention.query", "attention.key", "attention.value")):
            mod.register_forward_hook(lambda _m, _i, out: taps.append(out))
    return ref, taps, ours


def _measure(st: Section, ref, taps, ours, compiled, size: int, batch: int, dtype_name: str, runs: int,
             warmup: int) -> dict:
    import time

    import jax
    import jax.numpy as jnp
    import torch

    x = np.random.default_rng(0).standard_normal((batch, size, size, 3)).astype(np.float32)
    xj = jnp.asarray(x, jnp.float32 if dtype_name == "float32" else jnp.bfloat16)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(torch_device(), getattr(torch, dtype_name))

    def eager(model=ref):
        taps.clear()
        with torch.no_grad():
            return model(pixel_values=xt).last_hidden_state

    fns = {"torch": torch_blocking(eager), "flax": jax_blocking(ours, xj)}
    if compiled is not None:
        fns["compiled"] = torch_blocking(lambda: eager(compiled))
    with matched_precision(dtype_name):
        t0 = time.perf_counter()
        jax.block_until_ready(ours(xj))
        first = time.perf_counter() - t0
        t = medians(fns, runs, warmup)
        n_taps = len(taps)
        diff = rel_err(np.asarray(ours(xj)[0], np.float32), eager().float().cpu().numpy())
    taps.clear()
    free_torch_memory()
    out = {"flax_ms": 1e3 * t["flax"], "torch_ms": 1e3 * t["torch"], "ratio": t["flax"] / t["torch"],
           "rel_diff": diff, "flax_first_s": first, "torch_taps": n_taps}
    if compiled is not None:
        out.update(compiled_ms=1e3 * t["compiled"], ratio_compiled=t["flax"] / t["compiled"])
    return out


def run(st: Section) -> None:
    import torch

    plan = TINY if st.tiny else FULL
    built: dict = {}
    for size in plan["sizes"]:
        for batch in plan["batches"]:
            for label, arch in plan["models"].items():
                for dtype_name in plan["dtypes"]:
                    fields = dict(model=label, image=f"{size}²", batch=batch, dtype=dtype_name)
                    if st.spent():
                        st.row(f"{label} {size}² b{batch} {dtype_name}", "skipped",
                               f"section budget of {st.budget_s:.0f} s spent", **fields)
                        continue
                    key = (label, dtype_name)
                    if key not in built:
                        built[key] = _pair(label, arch, plan["image_size"], dtype_name) + (None,)
                    ref, taps, ours, compiled = built[key]
                    if (label, size, batch) in plan["compile_rows"] and compiled is None:
                        compiled = torch.compile(ref, backend=plan["compile_backend"])
                        built[key] = (ref, taps, ours, compiled)
                    use = compiled if (label, size, batch) in plan["compile_rows"] else None
                    st.attempt(f"{label} {size}² b{batch} {dtype_name}",
                               lambda: _measure(st, ref, taps, ours, use, size, batch, dtype_name, plan["runs"],
                                                plan["warmup"]), **fields)
