"""``SparseAttnProcessor``: one diffusers attention processor for every layer of a transformer.

A forward pre-hook on the transformer learns, per call, the latent grid (hence the
:class:`VideoLayout`) and the denoising step (from timestep changes: a repeated timestep is the
same step, e.g. the unconditional half of CFG; a larger one starts a new generation). It then
resolves, for every attention module, what this forward does there, into a small :class:`LayerSlot`
on the module: the layer's head groups and token order when the layer runs sparse, nothing when it
runs dense. A head group is the heads of one mask spec and that spec's one-row mask, which every
layer using the spec shares (a plan holds few distinct specs, so masks cost per spec, not per layer
and head); dense heads of a mixed layer form a group without a mask (SDPA). The processor call only reads that slot, so it holds no per-layer Python
state: one instance serves every layer, and ``torch.compile`` of a block sees tensors, not layer
numbers.

What the attention core computes where the family's q/k/v path runs is an
:class:`AttentionStrategy`: :class:`SparseAttention` by default; calibration and analysis pass their
own (dense attention that also measures) instead of subclassing the processor.
"""
from __future__ import annotations

import copy
import inspect
import json
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from ..masks import DynamicSelection, VideoLayout, block_matrix, build, is_dynamic, spec_layout, without_temperature
from ..ops import (BlockSparseMask, default_backend, dense_attention, freeze, sparse_attention, sparse_attention_tiled,
                   tiled_keys)
from ..ops.attention import tiled_kernel_rows
from ..plan import SparsityPlan
from .adapters import ModelAdapter, adapter_for, check_plan
from .parallel import Ulysses, heads_to_sequence, sequence_to_heads, ulysses_of

_SLOT = "_sparse_vdit_slot"
_PROC = "_sparse_vdit_processor"  # on a bound transformer: a _ProcessorRef to the processor serving it


class _ProcessorRef:
    """A transformer's weak reference to the processor serving it, which ``copy.deepcopy`` follows:
    the copy of a transformer refers to the copy of its processor, never to the original's."""

    __slots__ = ("ref",)

    def __init__(self, proc=None):
        self.ref = weakref.ref(proc) if proc is not None else (lambda: None)

    def __call__(self):
        return self.ref()

    def __deepcopy__(self, memo):
        proc = self.ref()
        return _ProcessorRef(copy.deepcopy(proc, memo) if proc is not None else None)


def _pre_hook(module, args, kwargs):
    """The transformer's forward pre-hook: a plain function (nothing of one processor or one model in
    it), so a deep copy of the transformer runs it for the copy's own processor."""
    ref = module.__dict__.get(_PROC)
    proc = ref() if ref is not None else None
    if proc is None:
        return
    if torch.compiler.is_compiling():  # binding cannot happen inside a trace
        binding = proc._bindings.get(id(module))
        if binding is None or binding.model() is not module:
            raise RuntimeError("this transformer's SparseAttnProcessor is not bound to it yet (a deep copy, or a "
                               "processor set by hand): call sparse_vdit.apply(model, plan) or run one forward "
                               "before compiling it")
    else:
        binding = proc._binding_for(module)
    proc._on_forward(binding, module, args, kwargs)


_LIVE: "weakref.WeakValueDictionary[int, Any]" = weakref.WeakValueDictionary()  # id -> processor


@torch.compiler.assume_constant_result
def _resolve(proc_id: int, binding_id: int, frames: int, height: int, width: int, text_len: int, device: str,
             warm_up: bool) -> tuple:
    """Run at trace time, eagerly: build what a compiled forward needs (kept by the processor, in
    ``_compiled``) and return its key."""
    key = (binding_id, frames, height, width, text_len, device, warm_up)
    proc = _LIVE[proc_id]
    if key not in proc._compiled:
        binding = next(b for b in proc._bindings.values() if id(b) == binding_id)
        proc._compiled[key] = proc._resolve_eager(binding, frames, height, width, text_len, device, warm_up)
    return key


def _watch_scheduler(scheduler, proc, binding) -> None:
    """Have ``scheduler.step`` / ``set_timesteps`` tell ``proc`` of each step of ``binding`` (for a
    compiled transformer; eager forwards count steps from the timestep themselves). One wrapper per
    scheduler, any number of watchers (Wan 2.2's two transformers share one scheduler)."""
    watchers = scheduler.__dict__.get("_sparse_vdit_watchers")
    if watchers is None:
        watchers = scheduler.__dict__["_sparse_vdit_watchers"] = []
        step, set_timesteps = scheduler.step, scheduler.set_timesteps

        def notify(new_generation: bool) -> None:
            for proc_ref, binding_ref in list(watchers):
                p, b = proc_ref(), binding_ref()
                if p is not None and b is not None:
                    p._compiled_step(b, new_generation)

        def watched_step(*args, **kwargs):
            out = step(*args, **kwargs)
            notify(False)
            return out

        def watched_set_timesteps(*args, **kwargs):
            out = set_timesteps(*args, **kwargs)
            notify(True)
            return out
        scheduler.step, scheduler.set_timesteps = watched_step, watched_set_timesteps
    if not any(b() is binding for _, b in watchers):
        watchers.append((weakref.ref(proc), weakref.ref(binding)))


def _has_pre_hook(module) -> bool:
    return any(h is _pre_hook for h in module._forward_pre_hooks.values())


def _drop_pre_hook(module) -> None:
    for key, h in list(module._forward_pre_hooks.items()):
        if h is _pre_hook:
            del module._forward_pre_hooks[key]
            module._forward_pre_hooks_with_kwargs.pop(key, None)
MAX_CACHED_LAYOUTS = 4  # masks are kept for this many (layout, device) pairs, least recently used dropped


@dataclass(frozen=True, eq=False)
class HeadGroup:
    """Heads of a layer that share one spec: ``mask`` is a one-row (broadcast) mask shared by every
    layer with that spec's blocks, None for dense heads; ``heads`` the head indices (None: every head);
    ``token_order`` the order of the spec's layout when it is not the slot's (a spec's ``order``);
    ``temperature`` the spec's (folded into the softmax scale, so it costs nothing); ``select`` a
    ``masks.DynamicSelection`` that makes the group's mask per call from its q and k (``mask`` None)."""

    mask: BlockSparseMask | None
    heads: torch.Tensor | None
    token_order: torch.Tensor | None = None
    temperature: float = 1.0  # the spec's softmax temperature: logits scaled by D ** -0.5 / temperature
    select: Any = None
    # int32 [H]: with ``mask`` a stack of the layer's patterns, the pattern row of each head (one
    # group for a whole layer that mixes specs: the kernel reads q, k, v once and launches once)
    head_map: torch.Tensor | None = None
    # float32 [H]: 1 / each head's temperature, where the heads of one group differ in it (``temperature`` is then 1)
    head_factor: torch.Tensor | None = None


def fuses_rotary(groups, backend, q) -> bool:
    """Whether :func:`grouped_attention` rotates q and k itself (one pass that writes k in tiled order):
    one group for the whole layer with a static mask, on the tiled Triton kernel (``triton``, or
    ``auto`` on CUDA where the tiled kernel runs these blocks, as ``auto`` does for head maps)."""
    if not (len(groups) == 1 and groups[0].heads is None and groups[0].mask is not None and groups[0].select is None):
        return False
    if backend == "auto" and q.device.type == "cuda":
        from ..ops.attention import unsupported

        m = groups[0].mask
        return unsupported("triton", q.dtype, q.shape[-1], m.q_block, m.kv_block, "cuda") is None
    return backend == "triton"


def grouped_attention(q, k, v, groups, token_order, key_valid=None, backend=None, text=None,
                      dense=dense_attention, rotary=None) -> torch.Tensor:
    """Attention of ``[B, N, H, D]`` q/k/v, each head group with its mask (dense groups: ``dense``,
    ``dense(q, k, v, key_valid=...)``, default SDPA).

    ``text = (start, length)``: the text queries there attend every key (dense, all heads at
    once); the groups' masks then leave those query rows empty, which keeps every mask row as short
    as its longest video row. A group's ``temperature`` applies to its heads' video queries (the text
    queries run at temperature 1).

    ``rotary``: q and k are given unrotated, and this (an adapter's :class:`Rotary`) rotates them:
    where :func:`fuses_rotary`, k is rotated and written in tiled order in one pass, v copied into
    it, and the kernel and the text rows read those; elsewhere by the stock processor's rotation."""
    if rotary is not None:
        if fuses_rotary(groups, backend, q):
            return _fused_rotary_attention(q, k, v, groups[0], token_order, key_valid, text, dense, rotary)
        q, k = rotary.apply(q), rotary.apply(k)

    def run(g, qq, kk, vv):
        scale = None if g.temperature == 1.0 else qq.shape[-1] ** -0.5 / g.temperature
        if g.mask is None and g.select is None:
            return dense(qq, kk, vv, key_valid=key_valid) if scale is None else \
                dense(qq, kk, vv, key_valid=key_valid, scale=scale)
        order = token_order if g.token_order is None else g.token_order
        mask = g.mask if g.select is None else g.select(qq, kk, key_valid=key_valid, scale=scale)
        return sparse_attention(qq, kk, vv, mask, order, key_valid=key_valid, backend=backend, scale=scale,
                                head_map=g.head_map, head_factor=g.head_factor)

    if len(groups) == 1 and groups[0].heads is None:
        out = run(groups[0], q, k, v)
    else:
        out = torch.empty_like(q)
        for g in groups:
            out[:, :, g.heads] = run(g, q[:, :, g.heads], k[:, :, g.heads], v[:, :, g.heads])
    return _with_text_rows(out, q, k, v, text, dense, key_valid)


def _with_text_rows(out, q, k, v, text, dense, key_valid):
    """``out`` with the text query rows ``text = (start, length)`` attending every key densely (k, v
    and ``key_valid`` in any one order of the keys: attention does not depend on it)."""
    if text is None or not text[1]:
        return out
    a, n = text
    o_text = dense(q[:, a:a + n], k, v, key_valid=key_valid)
    if torch.is_grad_enabled() and (out.requires_grad or o_text.requires_grad):
        return torch.cat([out[:, :a], o_text, out[:, a + n:]], dim=1)  # not in place: autograd keeps out
    out[:, a:a + n] = o_text  # inference: the text rows go into the output, no second copy of it
    return out


def _fused_rotary_attention(q, k, v, g, token_order, key_valid, text, dense, rotary):
    """One group, the tiled kernel: q rotated in model order, k rotated into tiled order (one pass
    each), v copied into tiled order; the text query rows attend the same tiled keys densely."""
    from ..ops import rope

    scale = None if g.temperature == 1.0 else q.shape[-1] ** -0.5 / g.temperature
    order = token_order if g.token_order is None else g.token_order
    tables = (rotary.cos, rotary.sin, rotary.start)
    kt, vt, valid = tiled_keys(q, k, v, g.mask, order, key_valid=key_valid, rotary=tables)
    q = rope(q, *tables)
    out = sparse_attention_tiled(q, kt, vt, g.mask, order, key_valid=key_valid, scale=scale, head_map=g.head_map,
                                 head_factor=g.head_factor)
    return _with_text_rows(out, q, kt.transpose(1, 2), vt.transpose(1, 2), text, dense, valid.expand(q.shape[0], -1))


def diffusers_dense(backend):
    """Dense attention on ``[B, N, H, D]`` through diffusers' own dispatch with ``backend`` (None: its
    active backend), as the stock processors of Wan, HunyuanVideo and LTX-Video run it."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    def dense(q, k, v, key_valid=None, scale=None):
        mask = None if key_valid is None else key_valid[:, None, None, :]
        return dispatch_attention_fn(q, k, v, attn_mask=mask, scale=scale, backend=backend)
    return dense


def text_queries(layout: VideoLayout) -> tuple[int, int] | None:
    """(start, length) of the text queries of ``layout`` in model order, None without text."""
    return (layout.text_offset, layout.text_len) if layout.text_len else None


@dataclass(eq=False)
class LayerSlot:
    """Per attention module: its stock processor, and what the current forward does there.

    ``layer`` is the plan layer (None for attention the plan does not cover, e.g. cross-attention);
    ``groups`` and ``token_order`` are set per forward (None: the plan runs this layer dense now);
    ``layout`` and ``step`` are the current forward's.
    """

    stock: Any
    adapter: ModelAdapter
    layer: int | None
    owner: Any = None  # the processor that made this slot
    dense: Any = dense_attention  # dense attention as the stock processor runs it (set per forward)
    groups: tuple[HeadGroup, ...] | None = None
    token_order: torch.Tensor | None = None
    layout: VideoLayout | None = None
    step: int = 0
    # Under diffusers' context parallelism (Ulysses): this rank's group, else None.
    ulysses: Ulysses | None = None


@dataclass(eq=False)
class Binding:
    """What a processor knows about one transformer it serves (read it through ``processor.binding()``)."""

    adapter: ModelAdapter
    slots: list[LayerSlot]
    model: Any = None  # weakref.ref to the transformer
    layout: VideoLayout | None = None
    step: int = 0
    last_t: float | None = None
    scheduler: Any = None  # a pipeline's scheduler, to know the number of steps
    warned_first_forward: bool = False
    warm_up: bool = True  # the phase of the current step (a compiled forward reads it)
    compiled: bool = False  # a compiled forward ran: the scheduler then advances the step
    stats: dict[str, int] = field(default_factory=lambda: {"sparse": 0, "dense": 0})


class AttentionStrategy:
    """What the attention core computes where a family's q/k/v path runs.

    ``runs(slot)`` decides, per attention call, whether the family's path runs with this strategy's
    ``attend`` (else the stock processor runs); ``attend(q, k, v, slot, key_valid)`` gets
    ``[B, N, H, D]`` tensors and returns the output in that layout; ``on_forward(binding)`` is told
    of each transformer forward after the slots are resolved. A strategy whose ``takes_rotary`` is
    True gets q and k unrotated with ``rotary=`` the adapter's :class:`Rotary` (to fuse the rotation);
    the others get them rotated by the stock processor's computation.
    """

    takes_rotary = False

    def runs(self, slot: LayerSlot) -> bool:
        raise NotImplementedError

    def attend(self, q, k, v, slot: LayerSlot, key_valid=None) -> torch.Tensor:
        raise NotImplementedError

    def on_forward(self, binding: Binding) -> None:
        return None


class SparseAttention(AttentionStrategy):
    """The default strategy: block-sparse attention with the slot's mask where the plan is sparse."""

    takes_rotary = True

    def __init__(self, backend: str | None = None):
        self.backend = backend

    def runs(self, slot: LayerSlot) -> bool:
        return slot.groups is not None

    def attend(self, q, k, v, slot: LayerSlot, key_valid=None, rotary=None) -> torch.Tensor:
        local = slot.layout.seq_len // slot.ulysses.degree if slot.ulysses is not None else slot.layout.seq_len
        if q.shape[1] != local:
            lay = slot.layout
            text = f" + {lay.text_len} text tokens" if lay.text_len else ""
            per_rank = f" / {slot.ulysses.degree} Ulysses ranks" if slot.ulysses is not None else ""
            raise ValueError(
                f"attention sequence has {q.shape[1]} tokens but the latent grid {lay.frames}x{lay.height}x{lay.width} "
                f"(frames x height x width after patchify, read from the transformer's inputs){text}{per_rank} gives "
                f"{local}: the {type(slot.adapter).__name__} adapter reads a grid this model does not use")
        backend = self.backend or default_backend(q.device)
        if slot.ulysses is not None:  # tokens split over ranks: all tokens of this rank's heads, then back
            if rotary is not None:  # (the tables are this rank's tokens')
                q, k = rotary.apply(q), rotary.apply(k)
            u, heads = slot.ulysses, q.shape[2]
            qh, kh, vh = (sequence_to_heads(x, u) for x in (q, k, v))
            kv = None if key_valid is None else key_valid  # the full sequence's keys (replicated inputs)
            o = grouped_attention(qh, kh, vh, slot.groups, slot.token_order, kv, backend, text_queries(slot.layout),
                                  slot.dense)
            return heads_to_sequence(o, u, heads)
        return grouped_attention(q, k, v, slot.groups, slot.token_order, key_valid, backend, text_queries(slot.layout),
                                 slot.dense, rotary)


class SparseAttnProcessor:
    """Drop-in processor: ``transformer.set_attn_processor(SparseAttnProcessor(plan))``.

    Args:
        plan: the :class:`SparsityPlan` for this transformer.
        backend: attention backend for sparse layers (default: Triton on CUDA, torch on CPU).
        attention: an :class:`AttentionStrategy` instead of :class:`SparseAttention` (calibration
            and analysis measure through this).
    """

    _parallel_config = None  # set by diffusers' enable_parallelism; the hook reads the transformer's own

    def __init__(self, plan: SparsityPlan, backend: str | None = None, attention: AttentionStrategy | None = None):
        if not isinstance(plan, SparsityPlan):
            raise TypeError(f"plan must be a SparsityPlan, got {type(plan).__name__}")
        if attention is not None and not isinstance(attention, AttentionStrategy):
            raise TypeError(f"attention must be an AttentionStrategy, got {type(attention).__name__}")
        self.plan = plan
        self.backend = backend
        self.attention = attention if attention is not None else SparseAttention(backend)
        self.num_inference_steps: int | None = None
        self._bindings: dict[int, Binding] = {}  # id(transformer) -> binding
        # What compiled forwards read, per (binding, grid, device, phase): built at trace time by _resolve.
        self._compiled: dict[tuple, dict] = {}
        _LIVE[id(self)] = self
        # (layout, device) -> {spec or layer key -> mask / head groups}, least recently used first
        self._mask_cache: OrderedDict[tuple, dict[str, Any]] = OrderedDict()
        self._layer_keys = [json.dumps(plan.layer_specs(i), sort_keys=True) for i in range(plan.num_layers)]
        self._layer_dense = [plan.layer_is_dense(i) for i in range(plan.num_layers)]
        # Per layer, its heads grouped by spec (decided once, read every forward): [(spec key, heads)].
        self._head_groups = []
        for i in range(plan.num_layers):
            by_spec: dict[str, list[int]] = {}
            for h, spec in enumerate(plan.layer_specs(i)):
                by_spec.setdefault(json.dumps(spec, sort_keys=True), []).append(h)
            self._head_groups.append(list(by_spec.items()))

    # ------------------------------------------------------------------ diffusers' attention backend
    @property
    def _attention_backend(self):
        """The model's attention backend (diffusers' ``set_attention_backend`` sets it, and
        ``reset_attention_backend`` clears it, on every processor that has this attribute): the stock
        processors this one wraps run with it, and so do the dense heads and text rows of sparse
        layers where the stock processor dispatches through diffusers. None: diffusers' active one."""
        return self.__dict__.get("_user_attention_backend")

    @_attention_backend.setter
    def _attention_backend(self, backend) -> None:
        self.__dict__["_user_attention_backend"] = backend
        for binding in self._bindings.values():
            self._share_backend(binding.slots)

    def _share_backend(self, slots) -> None:
        backend = self._attention_backend
        dispatched = diffusers_dense(backend)
        for slot in slots:
            if hasattr(slot.stock, "_attention_backend"):
                slot.stock._attention_backend = backend
                slot.dense = dispatched
            else:  # this family's stock processor calls SDPA itself (CogVideoX, Mochi)
                slot.dense = dense_attention

    # ------------------------------------------------------------------ binding to a transformer
    def bind(self, transformer, scheduler=None) -> Binding:
        """Attach to ``transformer``: check the plan fits, give each attention module its slot and
        install the pre-hook. Done by :func:`sparse_vdit.apply`, or by the first attention call after
        ``set_attn_processor``."""
        key = id(transformer)
        binding = self._bindings.get(key)
        if binding is not None and binding.model() is transformer:
            if scheduler is not None:
                binding.scheduler = scheduler
                _watch_scheduler(scheduler, self, binding)
            return binding
        adapter = adapter_for(transformer)
        check_plan(self.plan, transformer)
        layer_of = {id(m): i for i, (_, m) in enumerate(adapter.attention_layers(transformer))}
        slots = []
        for _, m in adapter.processor_modules(transformer):
            # The processor in place now is the stock one, unless this processor already replaced it
            # (then the stock one is the slot's, which a deep copy of a bound model carries).
            current = getattr(m, "processor", None)
            old = getattr(m, _SLOT, None)
            if current is not None and not isinstance(current, SparseAttnProcessor):
                stock = current
            else:
                stock = old.stock if old is not None else adapter.stock_processor(m)
            slot = LayerSlot(stock=stock, adapter=adapter, layer=layer_of.get(id(m)), owner=self)
            object.__setattr__(m, _SLOT, slot)  # a plain attribute, not a submodule
            slots.append(slot)
        if self._attention_backend is None:  # set_attention_backend before apply: the stock ones carry it
            self.__dict__["_user_attention_backend"] = next(
                (s.stock._attention_backend for s in slots if getattr(s.stock, "_attention_backend", None) is not None),
                None)
        self._share_backend(slots)
        binding = Binding(adapter, slots, model=weakref.ref(transformer), scheduler=scheduler)
        binding.warm_up = self._warm_up(binding)
        if scheduler is not None:
            _watch_scheduler(scheduler, self, binding)
        # The transformer refers to its processor weakly (the hook must not keep it alive), through
        # an attribute that deep copies follow; one hook per transformer, whichever processor serves it.
        object.__setattr__(transformer, _PROC, _ProcessorRef(self))
        if not _has_pre_hook(transformer):
            transformer.register_forward_pre_hook(_pre_hook, with_kwargs=True)
        self._bindings[key] = binding
        return binding

    def _warm_up(self, binding: Binding) -> bool:
        """Whether ``binding.step`` is a dense warm-up step (a fraction of unknown steps: yes if any)."""
        try:
            return binding.step < self.plan.dense_step_count(self._num_steps(binding))
        except ValueError:
            return bool(self.plan.dense_steps)

    def _compiled_step(self, binding: Binding, new_generation: bool) -> None:
        """The step count of a compiled transformer, which its traced pre-hook cannot keep: advanced
        by the bound scheduler's ``step`` and reset by its ``set_timesteps`` (outside the graph)."""
        if not binding.compiled:
            if new_generation:  # eager forwards count steps themselves; a compiled one may come next
                step, binding.step = binding.step, 0
                binding.warm_up = self._warm_up(binding)
                binding.step = step
            return
        binding.step = 0 if new_generation else binding.step + 1
        binding.warm_up = self._warm_up(binding)  # a guard of the compiled graph: it recompiles once per phase

    def _binding_for(self, transformer) -> Binding:
        """The binding of ``transformer``; a model this processor does not know yet (a deep copy of
        a bound one) is bound now."""
        binding = self._bindings.get(id(transformer))
        if binding is None or binding.model() is not transformer:
            self._bindings.pop(id(transformer), None)
            binding = self.bind(transformer)
        return binding

    def __deepcopy__(self, memo):
        """A copy serves the copied model only: same plan, backend and strategy (copied), no
        bindings (the copy binds to the copied transformer on its first forward)."""
        new = SparseAttnProcessor.__new__(SparseAttnProcessor)
        memo[id(self)] = new
        for name, value in self.__dict__.items():
            if name in ("_bindings", "_mask_cache", "_compiled"):
                value = type(value)()
            else:
                value = copy.deepcopy(value, memo)
            new.__dict__[name] = value
        _LIVE[id(new)] = new
        return new

    def unbind(self, transformer) -> None:
        binding = self._bindings.pop(id(transformer), None)
        ref = transformer.__dict__.get(_PROC)
        if ref is not None and ref() is self:
            object.__delattr__(transformer, _PROC)
            _drop_pre_hook(transformer)
        if binding is None:
            return
        for _, m in binding.adapter.processor_modules(transformer):
            if hasattr(m, _SLOT):
                object.__delattr__(m, _SLOT)

    def _bind_from_call(self, attn) -> LayerSlot:
        """The first attention call of a processor set with ``set_attn_processor``: find the
        transformer whose forward is running (up the call stack), bind to it, and run this forward
        dense (its grid was not seen by the pre-hook)."""
        frame = inspect.currentframe()
        transformer = scheduler = None
        while frame is not None:
            obj = frame.f_locals.get("self")
            if transformer is None:
                if isinstance(obj, torch.nn.Module) and obj is not attn and any(m is attn for m in obj.modules()):
                    try:
                        adapter_for(obj)
                        transformer = obj
                    except ValueError:
                        pass
            elif any(getattr(obj, n, None) is transformer for n in ("transformer", "transformer_2")):
                scheduler = getattr(obj, "scheduler", None)  # the pipeline running it: its schedule length
                break
            frame = frame.f_back
        del frame
        if transformer is None:
            raise RuntimeError(
                "SparseAttnProcessor is not bound to a model: call sparse_vdit.apply(pipe, plan), or run the "
                "transformer (its first forward binds a processor set with set_attn_processor)"
            )
        binding = self.bind(transformer, scheduler=scheduler)
        self._warn_first_forward_dense(binding)
        return getattr(attn, _SLOT)

    @property
    def bindings(self) -> tuple[Binding, ...]:
        """The transformers this processor serves, as :class:`Binding` records."""
        return tuple(self._bindings.values())

    def binding(self, transformer=None) -> Binding:
        """The :class:`Binding` for ``transformer`` (default: the one bound last)."""
        if transformer is not None:
            binding = self._bindings.get(id(transformer))
            if binding is None or binding.model() is not transformer:
                raise ValueError(f"this processor is not bound to that {type(transformer).__name__}")
            return binding
        if not self._bindings:
            raise ValueError("this processor is not bound to any transformer yet")
        return next(reversed(self._bindings.values()))

    @property
    def layout(self) -> VideoLayout | None:
        """The video layout of the most recent forward (of the transformer bound last), or None."""
        return self.binding().layout if self._bindings else None

    def cached_layouts(self) -> list[VideoLayout]:
        """The layouts whose masks are cached now (at most ``MAX_CACHED_LAYOUTS`` per device)."""
        return [layout for layout, _ in self._mask_cache]

    def set_num_inference_steps(self, n: int) -> None:
        """Tell the processor the schedule length (needed for a fractional ``dense_steps``)."""
        self.num_inference_steps = int(n)

    def reset(self) -> None:
        """Start counting denoising steps from 0 again."""
        for b in self._bindings.values():
            b.step, b.last_t = 0, None

    # ------------------------------------------------------------------ per forward (outside compiled code)
    def _on_forward_compiled(self, binding: Binding, model, args, kwargs):
        """The pre-hook under torch.compile: only shape reads and attribute writes are traced; the
        layout, masks and head groups are resolved eagerly at trace time (``_resolve``, a constant
        for Dynamo), keyed by the grid and the phase. The step does not advance from the timestep
        here (its value is not known while tracing); the phase is the one of ``binding.step``."""
        if getattr(model, "_parallel_config", None) is not None:
            raise RuntimeError("whole-model torch.compile with diffusers' context parallelism is not supported by "
                               "sparse_vdit yet: compile the transformer blocks instead (compile_repeated_blocks)")
        frames, height, width = binding.adapter.latent_grid(model, args, kwargs)
        text_len = binding.adapter.text_len(model, args, kwargs)
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        device = str(hidden.device) if isinstance(hidden, torch.Tensor) else "cpu"
        # Branch on the phase (not only pass it on): Dynamo then guards on it, one graph per phase.
        warm_up = True if binding.warm_up else False
        key = _resolve(id(self), id(binding), int(frames), int(height), int(width), int(text_len), device, warm_up)
        state = self._compiled[key]
        binding.layout = state["layout"]
        binding.compiled = True
        for slot, groups in zip(binding.slots, state["groups"]):
            slot.groups = groups
            slot.token_order = state["order"]
            slot.layout = state["layout"]
        # (binding.stats are not counted here: a traced int would be a guard, a recompile per call)

    def _resolve_eager(self, binding: Binding, frames, height, width, text_len, device, warm_up) -> dict:
        layout = self._layout(binding, frames, height, width, text_len)
        device = torch.device(device)
        groups = [self._slot_groups(slot, layout, device, warm_up, None) for slot in binding.slots]
        return {"layout": layout, "order": layout.token_order(device), "groups": groups}

    def _layout(self, binding: Binding, frames, height, width, text_len) -> VideoLayout:
        return VideoLayout(frames, height, width, **self.plan.layout_options(), text_len=text_len,
                           text_position=binding.adapter.text_position)

    def _slot_groups(self, slot: LayerSlot, layout: VideoLayout, device, warm_up: bool, ulysses):
        """The head groups ``slot`` runs in a forward, None where it runs dense (warm-up, a dense
        layer, attention the plan does not cover)."""
        if slot.layer is None or warm_up or self._layer_dense[slot.layer]:
            return None
        if ulysses is None:
            return self.head_groups(slot.layer, layout, device)
        return self.head_groups(slot.layer, layout, device, ulysses.degree, ulysses.rank)  # this rank's heads

    def _on_forward(self, binding: Binding, model, args, kwargs):
        if torch.compiler.is_compiling():
            return self._on_forward_compiled(binding, model, args, kwargs)
        frames, height, width = binding.adapter.latent_grid(model, args, kwargs)
        text_len = binding.adapter.text_len(model, args, kwargs)
        layout = self._layout(binding, frames, height, width, text_len)
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
        binding.warm_up = warm_up
        order = binding.layout.token_order(device)
        ulysses = ulysses_of(model, sparse=not warm_up and not all(self._layer_dense))
        parallel_config = getattr(model, "_parallel_config", None)
        for slot in binding.slots:
            slot.ulysses = ulysses
            if parallel_config is not None and hasattr(slot.stock, "_parallel_config"):
                slot.stock._parallel_config = parallel_config  # dense layers run diffusers' own parallel attention
            slot.groups = self._slot_groups(slot, binding.layout, device, warm_up, ulysses)
            sparse = slot.groups is not None
            slot.token_order = order
            slot.layout = binding.layout
            slot.step = binding.step
            if slot.layer is not None:
                binding.stats["sparse" if sparse else "dense"] += 1
        self.attention.on_forward(binding)

    def _warn_first_forward_dense(self, binding: Binding) -> None:
        for slot in binding.slots:
            slot.groups = None
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
                stacklevel=4,
            )

    def _num_steps(self, binding: Binding) -> int | None:
        if self.num_inference_steps is not None:
            return self.num_inference_steps
        sched = binding.scheduler
        if sched is not None and getattr(sched, "timesteps", None) is not None:
            return len(sched.timesteps)
        return None

    def mask_for(self, layer: int, layout: VideoLayout, device) -> BlockSparseMask:
        """The layer's BlockSparseMask over all its heads on ``layout`` (built once per layout and spec
        set, then cached; the masks of the least recently used layout go beyond ``MAX_CACHED_LAYOUTS``).
        Sparse forwards use :meth:`head_groups` instead, whose masks layers share; this one is for
        pictures, inspection and benchmarks."""
        per_layer = self._layout_cache(layout, device)
        key = "layer:" + self._layer_keys[layer]
        mask = per_layer.get(key)
        if mask is None:
            specs = self.plan.layer_specs(layer)
            # One spec for every head: a single head row that the kernel broadcasts (stride 0).
            mask = build(specs[0] if all(s == specs[0] for s in specs) else specs, layout, device=device)
            per_layer[key] = mask
        return mask

    def _layout_cache(self, layout: VideoLayout, device) -> dict:
        """The masks cached for (layout, device), made most recent; the least recent layout goes past
        ``MAX_CACHED_LAYOUTS``."""
        where = (layout, str(torch.device(device)))
        per_layer = self._mask_cache.get(where)
        if per_layer is None:
            per_layer = self._mask_cache[where] = {}
            while len(self._mask_cache) > MAX_CACHED_LAYOUTS:
                self._mask_cache.popitem(last=False)
        else:
            self._mask_cache.move_to_end(where)
        return per_layer

    def pattern_mask(self, spec_key: str, layout: VideoLayout, device) -> BlockSparseMask:
        """The one-row mask of one spec (its JSON key) on ``layout``, shared by every layer and head
        that uses the spec, its text query rows empty (they run dense beside it); cached per layout."""
        cache = self._layout_cache(layout, device)
        key = "spec:" + spec_key
        if key not in cache:
            spec = without_temperature(json.loads(spec_key))
            layout = spec_layout(spec, layout)
            blocks = block_matrix(spec, layout, device)
            if layout.text_len:  # text queries run dense beside the kernel (grouped_attention)
                blocks = blocks.clone()
                blocks[layout.num_video_blocks:] = False
            mask = BlockSparseMask.from_dense(blocks[None], layout.block_size).for_token_order(layout.order_digest)
            self._prepare(mask, device)
            cache[key] = mask
        return cache[key]

    def selection(self, spec_key: str, layout: VideoLayout, device) -> DynamicSelection:
        """The per-call selection of one dynamic spec (its JSON key) on ``layout``: its static part
        built once and shared by every layer and head with the spec; cached per layout."""
        cache = self._layout_cache(layout, device)
        key = "select:" + spec_key
        if key not in cache:
            cache[key] = DynamicSelection(json.loads(spec_key), layout, device)
        return cache[key]

    def _prepare(self, mask: BlockSparseMask, device) -> None:
        """Derive now, while building, what the backends read from a mask per call (its density, the
        tiled kernel's query-tile lists), so a sparse call, or a compiled graph, only looks them up."""
        mask.density()
        if (self.backend or default_backend(torch.device(device))) in ("triton", "auto"):
            mask.query_tiles(tiled_kernel_rows(mask.q_block))

    def head_groups(self, layer: int, layout: VideoLayout, device, degree: int = 1,
                    rank: int = 0) -> tuple[HeadGroup, ...]:
        """What a sparse forward of ``layer`` uses: its heads grouped by spec, each group with the
        spec's shared one-row mask (None for dense heads, which run SDPA); cached per layout.

        Under Ulysses (``degree`` ranks) the groups of rank ``rank``'s contiguous chunk of heads, in
        local head numbers; heads padded to a multiple of ``degree`` join the first masked group
        (their q, k and v are zeros and their output is dropped)."""
        cache = self._layout_cache(layout, device)
        key = f"groups:{layer}:{degree}:{rank}"
        if key not in cache:
            groups = self._head_groups[layer]
            if degree > 1:
                H = sum(len(h) for _, h in groups)
                per = -(-H // degree)
                lo = rank * per
                local = [(k, [h - lo for h in heads if lo <= h < lo + per]) for k, heads in groups]
                local = [(k, heads) for k, heads in local if heads]
                padded = list(range(max(H - lo, 0), per))
                if padded:
                    i = next((i for i, (k, _) in enumerate(local) if json.loads(k)["kind"] != "dense"), 0)
                    local[i] = (local[i][0], local[i][1] + padded)
                groups = local
            whole = len(groups) == 1
            made = []
            for k, heads in groups:
                spec = json.loads(k)
                own = spec_layout(spec, layout)
                mask_key = json.dumps(without_temperature(spec), sort_keys=True)  # layers share masks across temperatures
                dynamic = spec["kind"] != "dense" and is_dynamic(spec)
                made.append(HeadGroup(None if spec["kind"] == "dense" or dynamic else
                                      self.pattern_mask(mask_key, layout, device),
                                      None if whole else torch.tensor(heads, device=device),
                                      None if own == layout else own.token_order(device),
                                      float(spec.get("temperature", 1.0)),
                                      self.selection(mask_key, layout, device) if dynamic else None))
            cache[key] = self._one_launch(made, [k for k, _ in groups], [h for _, h in groups], layout, device)
        return cache[key]

    def _one_launch(self, made: list, keys: list, heads: list, layout: VideoLayout, device) -> tuple:
        """The layer's groups as one group over a stack of their patterns and a head map, where they
        can share a launch: every group masked (dense ones too when the tiled kernel runs: a full
        pattern, which copies less than taking their heads apart for SDPA) on the layer's order, none
        selected per call. Heads at different temperatures take a per-head scale factor. Else the
        groups as they are."""
        if len(made) < 2 or any(g.select is not None or g.token_order is not None for g in made):
            return tuple(made)
        backend = self.backend or default_backend(torch.device(device))
        tiled = backend == "triton" or (backend == "auto" and torch.device(device).type == "cuda")
        if any(g.mask is None for g in made) and not tiled:
            return tuple(made)  # dense heads take SDPA on the other backends
        full = json.dumps({"kind": "sliding_tile", "window": [2 * max(layout.tile_grid) + 1] * 3}, sort_keys=True)
        stacked, rows = self._pattern_stack(layout, device, full if tiled else None)
        pattern_keys = [full if g.mask is None else json.dumps(without_temperature(json.loads(k)), sort_keys=True)
                        for g, k in zip(made, keys)]
        H = sum(len(h) for h in heads)
        head_map = torch.zeros(H, dtype=torch.int32)
        for key, hs in zip(pattern_keys, heads):
            head_map[hs] = rows[key]
        temperatures = {g.temperature for g in made}
        if len(temperatures) == 1:
            return (HeadGroup(stacked, None, None, made[0].temperature, None, freeze(head_map.to(device))),)
        factor = torch.ones(H, dtype=torch.float32)
        for g, hs in zip(made, heads):
            factor[hs] = 1.0 / g.temperature
        return (HeadGroup(stacked, None, None, 1.0, None, freeze(head_map.to(device)), factor.to(device)),)

    def _pattern_stack(self, layout: VideoLayout, device, full: str | None) -> tuple[BlockSparseMask, dict]:
        """One mask holding, as its rows, every static pattern of the plan on ``layout``'s order, shared
        by every layer, with the row of each pattern's key; and ``full``, the pattern dense heads take
        in a shared launch, where some layer mixes dense and masked heads (its row is as wide as the
        grid, so every row is padded to that). Built once per layout."""
        cache = self._layout_cache(layout, device)
        if "stack" not in cache:
            keys = set()
            for groups in self._head_groups:
                kinds = [json.loads(k)["kind"] for k, _ in groups]
                if full is not None and "dense" in kinds and len(kinds) > 1:
                    keys.add(full)
                for k, _ in groups:
                    spec = json.loads(k)
                    if spec["kind"] != "dense" and not is_dynamic(spec) and spec_layout(spec, layout) == layout:
                        keys.add(json.dumps(without_temperature(spec), sort_keys=True))
            keys = sorted(keys)
            masks = [self.pattern_mask(k, layout, device) for k in keys]
            width = max(m.kv_indices.shape[-1] for m in masks)
            counts = torch.cat([m.kv_counts for m in masks], dim=1)
            indices = torch.cat([torch.nn.functional.pad(m.kv_indices, (0, width - m.kv_indices.shape[-1]))
                                 for m in masks], dim=1)
            stacked = BlockSparseMask(counts, indices, masks[0].q_block, masks[0].kv_block, masks[0].num_kv_blocks,
                                      masks[0].token_order_digest)
            self._prepare(stacked, device)
            cache["stack"] = (stacked, {k: i for i, k in enumerate(keys)})
        return cache["stack"]

    def cached_mask_bytes(self, layout: VideoLayout, device, tile_rows: int | None = None) -> int:
        """Bytes of the distinct masks held for ``layout`` (each shared mask once); with ``tile_rows``,
        also the query-tile lists the tiled Triton kernel derives from them."""
        seen, total = set(), 0
        for key, value in self._layout_cache(layout, device).items():
            if isinstance(value, DynamicSelection):  # its static part; the masks it makes live for one call
                total += value.static.nbytes
                continue
            masks = [value] if isinstance(value, BlockSparseMask) else [value[0]] if key == "stack" else \
                [g.mask for g in value if g.mask is not None]
            for m in masks:
                if id(m) in seen:
                    continue
                seen.add(id(m))
                total += m.kv_counts.nbytes + m.kv_indices.nbytes
                if tile_rows is not None:
                    total += sum(t.nbytes for t in m.query_tiles(tile_rows))
        return total

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
        if slot is None or slot.owner is not self:  # not bound yet, or set by hand over another processor
            slot = self._bind_from_call(attn)
        if not self.attention.runs(slot):
            return slot.stock(attn, *call_args, **kwargs)
        strategy = self.attention

        if getattr(strategy, "takes_rotary", False):
            def attend(q, k, v, key_valid=None, rotary=None):
                return strategy.attend(q, k, v, slot, key_valid, rotary=rotary)
            attend.takes_rotary = True
        else:
            def attend(q, k, v, key_valid=None):
                return strategy.attend(q, k, v, slot, key_valid)

        return slot.adapter.sparse_forward(attn, attend, *call_args, **kwargs)
