"""The CLIP text encoder Stable Diffusion conditions on (`transformers.CLIPTextModel`), Flax NNX; used here only to
embed the empty prompt (the official code's unconditional setting).

    enc = CLIPTextModel(TEXT_PRESETS["sd1"], rngs=nnx.Rngs(0))       # or sd.params.load_text_encoder(dir)
    ids = empty_prompt_ids(cfg, pad="eos")                            # [1, 77]: BOS, EOS, padding
    text = enc(ids)                                                   # [1, 77, C]: last_hidden_state

Per layer (pre-norm, causal self-attention):
    x = x + out_proj(attn(layer_norm1(x)))     attn = softmax(q kᵀ/√D + causal mask) v
    x = x + fc2(act(fc1(layer_norm2(x))))      act = quick_gelu x·σ(1.702x) (SD 1.x) or exact gelu (SD 2.x)
then final_layer_norm. No attention mask over padding (SD pipelines pass none: `use_attention_mask` is unset).

The tokenizer is not needed for the empty prompt: CLIP's BPE vocabulary ends with <|startoftext|> (BOS,
vocab_size − 2 = 49406) and <|endoftext|> (EOS, vocab_size − 1 = 49407), and SD pads to 77 tokens. The padding
token differs by family: SD 1.x's tokenizer (openai/clip-vit-large-patch14) pads with <|endoftext|> (49407); the
SD 2.x tokenizers (`stabilityai/*/tokenizer`, special_tokens_map.json `"pad_token": "!"`) pad with "!" = id 0.
Because attention is causal but not padding-masked, positions 2..76 depend on that choice.

Shape legend
    B  prompts   L  tokens (77)   C  width   H  heads   D = C/H   F  MLP width   V  vocabulary
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spectral_jax.models.sd.config import CLIPTextConfig  # noqa: F401  (re-exported)
from spectral_jax.models.sd.layers import layer_norm, linear


def empty_prompt_ids(cfg: CLIPTextConfig, pad: str) -> np.ndarray:
    """The tokenizer's ids for "" padded to `max_position_embeddings`: `[1, L]` int32 = [BOS, EOS, pad, ...].

    pad: "eos" (SD 1.x: <|endoftext|>) or "zero" (SD 2.x: "!" = 0).
    """
    if pad not in ("eos", "zero"):
        raise ValueError(f"pad must be 'eos' or 'zero', got {pad!r}")
    bos, eos = cfg.vocab_size - 2, cfg.vocab_size - 1
    ids = np.full((1, cfg.max_position_embeddings), eos if pad == "eos" else 0, np.int32)
    ids[0, :2] = bos, eos
    return ids


class CLIPAttention(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        c = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.q_proj = linear(c, c, dtype=dtype, rngs=rngs)
        self.k_proj = linear(c, c, dtype=dtype, rngs=rngs)
        self.v_proj = linear(c, c, dtype=dtype, rngs=rngs)
        self.out_proj = linear(c, c, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        b, n, c = x.shape
        split = lambda y: y.reshape(b, n, self.heads, c // self.heads)
        out = jax.nn.dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                                           is_causal=True)
        return self.out_proj(out.reshape(b, n, c))


class CLIPMLP(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        self.quick = cfg.hidden_act == "quick_gelu"
        self.fc1 = linear(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, rngs=rngs)
        self.fc2 = linear(cfg.intermediate_size, cfg.hidden_size, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        x = self.fc1(x)
        x = x * jax.nn.sigmoid(1.702 * x) if self.quick else jax.nn.gelu(x, approximate=False)
        return self.fc2(x)


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        self.layer_norm1 = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype, rngs=rngs)
        self.self_attn = CLIPAttention(cfg, dtype=dtype, rngs=rngs)
        self.layer_norm2 = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype, rngs=rngs)
        self.mlp = CLIPMLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.token_embedding = nnx.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init, dtype=dtype,
                                         param_dtype=dtype, rngs=rngs)
        self.position_embedding = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size, embedding_init=init,
                                            dtype=dtype, param_dtype=dtype, rngs=rngs)

    def __call__(self, ids):
        return self.token_embedding(ids) + self.position_embedding(jnp.arange(ids.shape[1]))[None]


class _Encoder(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        self.layers = nnx.List([CLIPEncoderLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_hidden_layers)])


class CLIPTextModel(nnx.Module):
    """`model(ids)` → last_hidden_state `[B, L, C]` (after final_layer_norm), what SD's cross-attention reads."""

    def __init__(self, cfg: CLIPTextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embeddings = CLIPTextEmbeddings(cfg, dtype=dtype, rngs=rngs)
        self.encoder = _Encoder(cfg, dtype=dtype, rngs=rngs)
        self.final_layer_norm = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype, rngs=rngs)

    def __call__(self, ids):
        ids = jnp.asarray(ids, jnp.int32)
        if ids.ndim != 2 or ids.shape[1] > self.cfg.max_position_embeddings:
            raise ValueError(f"ids must be [B, L≤{self.cfg.max_position_embeddings}], got {ids.shape}")
        x = self.embeddings(ids)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.final_layer_norm(x)
