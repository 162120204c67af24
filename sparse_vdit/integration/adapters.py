"""One thin adapter per diffusers model family.

An adapter knows, for its family: which attention modules are the sparse-eligible self-attention
layers (in order), the latent grid and text layout of a forward call, the stock processor, and how
the stock processor computes q, k and v, so that the sparse path differs from it in the attention
core only.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

# attend(q, k, v) -> o, all [B, N, H, D] (the layout diffusers processors use)
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class ModelAdapter:
    family: str = ""
    model_classes: tuple[str, ...] = ()
    text_position: str = "after"

    def matches(self, model) -> bool:
        return type(model).__name__ in self.model_classes

    def attention_layers(self, model) -> list[tuple[str, Any]]:
        raise NotImplementedError

    def latent_grid(self, model, args, kwargs) -> tuple[int, int, int]:
        """(frames, height, width) in tokens after patchify, from the transformer's forward inputs."""
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if hidden is None or hidden.dim() != 5:
            raise ValueError(f"{self.family}: expected hidden_states [B, C, F, H, W] as the first input")
        cfg = model.config
        p = cfg.patch_size
        if isinstance(p, (tuple, list)):
            pt, ph, pw = p
        else:
            pt, ph, pw = getattr(cfg, "patch_size_t", None) or 1, p, p
        _, _, f, h, w = hidden.shape
        return (f + pt - 1) // pt if self.ceil_frames else f // pt, h // ph, w // pw

    ceil_frames = False

    def text_len(self, model, args, kwargs) -> int:
        return 0

    def timestep(self, args, kwargs):
        t = kwargs.get("timestep")
        if t is None and len(args) > 1:
            t = args[1]
        return t

    def stock_processor(self, attn):
        raise NotImplementedError

    def sparse_forward(self, attn, attend: Attend, hidden_states, *args, **kwargs):
        raise NotImplementedError


# ---------------------------------------------------------------------------- Wan 2.1 / 2.2
class WanAdapter(ModelAdapter):
    family = "wan"
    model_classes = ("WanTransformer3DModel",)

    def attention_layers(self, model):
        return [(f"blocks.{i}.attn1", b.attn1) for i, b in enumerate(model.blocks)]

    def stock_processor(self, attn):
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor

        return WanAttnProcessor()

    def sparse_forward(self, attn, attend, hidden_states, encoder_hidden_states=None, attention_mask=None,
                       rotary_emb=None, **kwargs):
        # Mirrors WanAttnProcessor for self-attention (encoder_hidden_states is None there).
        from diffusers.models.transformers.transformer_wan import _get_qkv_projections

        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("sparse Wan attention handles self-attention without an attention mask only")
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = _wan_rotary(query, *rotary_emb)
            key = _wan_rotary(key, *rotary_emb)
        out = attend(query, key, value)
        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def _wan_rotary(x, freqs_cos, freqs_sin):
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


ADAPTERS: list[ModelAdapter] = [WanAdapter()]


def adapter_for(model) -> ModelAdapter:
    for a in ADAPTERS:
        if a.matches(model):
            return a
    supported = [c for a in ADAPTERS for c in a.model_classes]
    raise ValueError(f"{type(model).__name__} is not a supported transformer; supported: {supported}")


def attention_shape(model) -> tuple[int, int]:
    layers = adapter_for(model).attention_layers(model)
    return len(layers), int(layers[0][1].heads)
