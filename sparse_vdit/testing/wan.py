"""Tiny diffusers models with random weights, for the demo, tests and calibration dry runs (no download).

Random weights have no attention structure, so :func:`plant_local_attention` plants it: in a Wan
layer, q and k become one constant vector per head (zero weights, shared bias) whose RoPE
rotation makes the logit depend on the 3D distance between tokens only; scaling the q/k RMSNorm
weights sharpens it (x4: about +-1 frame, +-1-2 tokens wide). All heads of a layer are planted
together because Wan's q/k RMSNorm runs over all heads at once.
"""
from __future__ import annotations

import torch

TINY_WAN_CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=16, out_channels=16,
    text_dim=64, freq_dim=64, ffn_dim=256, num_layers=4, cross_attn_norm=True, rope_max_seq_len=1024,
)


def tiny_wan_transformer(num_layers: int = 4, seed: int = 0, **overrides):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    cfg = {**TINY_WAN_CONFIG, "num_layers": num_layers, **overrides}
    return WanTransformer3DModel(**cfg).eval()


def _rope_pair_entries(head_dim: int) -> list[int]:
    """First entry of the second frequency pair in each of Wan's three RoPE axis sections (t, h, w).

    Wan splits head_dim into t: head_dim - 4*(head_dim//6), h and w: 2*(head_dim//6) each. For
    head_dim 32 this gives entries 2, 14 and 24, whose angles stay under pi across a small grid.
    """
    h_dim = 2 * (head_dim // 6)
    t_dim = head_dim - 2 * h_dim
    return [2, t_dim + 2, t_dim + h_dim + 2]


@torch.no_grad()
def plant_local_attention(transformer, layers, sharpness: float = 4.0, amplitude: float = 1.0) -> None:
    """Make every head of the given Wan self-attention layers attend locally in 3D (see module doc)."""
    heads = transformer.config.num_attention_heads
    head_dim = transformer.config.attention_head_dim
    entries = _rope_pair_entries(head_dim)
    for i in layers:
        attn = transformer.blocks[i].attn1
        bias = torch.zeros(heads, head_dim)
        bias[:, entries] = amplitude
        for lin in (attn.to_q, attn.to_k):
            lin.weight.zero_()
            lin.bias.copy_(bias.flatten())
        for norm in (attn.norm_q, attn.norm_k):
            norm.weight.fill_(sharpness)


def tiny_wan_pipeline(planted_layers=(0, 1, 2), sharpness: float = 4.0, seed: int = 0, text_encoder: bool = False):
    """A whole WanPipeline with a tiny transformer and VAE (random weights; structure planted in
    ``planted_layers``, the other layers stay global). Call it with ``prompt_embeds``, or with text
    prompts when ``text_encoder`` (a tiny tokenizer and UMT5 encoder, see :mod:`.text`)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    transformer = tiny_wan_transformer(seed=seed)
    plant_local_attention(transformer, planted_layers, sharpness=sharpness)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0)
    tokenizer = encoder = None
    if text_encoder:
        from .text import tiny_text_encoder, tiny_tokenizer

        tokenizer, encoder = tiny_tokenizer(), tiny_text_encoder(transformer.config.text_dim, seed=seed + 2)
    return WanPipeline(tokenizer=tokenizer, text_encoder=encoder, transformer=transformer, vae=vae, scheduler=scheduler)


@torch.no_grad()
def plant_sink_frame(transformer, layer: int, hidden_states, timestep, encoder_hidden_states, frame: int = 0,
                     strength: float = 0.15, query_weight: float = 4.0) -> None:
    """Make one planted-local Wan layer sink-dominated: every query also attends to the keys of
    ``frame`` (as late layers do with the first frame), on inputs like ``hidden_states``, whose
    ``frame`` must stand out (e.g. a latent offset, as an I2V conditioning frame does).

    The keys get a component along the direction that separates that frame's tokens at the layer's
    input, in an entry of each head whose RoPE angle barely moves (the slowest temporal pair), so
    the extra logit is the same for every query; queries get a constant in that entry.
    """
    attn = transformer.blocks[layer].attn1
    captured = {}
    handle = attn.register_forward_pre_hook(lambda mod, args: captured.setdefault("h", args[0].detach()))
    try:
        transformer(hidden_states, timestep, encoder_hidden_states)
    finally:
        handle.remove()
    pt, ph, pw = transformer.config.patch_size
    _, _, f, h, w = hidden_states.shape
    per_frame = (h // ph) * (w // pw)
    tokens = captured["h"][0].float()  # [N, dim]
    inside = torch.zeros(tokens.shape[0], dtype=torch.bool)
    inside[frame * per_frame:(frame + 1) * per_frame] = True
    direction = tokens[inside].mean(0) - tokens[~inside].mean(0)
    direction = direction / direction.norm()
    baseline = float((tokens[~inside] @ direction).mean())
    heads = transformer.config.num_attention_heads
    head_dim = transformer.config.attention_head_dim
    slow = head_dim - 4 * (head_dim // 6) - 2  # first entry of the slowest temporal RoPE pair
    for i in range(heads):
        attn.to_k.weight[i * head_dim + slow] = strength * direction
        attn.to_k.bias[i * head_dim + slow] = -strength * baseline
        attn.to_q.bias[i * head_dim + slow] = query_weight


def planted_sink_transformer(num_layers: int = 2, sink_layer: int = 1, seed: int = 0):
    """(transformer, hidden_states, encoder_hidden_states): a tiny Wan whose layers up to ``sink_layer``
    attend locally (sharpness 8) and whose ``sink_layer`` also attends to a first-frame sink, with the
    inputs the sink was planted on (a distinctive first frame, as an I2V conditioning frame is)."""
    m = tiny_wan_transformer(num_layers=num_layers, seed=seed)
    plant_local_attention(m, list(range(sink_layer + 1)), sharpness=8.0)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 6, 24, 24, generator=g)
    x[:, :, 0] += 3.0
    e = torch.randn(1, 10, 64, generator=g)
    plant_sink_frame(m, sink_layer, x, torch.tensor([999.0]), e, frame=0)
    return m, x, e
