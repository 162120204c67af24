"""``SparseAttnProcessor``: one diffusers attention processor for every layer of a transformer.

A forward pre-hook on the transformer learns, per call, the latent grid (hence the
:class:`VideoLayout`) and the denoising step (from timestep changes: a repeated timestep is the
same step, e.g. the unconditional half of CFG; a larger one starts a new generation). The
processor looks up its attention module's layer, asks the plan for that layer's specs, and either
runs the stock processor (dense layer / dense step / attention it does not handle, such as
cross-attention) or the family's forward with block-sparse attention in the core.
"""
from __future__ import annotations

import json
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from ..masks import VideoLayout, build
from ..ops import block_sparse_attention, default_backend
from ..plan import SparsityPlan
from .adapters import ModelAdapter, adapter_for


@dataclass
class _Binding:
    """What the processor knows about one transformer it serves."""

    adapter: ModelAdapter
    layer_of: dict[int, int]  # id(attention module) -> plan layer
    stock: dict[int, Any]  # id(attention module) -> stock processor for that module
    hook: Any = None
    layout: VideoLayout | None = None
    step: int = 0
    last_t: float | None = None
    scheduler: Any = None  # a pipeline's scheduler, to know the number of steps
    calls: int = 0
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
        self._module_binding: dict[int, _Binding] = {}  # id(attention module) -> binding
        self._mask_cache: dict[tuple, Any] = {}
        self._layer_keys = [json.dumps(plan.layer_specs(i), sort_keys=True) for i in range(plan.num_layers)]
        self._layer_dense = [plan.layer_is_dense(i) for i in range(plan.num_layers)]
        self._global_hook = torch.nn.modules.module.register_module_forward_pre_hook(self._discover)

    # ------------------------------------------------------------------ binding to a transformer
    def bind(self, transformer, scheduler=None) -> None:
        """Attach to ``transformer``: check the plan fits, map its attention modules to plan layers
        and install the pre-hook. Done by :func:`sparse_vdit.apply`, or on the first forward after
        ``set_attn_processor``."""
        key = id(transformer)
        if key in self._bindings:
            if scheduler is not None:
                self._bindings[key].scheduler = scheduler
            return
        adapter = adapter_for(transformer)
        self.plan.check_model(transformer)
        layers = adapter.attention_layers(transformer)
        # The processors in place now are the stock ones, unless this processor already replaced them.
        stock = {id(m): m.processor for _, m in adapter.processor_modules(transformer)
                 if getattr(m, "processor", None) is not None and not isinstance(m.processor, SparseAttnProcessor)}
        binding = _Binding(adapter, {id(m): i for i, (_, m) in enumerate(layers)}, stock, scheduler=scheduler)
        ref = weakref.ref(self)

        def pre_hook(module, args, kwargs):
            proc = ref()
            if proc is not None:
                proc._on_forward(binding, module, args, kwargs)

        binding.hook = transformer.register_forward_pre_hook(pre_hook, with_kwargs=True)
        self._bindings[key] = binding
        for _, m in adapter.processor_modules(transformer):
            self._module_binding[id(m)] = binding
        self._drop_global_hook()

    def unbind(self, transformer) -> None:
        binding = self._bindings.pop(id(transformer), None)
        if binding is not None and binding.hook is not None:
            binding.hook.remove()
        self._module_binding = {k: b for k, b in self._module_binding.items() if b is not binding}

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
            # forward's grid is unknown: it runs dense (see __call__), later ones follow the plan.
            self.bind(module)
            self._bindings[id(module)].layout = None
        return None

    def __del__(self):
        try:
            self._drop_global_hook()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def set_num_inference_steps(self, n: int) -> None:
        """Tell the processor the schedule length (needed for a fractional ``dense_steps``)."""
        self.num_inference_steps = int(n)

    def reset(self) -> None:
        """Start counting denoising steps from 0 again."""
        for b in self._bindings.values():
            b.step, b.last_t = 0, None

    # ------------------------------------------------------------------ per forward
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
        binding.calls += 1

    def _num_steps(self, binding: _Binding) -> int | None:
        if self.num_inference_steps is not None:
            return self.num_inference_steps
        sched = binding.scheduler
        if sched is not None and getattr(sched, "timesteps", None) is not None:
            return len(sched.timesteps)
        return None

    def mask_for(self, layer: int, layout: VideoLayout, device) -> Any:
        """The layer's BlockSparseMask on ``layout`` (built once, then cached)."""
        key = (self._layer_keys[layer], layout, str(device))
        mask = self._mask_cache.get(key)
        if mask is None:
            mask = build(self.plan.layer_specs(layer), layout, device=device)
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
        binding = self._module_binding.get(id(attn))
        if binding is None:
            raise RuntimeError(
                "SparseAttnProcessor is not bound to this model: it binds on the transformer's first "
                "forward (or call sparse_vdit.apply(pipe, plan))"
            )
        layer = binding.layer_of.get(id(attn))
        if layer is not None and binding.layout is None:
            self._warn_unbound_first_forward(binding)
            layer = None
        if layer is not None and not self._layer_dense_now(binding, layer):
            binding.stats["sparse"] += 1
            layout = binding.layout
            mask = self.mask_for(layer, layout, hidden_states.device)
            order = layout.token_order(hidden_states.device)
            backend = self.backend or default_backend(hidden_states.device)

            def attend(q, k, v, key_valid=None):
                if q.shape[1] != layout.seq_len:
                    raise ValueError(
                        f"attention sequence has {q.shape[1]} tokens but the latent grid gives {layout.seq_len} "
                        f"({layout.describe()})"
                    )
                return _attend(q, k, v, mask, order, backend, key_valid)

            return binding.adapter.sparse_forward(attn, attend, *call_args, **kwargs)
        binding.stats["dense"] += 1
        stock = binding.stock.get(id(attn))
        if stock is None:
            stock = binding.stock[id(attn)] = binding.adapter.stock_processor(attn)
        return stock(attn, *call_args, **kwargs)

    def _warn_unbound_first_forward(self, binding: _Binding) -> None:
        if binding.warned_first_forward:
            return
        binding.warned_first_forward = True
        try:
            warm_up = self.plan.dense_step_count(self._num_steps(binding)) > 0
        except ValueError:
            warm_up = False
        if not warm_up and not all(self._layer_dense):
            warnings.warn(
                "SparseAttnProcessor bound to the transformer during its first forward, which therefore ran "
                "dense; later forwards follow the plan. Use sparse_vdit.apply(pipe, plan) to bind up front.",
                stacklevel=3,
            )

    def _layer_dense_now(self, binding: _Binding, layer: int) -> bool:
        if self._layer_dense[layer]:
            return True
        return binding.step < self.plan.dense_step_count(self._num_steps(binding))


def _attend(q, k, v, mask, order, backend, key_valid=None):
    """Block-sparse attention on [B, N, H, D] tensors in model order (views, no copies).

    ``key_valid`` (bool [B, N]) marks keys that may be attended; each batch element whose keys are
    not all valid gets a key order of its own with the others left out.
    """
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if key_valid is None or bool(key_valid.all()):
        o = block_sparse_attention(qh, kh, vh, mask, token_order=order, backend=backend, check=False)
        return o.transpose(1, 2)
    outs = []
    real = order >= 0
    safe = order.clamp(min=0).long()
    for b in range(q.shape[0]):
        kv_order = torch.where(real & key_valid[b][safe], order, torch.full_like(order, -1))
        outs.append(block_sparse_attention(qh[b:b + 1], kh[b:b + 1], vh[b:b + 1], mask, token_order=order,
                                           kv_token_order=kv_order, backend=backend, check=False))
    return torch.cat(outs).transpose(1, 2)
