"""``SparseAttnProcessor``: one diffusers attention processor for every layer of a transformer.

A forward pre-hook on the transformer learns, per call, the latent grid (hence the
:class:`VideoLayout`) and the denoising step (from timestep changes: a repeated timestep is the
same step, e.g. the unconditional half of CFG; a larger one starts a new generation). It then
resolves, for every attention module, what this forward does there, into a small slot on the
module: the layer's :class:`BlockSparseMask` and token order when the layer runs sparse, nothing when
it runs dense. The processor call only reads that slot, so it holds no per-layer Python state:
one instance serves every layer, and ``torch.compile`` of a block sees tensors, not layer numbers.
"""
from __future__ import annotations

import json
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from ..masks import VideoLayout, build
from ..ops import BlockSparseMask, block_sparse_attention, default_backend
from ..plan import SparsityPlan
from .adapters import ModelAdapter, adapter_for

_SLOT = "_sparse_vdit_slot"


@dataclass(eq=False)
class _Slot:
    """Per attention module: its stock processor, and what the current forward does there."""

    stock: Any
    adapter: ModelAdapter
    layer: int | None  # plan layer, None for attention the plan does not cover (cross-attention)
    mask: BlockSparseMask | None = None  # set per forward; None = run the stock processor
    order: torch.Tensor | None = None
    seq_len: int = 0


@dataclass(eq=False)
class _Binding:
    """What the processor knows about one transformer it serves."""

    adapter: ModelAdapter
    slots: list[_Slot]
    hook: Any = None
    layout: VideoLayout | None = None
    step: int = 0
    last_t: float | None = None
    scheduler: Any = None  # a pipeline's scheduler, to know the number of steps
    warned_first_forward: bool = False
    stats: dict[str, int] = field(default_factory=lambda: {"sparse": 0, "dense": 0})


class SparseAttnProcessor:
    """Drop-in processor: ``transformer.set_attn_processor(SparseAttnProcessor(plan))``.

    Args:
        plan: the :class:`SparsityPlan` for this transformer.
        backend: attention backend for sparse layers (default: Triton on CUDA, torch on CPU).
    """

    def __init__(self, plan: SparsityPlan, backend: str | None = None):
        if not isinstance(plan, SparsityPlan):
            raise TypeError(f"plan must be a SparsityPlan, got {type(plan).__name__}")
        self.plan = plan
        self.backend = backend
        self.num_inference_steps: int | None = None
        self._bindings: dict[int, _Binding] = {}  # id(transformer) -> binding
        self._mask_cache: dict[tuple, BlockSparseMask] = {}
        self._layer_keys = [json.dumps(plan.layer_specs(i), sort_keys=True) for i in range(plan.num_layers)]
        self._layer_dense = [plan.layer_is_dense(i) for i in range(plan.num_layers)]
        self._global_hook = torch.nn.modules.module.register_module_forward_pre_hook(self._discover)

    # ------------------------------------------------------------------ binding to a transformer
    def bind(self, transformer, scheduler=None) -> None:
        """Attach to ``transformer``: check the plan fits, give each attention module its slot and
        install the pre-hook. Done by :func:`sparse_vdit.apply`, or during the first forward after
        ``set_attn_processor``."""
        key = id(transformer)
        if key in self._bindings:
            if scheduler is not None:
                self._bindings[key].scheduler = scheduler
            return
        adapter = adapter_for(transformer)
        self.plan.check_model(transformer)
        layer_of = {id(m): i for i, (_, m) in enumerate(adapter.attention_layers(transformer))}
        slots = []
        for _, m in adapter.processor_modules(transformer):
            # The processor in place now is the stock one, unless this processor already replaced it.
            current = getattr(m, "processor", None)
            stock = current if current is not None and not isinstance(current, SparseAttnProcessor) \
                else adapter.stock_processor(m)
            slot = _Slot(stock=stock, adapter=adapter, layer=layer_of.get(id(m)))
            object.__setattr__(m, _SLOT, slot)  # a plain attribute, not a submodule
            slots.append(slot)
        binding = _Binding(adapter, slots, scheduler=scheduler)
        ref = weakref.ref(self)

        def pre_hook(module, args, kwargs):
            proc = ref()
            if proc is not None:
                proc._on_forward(binding, module, args, kwargs)

        binding.hook = transformer.register_forward_pre_hook(pre_hook, with_kwargs=True)
        self._bindings[key] = binding
        self._drop_global_hook()

    def unbind(self, transformer) -> None:
        binding = self._bindings.pop(id(transformer), None)
        if binding is None:
            return
        if binding.hook is not None:
            binding.hook.remove()
        for _, m in binding.adapter.processor_modules(transformer):
            if hasattr(m, _SLOT):
                object.__delattr__(m, _SLOT)

    def _drop_global_hook(self):
        if self._global_hook is not None:
            self._global_hook.remove()
            self._global_hook = None

    def _discover(self, module, args):
        # Global pre-hook, live only until a transformer using this processor runs: it lets the plain
        # `set_attn_processor(SparseAttnProcessor(plan))` work without sv.apply.
        try:
            adapter = adapter_for(module)
        except ValueError:
            return None
        layers = adapter.attention_layers(module)
        if layers and getattr(layers[0][1], "processor", None) is self:
            # A global hook sees no keyword arguments (pipelines pass them all by keyword), so this
            # forward's grid is unknown: it runs dense, later forwards follow the plan.
            self.bind(module)
            self._warn_first_forward_dense(self._bindings[id(module)])
        return None

    def __del__(self):
        try:
            self._drop_global_hook()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    @property
    def layout(self) -> VideoLayout | None:
        """The video layout of the most recent forward (of the transformer bound last), or None."""
        for binding in reversed(list(self._bindings.values())):
            return binding.layout
        return None

    def set_num_inference_steps(self, n: int) -> None:
        """Tell the processor the schedule length (needed for a fractional ``dense_steps``)."""
        self.num_inference_steps = int(n)

    def reset(self) -> None:
        """Start counting denoising steps from 0 again."""
        for b in self._bindings.values():
            b.step, b.last_t = 0, None

    # ------------------------------------------------------------------ per forward (outside compiled code)
    def _on_forward(self, binding: _Binding, model, args, kwargs):
        frames, height, width = binding.adapter.latent_grid(model, args, kwargs)
        text_len = binding.adapter.text_len(model, args, kwargs)
        layout = VideoLayout(frames, height, width, self.plan.tile, text_len=text_len,
                             text_position=binding.adapter.text_position)
        if binding.layout != layout:
            binding.layout = layout
        t = binding.adapter.timestep(args, kwargs)
        if t is not None:
            t = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)
            if binding.last_t is None or t > binding.last_t:
                binding.step = 0  # a new generation (timesteps run downwards)
            elif t < binding.last_t:
                binding.step += 1
            binding.last_t = t
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        device = hidden.device if isinstance(hidden, torch.Tensor) else torch.device("cpu")
        warm_up = binding.step < self.plan.dense_step_count(self._num_steps(binding))
        order = binding.layout.token_order(device)
        for slot in binding.slots:
            sparse = slot.layer is not None and not warm_up and not self._layer_dense[slot.layer]
            slot.mask = self.mask_for(slot.layer, binding.layout, device) if sparse else None
            slot.order = order if sparse else None
            slot.seq_len = binding.layout.seq_len
            if slot.layer is not None:
                binding.stats["sparse" if sparse else "dense"] += 1

    def _warn_first_forward_dense(self, binding: _Binding) -> None:
        for slot in binding.slots:
            slot.mask = None
        if binding.warned_first_forward or all(self._layer_dense):
            return
        binding.warned_first_forward = True
        try:
            warm_up = self.plan.dense_step_count(self._num_steps(binding)) > 0
        except ValueError:
            warm_up = False
        if not warm_up:
            warnings.warn(
                "SparseAttnProcessor bound to the transformer during its first forward, which therefore ran "
                "dense; later forwards follow the plan. Use sparse_vdit.apply(pipe, plan) to bind up front.",
                stacklevel=3,
            )

    def _num_steps(self, binding: _Binding) -> int | None:
        if self.num_inference_steps is not None:
            return self.num_inference_steps
        sched = binding.scheduler
        if sched is not None and getattr(sched, "timesteps", None) is not None:
            return len(sched.timesteps)
        return None

    def mask_for(self, layer: int, layout: VideoLayout, device) -> BlockSparseMask:
        """The layer's BlockSparseMask on ``layout`` (built once per layout and spec set, then cached)."""
        key = (self._layer_keys[layer], layout, str(device))
        mask = self._mask_cache.get(key)
        if mask is None:
            specs = self.plan.layer_specs(layer)
            # One spec for every head: a single head row that the kernel broadcasts (stride 0).
            mask = build(specs[0] if all(s == specs[0] for s in specs) else specs, layout, device=device)
            self._mask_cache[key] = mask
        return mask

    # ------------------------------------------------------------------ the processor call
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None, *args, rotary_emb=None, **kwargs):
        # The parameters are named because diffusers' Attention drops keyword arguments a processor's
        # signature does not list. Every supported stock processor takes (attn, hidden_states,
        # encoder_hidden_states, attention_mask, <rotary embedding>), the last named rotary_emb
        # (Wan) or image_rotary_emb (the others): both are passed on positionally.
        rotary = rotary_emb if rotary_emb is not None else image_rotary_emb
        call_args = (hidden_states, encoder_hidden_states, attention_mask, rotary, *args)
        slot = getattr(attn, _SLOT, None)
        if slot is None:
            raise RuntimeError(
                "SparseAttnProcessor is not bound to this model: it binds on the transformer's first "
                "forward (or call sparse_vdit.apply(pipe, plan))"
            )
        return self._run(attn, slot, call_args, kwargs)

    def _run(self, attn, slot: _Slot, call_args: tuple, kwargs: dict):
        """The stock processor where this forward runs dense, else the family's sparse forward."""
        if slot.mask is None:
            return slot.stock(attn, *call_args, **kwargs)
        hidden_states = call_args[0]
        mask, order, seq_len = slot.mask, slot.order, slot.seq_len
        backend = self.backend or default_backend(hidden_states.device)

        def attend(q, k, v, key_valid=None):
            if q.shape[1] != seq_len:
                raise ValueError(f"attention sequence has {q.shape[1]} tokens but the latent grid gives {seq_len}")
            return _attend(q, k, v, mask, order, backend, key_valid)

        return slot.adapter.sparse_forward(attn, attend, *call_args, **kwargs)


def _attend(q, k, v, mask, order, backend, key_valid=None):
    """Block-sparse attention on [B, N, H, D] tensors in model order (views, no copies).

    ``key_valid`` (bool [B, N]) marks keys that may be attended: each batch element then gets a key
    order of its own that leaves the others out (no data-dependent branch, so it compiles).
    """
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if key_valid is None:
        o = block_sparse_attention(qh, kh, vh, mask, token_order=order, backend=backend, check=False)
        return o.transpose(1, 2)
    outs = []
    for b in range(q.shape[0]):
        kv_order = key_order(order, key_valid[b])
        outs.append(block_sparse_attention(qh[b:b + 1], kh[b:b + 1], vh[b:b + 1], mask, token_order=order,
                                           kv_token_order=kv_order, backend=backend, check=False))
    return torch.cat(outs).transpose(1, 2)


def key_order(order: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """``order`` with the tokens that ``key_valid`` (bool [N], model order) rules out set to -1."""
    return torch.where((order >= 0) & key_valid[order.clamp(min=0).long()], order, torch.full_like(order, -1))
