"""``sv.analyze``: the seed paper's three findings, measured on your own model.

The model runs dense. At sampled denoising steps each sparse-eligible attention call also measures,
from its own q, k and v and block by block (no N x N matrix is kept):

- **structure**: the block-level attention map folded by (frame distance, spatial distance) between
  query and key tiles, per head: a [H, frame distances, spatial distances] profile per prompt;
  across prompts, the cosine similarity of those profiles (the paper's cross-prompt consistency);
- **sparsity**: the output error when each query block keeps only its top fraction of key blocks by
  attention mass, for a ladder of fractions (the pruning-sensitivity curve);
- **sinks**: the share of attention the top 1% of key blocks receive, where they are (frame and
  spatial tile, or text), and the share the first text token alone receives;
- **temperature**: per head, the error of a fixed sparse mask when the logits are divided by a
  temperature T (0.8-1.2), against dense attention at T = 1, and which T minimizes it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..calibration.measure import head_errors, layer_attention_mass
from ..integration import (AttentionStrategy, LayerSlot, SparseAttnProcessor, adapter_for, apply, dense_plan,
                           eager_measurement, remove)
from ..masks import VideoLayout, build, normalize_spec
from ..ops import BlockSparseMask, default_backend, dense_attention, device_name, sparse_attention

FRACTIONS = (0.05, 0.1, 0.2, 0.3, 0.5)
TEMPERATURES = (0.8, 0.9, 1.0, 1.1, 1.2)


def distance_profile(mass: torch.Tensor, layout: VideoLayout, excess: bool = False) -> torch.Tensor:
    """float [H, Gt, Gs]: mean attention mass a video query block gives key blocks at tile frame
    distance dt (0..Gt-1) and Chebyshev spatial tile distance ds (0..Gs-1); ``mass`` [H, Mq, Mk].
    With ``excess``, minus what uniform attention would give there: the structure beyond chance, which
    cross-prompt similarity compares (uniform attention is alike across prompts but has no structure)."""
    coords = layout.tile_coords().to(mass.device)
    nv = layout.num_video_blocks
    d = (coords[:, None, :] - coords[None, :, :]).abs()
    dt, ds = d[..., 0], torch.maximum(d[..., 1], d[..., 2])
    gt, gh, gw = layout.tile_grid
    Gs = max(gh, gw)
    bins = (dt * Gs + ds).flatten()  # [nv * nv]
    video = mass[:, :nv, :nv].reshape(mass.shape[0], -1).float()
    out = torch.zeros(mass.shape[0], gt * Gs, device=mass.device)
    out.index_add_(1, bins, video)
    if excess:
        pairs = torch.zeros(gt * Gs, device=mass.device).index_add_(0, bins, torch.ones_like(bins, dtype=torch.float))
        out = out - pairs / mass.shape[-1]  # uniform attention gives each key block 1 / Mk
    return (out / nv).view(mass.shape[0], gt, Gs)


def topk_mask(mass: torch.Tensor, fraction: float, block_size: int) -> BlockSparseMask:
    """Per head and query block, the ``fraction`` of key blocks with the most mass (at least one)."""
    H, Mq, Mk = mass.shape
    k = max(1, math.ceil(fraction * Mk))
    idx = mass.topk(k, dim=-1).indices
    blocks = torch.zeros(H, Mq, Mk, dtype=torch.bool, device=mass.device)
    blocks.scatter_(-1, idx, True)
    return BlockSparseMask.from_dense(blocks, block_size)


@dataclass
class LayerAnalysis:
    """What one sampled call of one layer measured (JSON-able)."""

    layer: int
    step: int
    prompt: int
    profile: list  # [H][Gt][Gs] structure profile
    excess_profile: list  # [H][Gt][Gs] the same minus uniform attention's
    pruning_error: list  # [fraction][H]
    top1pct_share: list  # [H]
    top_keys: list  # [H] list of {"block": i, "frame": f or None, "tile": [t, h, w] or None, "text": bool}
    first_text_token_share: list | None  # [H]
    temperature_error: list  # [temperature][H]


class AnalysisAttention(AttentionStrategy):
    """Dense attention everywhere it is measured; records a :class:`LayerAnalysis` per call."""

    def __init__(self, sample_steps: set[int], fractions, temperatures, fixed_mask: dict, backend=None):
        self.sample_steps = sample_steps
        self.fractions = tuple(fractions)
        self.temperatures = tuple(temperatures)
        self.fixed_mask = fixed_mask
        self.backend = backend
        self.prompt = 0
        self.records: list[LayerAnalysis] = []
        self._fixed: dict = {}
        self.progress = None

    def on_forward(self, binding) -> None:
        if self.progress is not None:
            self.progress.set_postfix_str(f"step {binding.step + 1}", refresh=True)

    def runs(self, slot: LayerSlot) -> bool:
        return slot.layer is not None and slot.layout is not None and slot.step in self.sample_steps

    def attend(self, q, k, v, slot: LayerSlot, key_valid=None):
        o = dense_attention(q, k, v, key_valid=key_valid)
        with torch.no_grad():
            self._measure(slot, q, k, v, o, key_valid)
        return o

    def _measure(self, slot, q, k, v, o, key_valid):
        layout, device = slot.layout, q.device
        backend = self.backend or default_backend(device)
        H, D = q.shape[2], q.shape[3]
        order = layout.token_order(device)
        mass = layer_attention_mass(q, k, layout, key_valid, backend=backend)  # [H, Mq, Mk]
        masks = [topk_mask(mass, f, layout.block_size).for_token_order(layout.order_digest) for f in self.fractions]
        pruning = head_errors(q, k, v, o, masks, order, backend, key_valid)  # [F, H]
        received = mass.mean(dim=1)  # [H, Mk] share per key block
        n_top = max(1, int(received.shape[1] * 0.01))
        top = received.topk(n_top, dim=-1)
        share = top.values.sum(-1) / received.sum(-1).clamp(min=1e-12)
        coords = layout.tile_coords()
        frames = layout.frame_range_of_blocks()[:, 0]
        top_keys = [[_describe_block(int(b), layout, coords, frames) for b in top.indices[h].tolist()] for h in range(H)]
        first_text = None
        if layout.text_len:
            first_text = _token_share(q, k, layout.text_offset, key_valid).tolist()
        key = (layout, str(device), H)
        if key not in self._fixed:  # the same fixed mask for every layer and call on a layout
            self._fixed = {key: build(self.fixed_mask, layout, heads=H, device=device)}
        fixed = self._fixed[key]
        scale = D ** -0.5
        ref = o.float()
        ref_norm = ref.pow(2).sum(dim=(1, 3)).sqrt().clamp(min=1e-12)
        temp = []
        for T in self.temperatures:
            ot = sparse_attention(q, k, v, fixed, order, key_valid=key_valid, backend=backend, scale=scale / T).float()
            temp.append(((ot - ref).pow(2).sum(dim=(1, 3)).sqrt() / ref_norm).max(dim=0).values.tolist())
        self.records.append(LayerAnalysis(
            layer=slot.layer, step=slot.step, prompt=self.prompt,
            profile=distance_profile(mass, layout).cpu().tolist(),
            excess_profile=distance_profile(mass, layout, excess=True).cpu().tolist(), pruning_error=pruning.cpu().tolist(),
            top1pct_share=share.cpu().tolist(), top_keys=top_keys, first_text_token_share=first_text,
            temperature_error=temp,
        ))


def _describe_block(block: int, layout: VideoLayout, coords, frames) -> dict[str, Any]:
    if block < layout.num_video_blocks:
        return {"block": block, "frame": int(frames[block]), "tile": coords[block].tolist(), "text": False}
    first = (block - layout.num_video_blocks) * layout.block_size
    return {"block": block, "frame": None, "tile": None, "text": True, "text_tokens": [first, first + layout.block_size]}


def _token_share(q, k, token: int, key_valid) -> torch.Tensor:
    """float [H]: mean over queries of the attention probability key ``token`` receives."""
    qh, kh = q.transpose(1, 2).float(), k.transpose(1, 2).float()  # [B, H, N, D]
    scale = q.shape[-1] ** -0.5
    s = torch.einsum("bhnd,bhd->bhn", qh, kh[:, :, token]) * scale
    # The dense LSE per query, in chunks of keys, so no N x N matrix is held.
    lse = torch.full(s.shape, float("-inf"), device=q.device)
    for c0 in range(0, kh.shape[2], 4096):
        logits = torch.einsum("bhnd,bhmd->bhnm", qh, kh[:, :, c0:c0 + 4096]) * scale
        if key_valid is not None:
            logits = logits.masked_fill(~key_valid[:, None, None, c0:c0 + 4096], float("-inf"))
        lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=-1))
    return torch.exp(s - lse).mean(dim=(0, 2))


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    return float((a @ b) / (a.norm() * b.norm()).clamp(min=1e-12))


def summarize(records: Sequence[LayerAnalysis], num_layers: int, fractions, temperatures, budget: float,
              prune_fraction: float) -> dict[str, Any]:
    """Per layer: cross-prompt similarity, pruning curve, unprunable flag, sinks, temperature."""
    layers = []
    for layer in range(num_layers):
        rs = [r for r in records if r.layer == layer]
        if not rs:
            layers.append({"layer": layer, "measured": False})
            continue
        prompts = sorted({r.prompt for r in rs})
        profiles = {p: torch.tensor([r.profile for r in rs if r.prompt == p]).mean(0) for p in prompts}  # [H, Gt, Gs]
        excess = {p: torch.tensor([r.excess_profile for r in rs if r.prompt == p]).mean(0) for p in prompts}
        H = next(iter(profiles.values())).shape[0]
        pairs = [(a, b) for i, a in enumerate(prompts) for b in prompts[i + 1:]]
        per_head = [sum(_cosine(excess[a][h], excess[b][h]) for a, b in pairs) / len(pairs) if pairs else None
                    for h in range(H)]
        pruning = torch.tensor([r.pruning_error for r in rs]).amax(0)  # worst over prompts/steps: [F, H]
        curve = pruning.mean(1).tolist()
        at = min(range(len(fractions)), key=lambda i: abs(fractions[i] - prune_fraction))
        temp = torch.tensor([r.temperature_error for r in rs]).amax(0)  # [T, H]
        best_t = [temperatures[int(i)] for i in temp.argmin(0).tolist()]
        first_text = [r.first_text_token_share for r in rs if r.first_text_token_share is not None]
        layers.append({
            "layer": layer, "measured": True,
            "cross_prompt_similarity": sum(per_head) / H if pairs else None,
            "cross_prompt_similarity_per_head": per_head,
            "profile_mean": torch.stack(list(profiles.values())).mean(0).tolist(),
            "pruning_curve": dict(zip(map(str, fractions), curve)),
            "pruning_error_per_head": pruning.tolist(),
            "cannot_be_pruned": bool(pruning[at].max() > budget),
            "top1pct_share": float(torch.tensor([r.top1pct_share for r in rs]).mean()),
            "top_keys": rs[-1].top_keys,
            "first_text_token_share": float(torch.tensor(first_text).mean()) if first_text else None,
            "temperature_error": dict(zip(map(str, temperatures), temp.mean(1).tolist())),
            "temperature_error_per_head": temp.tolist(),
            "best_temperature_per_head": best_t,
            "temperature_helps": [bool(temp[:, h].min() < temp[temperatures.index(1.0), h] - 1e-6)
                                  for h in range(temp.shape[1])] if 1.0 in temperatures else None,
        })
    return {"layers": layers, "fractions": list(fractions), "temperatures": list(temperatures), "budget": budget,
            "prune_fraction": prune_fraction}


def analyze(
    pipe_or_transformer,
    *,
    run: Callable[[Any, int], Any] | None = None,
    num_prompts: int | None = None,
    prompts: Sequence[str] | None = None,
    prompt_embeds: Sequence[torch.Tensor] | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    num_inference_steps: int = 50,
    sample_steps: Sequence[float] = (0.2, 0.5, 0.8),
    tile: tuple[int, int, int] = (1, 8, 8),
    fractions: Sequence[float] = FRACTIONS,
    temperatures: Sequence[float] = TEMPERATURES,
    fixed_mask: str | dict = "sliding_tile",
    budget: float = 0.05,
    prune_fraction: float = 0.2,
    out: str | None = None,
    progress: bool = True,
    seed: int = 0,
    backend: str | None = None,
    **pipe_kwargs,
) -> dict[str, Any]:
    """Measure structure, sparsity, sinks and temperature for a pipeline (or a transformer with
    ``run(target, prompt_index)`` and ``num_prompts``). Returns the report dict; with ``out`` also
    writes ``analysis.json`` and the pictures there (see :func:`save_analysis`).

    ``budget`` marks layers whose pruning error at ``prune_fraction`` of key blocks exceeds it;
    ``fixed_mask`` is the mask the temperature sweep is measured on.
    """
    from tqdm.auto import tqdm

    from ..calibration import calibration_prompts, pipeline_runner, sample_step_indices

    target = pipe_or_transformer
    transformer = getattr(target, "transformer", target)
    adapter_for(transformer)
    if not 0 < budget < 1:
        raise ValueError(f"budget must lie in (0, 1), got {budget}")
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise ValueError(f"fractions must lie in (0, 1], got {list(fractions)}")
    if not temperatures or any(t <= 0 for t in temperatures):
        raise ValueError(f"temperatures must be > 0, got {list(temperatures)}")
    fixed_mask = normalize_spec(fixed_mask)
    if run is None:
        if not hasattr(target, "transformer"):
            raise ValueError("a bare transformer needs run=callable(transformer, prompt_index) and num_prompts")
        items = calibration_prompts(target, transformer, prompts, prompt_embeds)

        run = pipeline_runner(items, prompt_embeds is not None, negative_prompt_embeds, num_inference_steps, seed,
                              pipe_kwargs)
        num_prompts = len(items)
    elif not num_prompts or num_prompts < 1:
        raise ValueError("with run=..., give num_prompts >= 1")
    steps = sample_step_indices(num_inference_steps, sample_steps)
    strategy = AnalysisAttention(set(steps), fractions, temperatures, fixed_mask, backend)
    previous = next((m.processor for _, m in adapter_for(transformer).processor_modules(transformer)
                     if isinstance(m.processor, SparseAttnProcessor)), None)
    proc = apply(transformer, dense_plan(transformer, tile=tile), backend=backend, attention=strategy)
    if getattr(target, "scheduler", None) is not None:
        proc.bind(transformer, scheduler=target.scheduler)
    try:
        bar = tqdm(range(num_prompts), desc="analyzing", disable=not progress, unit="prompt")
        strategy.progress = bar if progress else None
        for i in bar:
            proc.reset()
            strategy.prompt = i
            with eager_measurement():  # compiled blocks run eagerly while measured
                run(target, i)
        layout = proc.layout
    finally:
        remove(transformer)
        if previous is not None:
            apply(transformer, previous.plan, backend=previous.backend, attention=previous.attention)
    num_layers = len(adapter_for(transformer).attention_layers(transformer))
    report = summarize(strategy.records, num_layers, tuple(fractions), tuple(temperatures), budget, prune_fraction)
    if layout is not None:
        report["uniform_top1pct_share"] = max(1, int(layout.num_blocks * 0.01)) / layout.num_blocks
    device = next(transformer.parameters()).device
    report.update({"model": type(transformer).__name__, "device": device_name(device), "torch": torch.__version__,
                   "prompts": num_prompts, "sampled_steps": steps,
                   "layout": layout.describe() if layout else None, "fixed_mask": fixed_mask,
                   "tile": list(tile)})
    if out is not None:
        from .report import save_analysis

        report["files"] = [str(p) for p in save_analysis(report, out)]
    return report
