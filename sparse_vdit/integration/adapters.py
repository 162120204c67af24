"""One thin adapter per diffusers model family.

An adapter knows, for its family: which attention modules are the sparse-eligible self-attention
layers (in order), the latent grid and text layout of a forward call, the stock processor, and how
the stock processor computes q, k and v, so that the sparse path differs from it in the attention
core only.

Each ``sparse_forward`` mirrors a diffusers processor line by line; ``mirrors`` names the file,
class and diffusers version it was written against. ``tests/test_adapters_mirror_diffusers.py``
runs each mirror with dense attention against the installed diffusers' stock processor on a tiny
model and fails when diffusers changes the computation. (diffusers >= 0.35 sends Wan, LTX and
HunyuanVideo attention through ``dispatch_attention_fn``, whose backend registry is private: hooking
our kernel in there would shrink these mirrors to the q/k/v-free part, at the price of depending on
private diffusers names, so the mirrors stay.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils.weak import WeakIdKeyDictionary

# attend(q, k, v, key_valid=None) -> o, all [B, N, H, D] (the layout diffusers processors use);
# key_valid: optional bool [B, N], False for keys no query may attend (padded text tokens). An attend
# whose ``takes_rotary`` attribute is True also takes ``rotary=`` (a Rotary) with q and k unrotated.
Attend = Callable[..., torch.Tensor]


@dataclass(frozen=True, eq=False)
class Rotary:
    """A rotary embedding an adapter hands to attention unapplied, so that attention may fuse it with
    the copy of k into tiled order (``sparse_vdit.ops.rope``). ``apply`` is the stock processor's own
    rotation of ``[B, N, H, D]`` (what runs where nothing fuses); ``cos``/``sin`` the same angles as
    fp32 ``[Bc, Nr, Hc, D // 2]`` tables, one per interleaved pair ``(x[2i], x[2i + 1])``, for
    tokens ``start .. start + Nr - 1`` (the others are not rotated)."""

    apply: Callable[[torch.Tensor], torch.Tensor]
    cos: torch.Tensor
    sin: torch.Tensor
    start: int = 0


def attend_rotated(attend: Attend, query, key, value, rotary: Rotary | None, **kwargs):
    """``attend`` on q and k rotated by ``rotary``: by attention itself where it takes the rotary
    (``attend.takes_rotary``), else first by the stock processor's rotation."""
    if rotary is None:
        return attend(query, key, value, **kwargs)
    if getattr(attend, "takes_rotary", False):
        return attend(query, key, value, rotary=rotary, **kwargs)
    return attend(rotary.apply(query), rotary.apply(key), value, **kwargs)


# Pair tables by the transformer's angle tensor (computed once per forward and handed to every layer):
# converted once per forward, not once per layer.
_PAIR_TABLES = WeakIdKeyDictionary()


def pair_tables(cos: torch.Tensor, sin: torch.Tensor, make: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """``make(cos, sin)`` -> fp32 ``[Bc, Nr, Hc, D // 2]`` pair tables, cached per ``cos`` tensor."""
    if torch.compiler.is_compiling():
        return tuple(t.float() for t in make(cos, sin))
    hit = _PAIR_TABLES.get(cos)
    if hit is None or hit[0] is not sin or hit[1] != (cos._version, sin._version):
        tables = tuple(t.float().contiguous() for t in make(cos, sin))
        hit = (sin, (cos._version, sin._version), tables)
        _PAIR_TABLES[cos] = hit
    return hit[2]


def _arg(args, kwargs, name: str, index: int):
    """A forward argument given by keyword or position."""
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else None


# The sparse_forward methods below look alike (projections, norms, rotary, attend, output projection)
# because the diffusers processors they mirror do; each follows its own processor's exact order and
# details (see ``mirrors``), so they are kept apart. (`duplicates` rows; justified.)
class ModelAdapter:
    """What sparse_vdit needs to know about one diffusers transformer family."""

    family: str = ""
    model_classes: tuple[str, ...] = ()
    mirrors: tuple[str, str] = ("", "")  # (diffusers file::processor class, diffusers version)
    text_position: str = "after"
    timestep_index: int = 1  # position of `timestep` in the transformer's forward
    text_dim_key: str = "text_embed_dim"  # the config key of the prompt embedding width

    def text_embed_dim(self, model) -> int | None:
        """Width of the prompt embeddings the transformer takes (None if its config does not say)."""
        value = getattr(model.config, self.text_dim_key, None)
        return int(value) if value is not None else None

    def matches(self, model) -> bool:
        return type(model).__name__ in self.model_classes

    def attention_layers(self, model) -> list[tuple[str, Any]]:
        """The sparse-eligible self-attention modules, in plan-layer order."""
        raise NotImplementedError

    def processor_modules(self, model) -> list[tuple[str, Any]]:
        """Every attention module that holds a processor (sparse-eligible or not)."""
        return [(n, m) for n, m in model.named_modules() if hasattr(m, "set_processor")]

    def latent_grid(self, model, args, kwargs) -> tuple[int, int, int]:
        """(frames, height, width) in tokens after patchify, from the transformer's forward inputs
        ``hidden_states [B, C, F, H, W]`` and the config's patch sizes."""
        hidden = _arg(args, kwargs, "hidden_states", 0)
        if hidden is None or hidden.dim() != 5:
            raise ValueError(f"{self.family}: expected hidden_states [B, C, F, H, W] as the first input")
        pt, ph, pw = self.patch_sizes(model.config)
        _, _, f, h, w = hidden.shape
        return f // pt, h // ph, w // pw

    @staticmethod
    def patch_sizes(cfg) -> tuple[int, int, int]:
        p = cfg.patch_size
        if isinstance(p, (tuple, list)):
            return tuple(int(x) for x in p)
        return int(getattr(cfg, "patch_size_t", None) or 1), int(p), int(p)

    def text_len(self, model, args, kwargs) -> int:
        """Text tokens in the self-attention sequence (0 when text enters by cross-attention)."""
        return 0

    def timestep(self, args, kwargs):
        return _arg(args, kwargs, "timestep", self.timestep_index)

    def stock_processor(self, attn):
        """A fresh instance of the processor this family's module uses out of the box."""
        raise NotImplementedError

    def sparse_forward(self, attn, attend: Attend, hidden_states, *args, **kwargs):
        """The stock processor's computation with ``attend`` as its attention core."""
        raise NotImplementedError


# ---------------------------------------------------------------------------- Wan 2.1 / 2.2
class WanAdapter(ModelAdapter):
    family = "wan"
    model_classes = ("WanTransformer3DModel",)
    mirrors = ("models/transformers/transformer_wan.py::WanAttnProcessor", "0.42.1")
    text_dim_key = "text_dim"

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
        rotary = None
        if rotary_emb is not None:  # (applied by attention: _wan_rotary, or fused with k's copy into tiled order)
            cos, sin = pair_tables(*rotary_emb, lambda c, s: (c[..., 0::2], s[..., 1::2]))  # [1, N, 1, D / 2]
            rotary = Rotary(lambda x: _wan_rotary(x, *rotary_emb), cos, sin)
        out = attend_rotated(attend, query, key, value, rotary)
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


# ---------------------------------------------------------------------------- HunyuanVideo
class HunyuanVideoAdapter(ModelAdapter):
    """Dual-stream blocks (video + text with their own projections) then single-stream blocks
    (video and text concatenated); text comes after the video tokens, padded text keys are masked."""

    family = "hunyuan_video"
    model_classes = ("HunyuanVideoTransformer3DModel",)
    mirrors = ("models/transformers/transformer_hunyuan_video.py::HunyuanVideoAttnProcessor2_0", "0.42.1")
    text_position = "after"

    def attention_layers(self, model):
        dual = [(f"transformer_blocks.{i}.attn", b.attn) for i, b in enumerate(model.transformer_blocks)]
        single = [(f"single_transformer_blocks.{i}.attn", b.attn) for i, b in enumerate(model.single_transformer_blocks)]
        return dual + single

    def text_len(self, model, args, kwargs):
        enc = _arg(args, kwargs, "encoder_hidden_states", 2)
        return int(enc.shape[1])

    def stock_processor(self, attn):
        from diffusers.models.attention_processor import AttnProcessor2_0
        from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

        # The token refiner's attention (no q/k norm) is a plain Attention with the default processor.
        if attn.norm_q is not None:
            return HunyuanVideoAttnProcessor2_0()
        return AttnProcessor2_0()

    def sparse_forward(self, attn, attend, hidden_states, encoder_hidden_states=None, attention_mask=None,
                       image_rotary_emb=None, **kwargs):
        # Mirrors HunyuanVideoAttnProcessor2_0 with the joint (video + text) sequence.
        from diffusers.models.embeddings import apply_rotary_emb

        if encoder_hidden_states is None:
            raise ValueError("sparse HunyuanVideo attention expects the text stream (encoder_hidden_states)")
        text = encoder_hidden_states.shape[1]
        single = attn.add_q_proj is None
        if single:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        query = attn.to_q(hidden_states).unflatten(2, (attn.heads, -1))
        key = attn.to_k(hidden_states).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if not single:
            eq = attn.add_q_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            ek = attn.add_k_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            ev = attn.add_v_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            query = torch.cat([query, eq], dim=1)
            key = torch.cat([key, ek], dim=1)
            value = torch.cat([value, ev], dim=1)
        # The stock processor rotates the video tokens only (before joining the text stream, or of the
        # joint sequence); the same rotation of the joint sequence's video part, applied by attention.
        rotary = None
        if image_rotary_emb is not None:
            def rotate(x):
                return torch.cat([apply_rotary_emb(x[:, :-text], image_rotary_emb, sequence_dim=1), x[:, -text:]],
                                 dim=1)

            cos, sin = pair_tables(*image_rotary_emb, lambda c, s: (c[None, :, None, 0::2], s[None, :, None, 0::2]))
            rotary = Rotary(rotate, cos, sin)
        key_valid = None if attention_mask is None else key_valid_from_mask(attention_mask)
        out = attend_rotated(attend, query, key, value, rotary, key_valid=key_valid)
        out = out.flatten(2, 3).to(query.dtype)
        out, enc_out = out[:, :-text], out[:, -text:]
        if getattr(attn, "to_out", None) is not None:
            out = attn.to_out[0](out)
            out = attn.to_out[1](out)
        if getattr(attn, "to_add_out", None) is not None:
            enc_out = attn.to_add_out(enc_out)
        return out, enc_out


# ---------------------------------------------------------------------------- CogVideoX
class CogVideoXAdapter(ModelAdapter):
    """Joint attention over text (first) and video; hidden_states come in as [B, F, C, H, W]."""

    family = "cogvideox"
    model_classes = ("CogVideoXTransformer3DModel",)
    mirrors = ("models/attention_processor.py::CogVideoXAttnProcessor2_0", "0.42.1")
    text_position = "before"
    timestep_index = 2

    def attention_layers(self, model):
        return [(f"transformer_blocks.{i}.attn1", b.attn1) for i, b in enumerate(model.transformer_blocks)]

    def latent_grid(self, model, args, kwargs):
        hidden = _arg(args, kwargs, "hidden_states", 0)
        if hidden is None or hidden.dim() != 5:
            raise ValueError("cogvideox: expected hidden_states [B, F, C, H, W] as the first input")
        pt, ph, pw = self.patch_sizes(model.config)
        _, f, _, h, w = hidden.shape
        return f // pt, h // ph, w // pw

    def text_len(self, model, args, kwargs):
        enc = _arg(args, kwargs, "encoder_hidden_states", 1)
        return int(enc.shape[1])

    def stock_processor(self, attn):
        from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0

        return CogVideoXAttnProcessor2_0()

    def sparse_forward(self, attn, attend, hidden_states, encoder_hidden_states=None, attention_mask=None,
                       image_rotary_emb=None, **kwargs):
        # Mirrors CogVideoXAttnProcessor2_0 (self-attention over [text, video]).
        from diffusers.models.embeddings import apply_rotary_emb

        if attention_mask is not None:
            raise ValueError("sparse CogVideoX attention does not take an attention_mask")
        text = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        B = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(B, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(B, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(B, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query[:, :, text:] = apply_rotary_emb(query[:, :, text:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, text:] = apply_rotary_emb(key[:, :, text:], image_rotary_emb)
        out = attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
        out = out.reshape(B, -1, attn.heads * head_dim)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        enc_out, out = out.split([text, out.size(1) - text], dim=1)
        return out, enc_out


# ---------------------------------------------------------------------------- LTX-Video
class LTXVideoAdapter(ModelAdapter):
    """Self-attention (attn1) over video tokens only; text enters by cross-attention (attn2).
    hidden_states arrive packed [B, N, C] with the latent num_frames / height / width as arguments."""

    family = "ltx_video"
    model_classes = ("LTXVideoTransformer3DModel",)
    mirrors = ("models/transformers/transformer_ltx.py::LTXVideoAttnProcessor", "0.42.1")
    text_dim_key = "caption_channels"
    timestep_index = 2

    def attention_layers(self, model):
        return [(f"transformer_blocks.{i}.attn1", b.attn1) for i, b in enumerate(model.transformer_blocks)]

    def latent_grid(self, model, args, kwargs):
        f, h, w = (_arg(args, kwargs, n, i) for n, i in (("num_frames", 4), ("height", 5), ("width", 6)))
        if f is None or h is None or w is None:
            raise ValueError("ltx_video: the transformer call needs num_frames, height and width")
        pt, ph, pw = self.patch_sizes(model.config)
        return int(f) // pt, int(h) // ph, int(w) // pw

    def stock_processor(self, attn):
        from diffusers.models.transformers.transformer_ltx import LTXVideoAttnProcessor

        return LTXVideoAttnProcessor()

    def sparse_forward(self, attn, attend, hidden_states, encoder_hidden_states=None, attention_mask=None,
                       image_rotary_emb=None, **kwargs):
        # Mirrors LTXVideoAttnProcessor for self-attention.
        from diffusers.models.transformers.transformer_ltx import apply_rotary_emb

        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("sparse LTX-Video attention handles self-attention without an attention mask only")
        query = attn.norm_q(attn.to_q(hidden_states))
        key = attn.norm_k(attn.to_k(hidden_states))
        value = attn.to_v(hidden_states)
        heads = attn.heads
        query = query.unflatten(2, (heads, -1))
        key = key.unflatten(2, (heads, -1))
        value = value.unflatten(2, (heads, -1))
        # The stock processor rotates [B, N, H * D] before splitting the heads: the same rotation per
        # head (pairs never straddle heads, D is even), applied by attention. LTX pads the angle list
        # at its front by inner_dim % 6 entries (cos 1, sin 0); an odd pad would shift the pairs.
        rotary = None
        if image_rotary_emb is not None:
            def rotate(x):
                return apply_rotary_emb(x.flatten(2, 3), image_rotary_emb).unflatten(2, (heads, -1))

            if image_rotary_emb[0].shape[-1] % 6 % 2:
                query, key = rotate(query), rotate(key)
            else:
                cos, sin = pair_tables(*image_rotary_emb, lambda c, s: (c[..., 0::2].unflatten(-1, (heads, -1)),
                                                                       s[..., 0::2].unflatten(-1, (heads, -1))))
                rotary = Rotary(rotate, cos, sin)
        out = attend_rotated(attend, query, key, value, rotary).flatten(2, 3).to(query.dtype)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


# ---------------------------------------------------------------------------- Mochi
class MochiAdapter(ModelAdapter):
    """Joint attention over video and (after it) the valid prompt tokens. MochiAttention has no
    ``set_processor``: :func:`sparse_vdit.apply` sets its ``processor`` attribute."""

    family = "mochi"
    model_classes = ("MochiTransformer3DModel",)
    mirrors = ("models/attention_processor.py::MochiAttnProcessor2_0", "0.42.1")
    text_position = "after"
    timestep_index = 2

    def attention_layers(self, model):
        return [(f"transformer_blocks.{i}.attn1", b.attn1) for i, b in enumerate(model.transformer_blocks)]

    def processor_modules(self, model):
        return self.attention_layers(model)

    def text_len(self, model, args, kwargs):
        enc = _arg(args, kwargs, "encoder_hidden_states", 1)
        return int(enc.shape[1])

    def stock_processor(self, attn):
        from diffusers.models.attention_processor import MochiAttnProcessor2_0

        return MochiAttnProcessor2_0()

    def sparse_forward(self, attn, attend, hidden_states, encoder_hidden_states=None, attention_mask=None,
                       image_rotary_emb=None, **kwargs):
        # Mirrors MochiAttnProcessor2_0. The stock processor drops padded prompt tokens and pads the
        # output with zeros; here they stay in place, are never keys, and their output rows are zeroed.
        def heads(x):
            return x.unflatten(2, (attn.heads, -1))

        query, key, value = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        eq = heads(attn.add_q_proj(encoder_hidden_states))
        ek = heads(attn.add_k_proj(encoder_hidden_states))
        ev = heads(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            eq = attn.norm_added_q(eq)
        if attn.norm_added_k is not None:
            ek = attn.norm_added_k(ek)
        n_video = query.shape[1]
        rotary = None
        if image_rotary_emb is not None:  # the video tokens (first in the joint sequence), applied by attention
            def rotate(x):
                return torch.cat([_mochi_rotary(x[:, :n_video], *image_rotary_emb), x[:, n_video:]], dim=1)

            cos, sin = pair_tables(*image_rotary_emb, lambda c, s: (c[None], s[None]))  # [1, N, H, D / 2]
            rotary = Rotary(rotate, cos, sin)
        text_valid = attention_mask.bool()  # [B, T]
        if not torch.compiler.is_compiling() and not bool((text_valid.int().diff(dim=1) <= 0).all()):
            raise ValueError("Mochi prompt masks must mark a prefix of the prompt tokens as valid")
        key_valid = torch.cat([text_valid.new_ones(text_valid.shape[0], n_video), text_valid], dim=1)
        out = attend_rotated(attend, torch.cat([query, eq], 1), torch.cat([key, ek], 1), torch.cat([value, ev], 1),
                             rotary, key_valid=key_valid)
        out = out.masked_fill(~key_valid[:, :, None, None], 0.0).flatten(2, 3)
        out, enc_out = out.split_with_sizes((n_video, out.shape[1] - n_video), dim=1)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if hasattr(attn, "to_add_out"):
            enc_out = attn.to_add_out(enc_out)
        return out, enc_out


def key_valid_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """bool [B, N] from a key mask [B, 1, 1, N] (or [B, N]): True where a key may be attended,
    whether the mask is boolean (True = keep) or additive (0 = keep, a large negative = drop)."""
    flat = attention_mask.reshape(attention_mask.shape[0], -1)
    return flat if flat.dtype == torch.bool else flat > torch.finfo(flat.dtype).min / 2


def _mochi_rotary(x, freqs_cos, freqs_sin):
    x_even = x[..., 0::2].float()
    x_odd = x[..., 1::2].float()
    cos = (x_even * freqs_cos - x_odd * freqs_sin).to(x.dtype)
    sin = (x_even * freqs_sin + x_odd * freqs_cos).to(x.dtype)
    return torch.stack([cos, sin], dim=-1).flatten(-2)


ADAPTERS: list[ModelAdapter] = [WanAdapter(), HunyuanVideoAdapter(), CogVideoXAdapter(), LTXVideoAdapter(), MochiAdapter()]


def adapter_for(model) -> ModelAdapter:
    for a in ADAPTERS:
        if a.matches(model):
            return a
    supported = [c for a in ADAPTERS for c in a.model_classes]
    raise ValueError(f"{type(model).__name__} is not a supported transformer; supported: {supported}")


def attention_shape(model) -> tuple[int, int]:
    """(sparse-eligible attention layers, heads per layer) of a supported transformer."""
    layers = adapter_for(model).attention_layers(model)
    return len(layers), int(layers[0][1].heads)


def check_plan(plan, model) -> None:
    """Raise ValueError if ``plan`` does not fit ``model`` (class, layers, heads, structural config);
    warn on other config differences."""
    from ..plan import model_fingerprint

    layers, heads = attention_shape(model)
    plan.check_fits(model_fingerprint(model), layers, heads)
