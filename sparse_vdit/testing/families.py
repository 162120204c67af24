"""Tiny random-weight transformers of each supported family and matching forward inputs (tests,
calibration dry runs). ``make(family)`` returns (model, call) where ``call(model, batch=..., t=...)``
runs one forward on small inputs and returns the main output tensor."""
from __future__ import annotations

import torch


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _text_mask(B, T, valid):
    m = torch.zeros(B, T, dtype=torch.bool)
    for b, n in enumerate(valid[:B]):
        m[b, :n] = True
    return m


def make(family: str, seed: int = 0):
    """(model, call) for ``family`` in wan, hunyuan_video, cogvideox, ltx_video, mochi."""
    torch.manual_seed(seed)
    if family == "wan":
        from .wan import tiny_wan_transformer

        model = tiny_wan_transformer(num_layers=2, seed=seed)

        def call(m, batch=2, t=900, grid=(3, 8, 8), seed=0):
            g = _gen(seed)
            f, h, w = grid
            x = torch.randn(batch, 16, f, 2 * h, 2 * w, generator=g)
            e = torch.randn(batch, 10, 64, generator=g)
            return m(x, torch.full((batch,), t), e).sample

    elif family == "hunyuan_video":
        from diffusers import HunyuanVideoTransformer3DModel

        model = HunyuanVideoTransformer3DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
            num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16,
            pooled_projection_dim=8, rope_axes_dim=(4, 6, 6),
        ).eval()

        def call(m, batch=2, t=900, grid=(3, 8, 8), seed=0, text=12, valid=(12, 7)):
            g = _gen(seed)
            f, h, w = grid
            x = torch.randn(batch, 4, f, h, w, generator=g)
            e = torch.randn(batch, text, 16, generator=g)
            return m(x, torch.full((batch,), t), e, _text_mask(batch, text, valid), torch.randn(batch, 8, generator=g),
                     guidance=torch.full((batch,), 3500.0)).sample

    elif family == "cogvideox":
        from diffusers import CogVideoXTransformer3DModel

        model = CogVideoXTransformer3DModel(
            num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
            text_embed_dim=16, num_layers=2, sample_width=16, sample_height=16, sample_frames=9, patch_size=2,
            temporal_compression_ratio=4, max_text_seq_length=10,
        ).eval()

        def call(m, batch=2, t=900, grid=(3, 8, 8), seed=0):
            g = _gen(seed)
            f, h, w = grid
            x = torch.randn(batch, f, 4, 2 * h, 2 * w, generator=g)
            e = torch.randn(batch, 10, 16, generator=g)
            # The pipeline computes the 3D RoPE; any (cos, sin) of shape [video tokens, head_dim] will do.
            angles = torch.rand(f * h * w, 16, generator=g) * 6.28
            return m(x, e, torch.full((batch,), t), image_rotary_emb=(angles.cos(), angles.sin())).sample

    elif family == "ltx_video":
        from diffusers import LTXVideoTransformer3DModel

        model = LTXVideoTransformer3DModel(
            in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
            attention_head_dim=16, cross_attention_dim=32, num_layers=2, caption_channels=16,
        ).eval()

        def call(m, batch=2, t=900, grid=(3, 8, 8), seed=0):
            g = _gen(seed)
            f, h, w = grid
            x = torch.randn(batch, f * h * w, 8, generator=g)
            e = torch.randn(batch, 10, 16, generator=g)
            return m(x, e, torch.full((batch,), t), torch.ones(batch, 10, dtype=torch.bool),
                     num_frames=f, height=h, width=w, rope_interpolation_scale=(1.0, 1.0, 1.0)).sample

    elif family == "mochi":
        from diffusers import MochiTransformer3DModel

        model = MochiTransformer3DModel(
            patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=2, pooled_projection_dim=16,
            in_channels=4, out_channels=None, qk_norm="rms_norm", text_embed_dim=32, time_embed_dim=4,
            activation_fn="swiglu", max_sequence_length=16,
        ).eval()

        def call(m, batch=2, t=900, grid=(3, 8, 8), seed=0, text=12, valid=(12, 5)):
            g = _gen(seed)
            f, h, w = grid
            x = torch.randn(batch, 4, f, 2 * h, 2 * w, generator=g)
            e = torch.randn(batch, text, 32, generator=g)
            return m(x, e, torch.full((batch,), t), _text_mask(batch, text, valid)).sample

    else:
        raise ValueError(f"unknown family {family!r}; valid: wan, hunyuan_video, cogvideox, ltx_video, mochi")
    return model, call


FAMILIES = ("wan", "hunyuan_video", "cogvideox", "ltx_video", "mochi")


def runner(family: str, steps: int = 4, seed: int = 0):
    """(model, run) for a tiny family: ``run(model, i)`` runs ``steps`` denoising-like transformer calls
    (timesteps 999 down to 50) on input ``i``, as calibration and analysis dry runs need."""
    model, call = make(family, seed=seed)
    timesteps = torch.linspace(999, 50, steps).tolist()

    def run(m, i):
        with torch.no_grad():
            for t in timesteps:
                out = call(m, batch=1, t=t, seed=i)
        return out

    return model, run
