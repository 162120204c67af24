"""What a piece of host code does, counted at the aten level: ops, host syncs, kernel launches and
the bytes it allocates and writes. The overhead benchmark (``sparse-vdit bench overhead``) and the
test suite's sync counter use it.

:class:`DispatchCounter` is a ``TorchDispatchMode``. While it is active, sparse_vdit's custom ops
run their Python bodies in place of the opaque ops, so the counter sees inside them. Work that
stands for a GPU kernel is left out: the Triton interpreter running a kernel, and any function
passed as a ``kernel`` (replaced by a stub that returns empty outputs, counted as one launch,
its outputs as bytes the kernel writes).
"""
from __future__ import annotations

import contextlib
import traceback
from collections import Counter
from typing import Callable, Iterable

import torch

# Aten ops that read a device value back to the host (or need to: a data-dependent output shape).
SYNC_OPS = ("_local_scalar_dense", "nonzero", "item", "masked_select", "is_nonzero", "equal",
            "repeat_interleave.Tensor", "unique")
# Ops that only describe a tensor differently (no memory traffic).
VIEW_OPS = ("view", "_unsafe_view", "reshape", "transpose", "permute", "expand", "unsqueeze", "squeeze", "slice",
            "select", "as_strided", "alias", "t", "unflatten", "flatten", "detach", "lift_fresh", "split",
            "unbind", "narrow", "diagonal", "view_as", "expand_as", "_reshape_alias")


def _tensors(x) -> Iterable[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)


def _empty(shape, dtype, device, perm=None) -> torch.Tensor:
    if perm is None:
        return torch.empty(shape, dtype=dtype, device=device)
    inverse = sorted(range(len(perm)), key=perm.__getitem__)
    return torch.empty([shape[i] for i in perm], dtype=dtype, device=device).permute(inverse)


class DispatchCounter:
    """Counts, while active, the aten ops dispatched (``ops``: name -> count, views included),
    the host syncs (``syncs``: where each happened), the stubbed kernel launches (``launches``),
    the bytes of new tensors (``allocated``) and the bytes written in place into existing ones
    (``written``), all outside the kernels.

    ``kernels``: ``(module, attribute)`` pairs of launchers to replace by stubs that return
    ``torch.empty`` outputs shaped as ``shapes(*args, **kwargs)`` says (a list of (shape, dtype,
    device), or (shape, dtype, device, perm) for an output whose memory is laid out as ``shape``
    permuted by ``perm``). Their bytes are ``kernel_output_bytes``.
    """

    def __init__(self, kernels: dict[tuple[object, str], Callable] | None = None, run_op_bodies: bool = True):
        self.kernels = kernels or {}
        self.run_op_bodies = run_op_bodies
        self.ops: Counter = Counter()
        self.syncs: list[str] = []
        self.launches = 0
        self.allocated = 0
        self.written = 0
        self.kernel_bytes = 0
        self._paused = 0

    @property
    def host_ops(self) -> int:
        """Aten ops other than views."""
        return sum(n for name, n in self.ops.items() if name.split(".")[0] not in VIEW_OPS)

    def summary(self) -> dict:
        return {"host_ops": self.host_ops, "aten_ops_with_views": sum(self.ops.values()), "syncs": len(self.syncs),
                "launches": self.launches, "allocated_bytes": self.allocated, "written_bytes": self.written,
                "kernel_output_bytes": self.kernel_bytes,
                "ops": dict(sorted((k, v) for k, v in self.ops.items() if k.split(".")[0] not in VIEW_OPS))}

    # ------------------------------------------------------------------ the mode
    def _record(self, func, args, kwargs, out) -> None:
        name = func.name().split("::")[-1]
        self.ops[name] += 1
        bool_index = "index" in name and any(i.dtype == torch.bool for a in args if isinstance(a, (list, tuple))
                                             for i in _tensors(a))
        if bool_index or any(name == s or name.startswith(s + ".") for s in SYNC_OPS):
            self._sync(name)
        if name.split(".")[0] in VIEW_OPS:
            return
        inputs = {t.untyped_storage().data_ptr() for t in _tensors(list(args) + list((kwargs or {}).values()))
                  if t.device.type != "meta"}
        for t in _tensors(out):
            nbytes = t.numel() * t.element_size()
            if t.device.type != "meta" and t.untyped_storage().data_ptr() in inputs:
                self.written += nbytes  # in place (or out=): written into an existing tensor
            else:
                self.allocated += nbytes

    def _sync(self, name: str) -> None:
        where = [f for f in traceback.extract_stack()
                 if "sparse_vdit" in f.filename and not f.filename.endswith("testing/counting.py")][-1:]
        self.syncs.append(f"{name} at {where[0].filename.split('sparse_vdit/')[-1]}:{where[0].lineno}"
                          if where else name)

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                if not counter._paused:
                    counter._record(func, args, kwargs, out)
                return out

        self._stack = contextlib.ExitStack()
        if self.run_op_bodies:
            import sparse_vdit.ops.attention as att
            from torch._library.custom_ops import _maybe_get_opdef

            self._patch(att, "block_sparse_attention_op",
                        _maybe_get_opdef("sparse_vdit::block_sparse_attention")._init_fn)
            import sparse_vdit.ops.rotary as rotary

            self._patch(rotary, "rope_op", _maybe_get_opdef("sparse_vdit::rope")._init_fn)
        try:
            from triton.runtime.interpreter import GridExecutor
        except ImportError:
            GridExecutor = None
        if GridExecutor is not None:
            real_call = GridExecutor.__call__

            def call(self_, *a, **k):  # a kernel run by the interpreter is a launch on a GPU, not host work
                with self.paused():
                    return real_call(self_, *a, **k)

            self._patch(GridExecutor, "__call__", call)
        real_tolist = torch.Tensor.tolist

        def tolist(t):  # a read-back that bypasses the dispatcher on the CPU (a sync on a GPU)
            if not self._paused:
                self._sync("tolist")
            return real_tolist(t)

        self._patch(torch.Tensor, "tolist", tolist)
        for (owner, attr), shapes in self.kernels.items():
            self._patch(owner, attr, self._stub(shapes))
        self._stack.enter_context(Mode())
        return self

    def __exit__(self, *exc):
        self._stack.close()
        return False

    @contextlib.contextmanager
    def paused(self):
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def _patch(self, owner, attr, value) -> None:
        old = getattr(owner, attr)
        setattr(owner, attr, value)
        self._stack.callback(setattr, owner, attr, old)

    def _stub(self, shapes: Callable):
        def kernel(*args, **kwargs):
            with self.paused():
                outs = [_empty(*spec) for spec in shapes(*args, **kwargs)]
            self.launches += 1
            self.kernel_bytes += sum(o.numel() * o.element_size() for o in outs)
            return outs[0] if len(outs) == 1 else tuple(outs)
        return kernel


def attention_kernel_stubs(rotary: bool = False) -> dict:
    """The attention kernels of a sparse layer call as :class:`DispatchCounter` stubs: the tiled Triton
    launcher (o and the LSE in model order) and SDPA (dense heads and text rows); with ``rotary``,
    the rotary pass too (``kernels.rope``: q in model order, or k in tiled order). The rotary op runs
    its Triton path only on CUDA or under the interpreter: a caller that stubs it on the CPU also
    makes ``sparse_vdit.ops.rotary._use_triton`` say yes."""
    import sparse_vdit.kernels as kernels

    def tiled(q, q_order, kt, vt, *rest):
        B, H, N, D = q.shape  # o and the LSE in model order; o laid out as [B, N, H, D], as the kernel writes it
        return [((B, H, N, D), q.dtype, q.device, (0, 2, 1, 3)), ((B, H, N), torch.float32, q.device)]

    def sdpa(q, k, v, *args, **kwargs):
        return [((*q.shape[:-1], v.shape[-1]), q.dtype, q.device)]

    stubs = {(kernels, "block_sparse_attention_tiled_fwd"): tiled,
             (torch.nn.functional, "scaled_dot_product_attention"): sdpa}
    if rotary:
        import sparse_vdit.kernels.rope as rope

        def rope_fwd(x, cos, sin, start, order=None):
            B, N, H, D = x.shape
            return [((B, N, H, D) if order is None else (B, H, order.shape[-1], D), x.dtype, x.device)]

        stubs[(rope, "rope_fwd")] = rope_fwd
    return stubs


# The backend entry points of a block-sparse forward, as ``sparse_vdit.ops.attention`` calls them.
SPARSE_FORWARDS = ("torch_block_sparse_attention", "torch_masked_attention", "torch_masked_sdpa", "_tiled_triton")


@contextlib.contextmanager
def count_sparse_forwards():
    """Count block-sparse forwards where they execute, whatever the backend, eager or inside a
    compiled graph (the custom op's body calls these): yields a one-element list, the count so far."""
    from ..ops import attention as ops_attention

    count = [0]
    saved = {name: getattr(ops_attention, name) for name in SPARSE_FORWARDS}

    def counted(fn):
        def call(*args, **kwargs):
            count[0] += 1
            return fn(*args, **kwargs)
        return call

    for name, fn in saved.items():
        setattr(ops_attention, name, counted(fn))
    try:
        yield count
    finally:
        for name, fn in saved.items():
            setattr(ops_attention, name, fn)
