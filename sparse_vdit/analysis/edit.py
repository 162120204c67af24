"""Attention-map transfer editing (the seed paper's Structure finding as a tool).

The source and target prompts are generated together in one batch from the same noise. In the chosen
layers and steps the target takes the source's attention probabilities: its output there is
``softmax(Q_src K_src^T) V_tgt``, computed as one flash-attention call with the source's q and k and
the target's v (nothing N x N is stored, and the source's q and k live only inside that call). With
a sparse plan the same mask serves both halves.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch

from ..integration import (AttentionStrategy, LayerSlot, SparseAttention, adapter_for, apply, dense_plan,
                           eager_measurement, grouped_attention, remove, text_queries)
from ..ops import default_backend, dense_attention
from ..plan import SparsityPlan


def _selection(value, name: str) -> set[int] | None:
    if value is None or value == "all":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return {value}
    try:
        items = {int(x) for x in value}
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be 'all' or a list of ints, got {value!r}") from None
    return items


class TransferAttention(AttentionStrategy):
    """Batch = [source, target] halves. In selected (layer, step) calls the target half attends with
    the source's q and k (and, for ``heads``, only those heads; the others keep their own). Elsewhere
    the plan's own strategy runs (sparse where the plan says so)."""

    def __init__(self, layers=None, steps=None, heads=None, backend: str | None = None):
        self.layers = _selection(layers, "layers")
        self.steps = _selection(steps, "steps")
        self.heads = sorted(_selection(heads, "heads")) if heads is not None and heads != "all" else None
        self.backend = backend
        self.inner = SparseAttention(backend)
        self.transferred_calls = 0

    def selected(self, slot: LayerSlot) -> bool:
        return (slot.layer is not None and slot.layout is not None
                and (self.layers is None or slot.layer in self.layers)
                and (self.steps is None or slot.step in self.steps))

    def runs(self, slot: LayerSlot) -> bool:
        return self.selected(slot) or self.inner.runs(slot)

    def attend(self, q, k, v, slot: LayerSlot, key_valid=None):
        if not self.selected(slot):
            return self.inner.attend(q, k, v, slot, key_valid)
        B = q.shape[0]
        if B % 2:
            raise ValueError(f"attention transfer needs a batch of [source, target] halves, got batch {B}")
        s = B // 2
        q_t, k_t = q[s:], k[s:]
        if self.heads is not None:  # only these heads take the source's map; the others keep the target's
            idx = torch.tensor(self.heads, device=q.device)
            q_t, k_t = q_t.clone(), k_t.clone()
            q_t[:, :, idx], k_t[:, :, idx] = q[:s][:, :, idx], k[:s][:, :, idx]
        else:
            q_t, k_t = q[:s], k[:s]
        qq, kk = torch.cat([q[:s], q_t]), torch.cat([k[:s], k_t])
        kv = None if key_valid is None else torch.cat([key_valid[:s], key_valid[:s] if self.heads is None else key_valid[s:]])
        self.transferred_calls += 1
        if slot.groups is not None:
            return grouped_attention(qq, kk, v, slot.groups, slot.token_order, kv,
                                     self.backend or default_backend(q.device), text_queries(slot.layout))
        return dense_attention(qq, kk, v, key_valid=kv)


def transfer(
    pipe,
    source_prompt: str | None = None,
    target_prompt: str | None = None,
    *,
    source_embeds: torch.Tensor | None = None,
    target_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    layers: Iterable[int] | str | None = "all",
    transfer_steps: Iterable[int] | str | None = "all",
    heads: Iterable[int] | str | None = "all",
    plan: SparsityPlan | None = None,
    seed: int = 0,
    backend: str | None = None,
    **pipe_kwargs,
) -> Any:
    """Generate ``source`` and ``target`` together; in ``layers`` x ``transfer_steps`` (``"all"``, or lists
    of plan-layer / denoising-step indices; ``None`` or ``[]`` for none) the target takes the
    source's self-attention maps (for ``heads``, default all). ``plan`` applies a sparse plan
    (the same masks serve both halves). Give text prompts, or ``source_embeds`` / ``target_embeds``
    ([1, tokens, width]) for a pipeline without a text encoder. Returns the pipeline's output for the
    batch [source, target] (e.g. ``.frames[0]`` is the source video, ``.frames[1]`` the target).
    """
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        raise ValueError("transfer needs a diffusers pipeline (with a .transformer)")
    adapter_for(transformer)
    if "steps" in pipe_kwargs:
        raise TypeError("transfer(): the denoising steps where attention transfers are transfer_steps=...; "
                        "the number of denoising steps is num_inference_steps=...")
    layers = [] if layers is None else layers
    transfer_steps = [] if transfer_steps is None else transfer_steps
    strategy = TransferAttention(layers, transfer_steps, heads, backend)
    kw = dict(pipe_kwargs)
    if source_embeds is not None or target_embeds is not None:
        if source_embeds is None or target_embeds is None or source_prompt or target_prompt:
            raise ValueError("give source_prompt and target_prompt, or source_embeds and target_embeds")
        if source_embeds.shape != target_embeds.shape:
            raise ValueError(f"source_embeds {tuple(source_embeds.shape)} and target_embeds "
                             f"{tuple(target_embeds.shape)} must have the same shape")
        kw["prompt_embeds"] = torch.cat([source_embeds, target_embeds])
        if negative_prompt_embeds is not None:
            kw["negative_prompt_embeds"] = torch.cat([negative_prompt_embeds] * 2)
        else:
            kw.setdefault("guidance_scale", 1.0)
    else:
        if not isinstance(source_prompt, str) or not isinstance(target_prompt, str):
            raise TypeError("source_prompt and target_prompt must be strings")
        kw["prompt"] = [source_prompt, target_prompt]
    # The same starting noise for both halves: per-sample generators with one seed.
    kw["generator"] = [torch.Generator(device="cpu").manual_seed(seed) for _ in range(2)]
    plan = plan if plan is not None else dense_plan(transformer, tile=(1, 8, 8))
    apply(pipe, plan, backend=backend, attention=strategy)
    try:
        with torch.no_grad(), eager_measurement():  # the transfer strategy runs eagerly under compiled blocks
            out = pipe(**kw)
    finally:
        remove(pipe)
    return out
