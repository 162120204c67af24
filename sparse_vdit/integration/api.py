"""``apply`` / ``remove``: put sparse attention on a pipeline or transformer, and take it off."""
from __future__ import annotations

from ..plan import SparsityPlan
from .adapters import adapter_for
from .processor import SparseAttnProcessor


def _transformers(pipe_or_transformer, plan):
    """(transformer, plan, scheduler) pairs. Wan 2.2 has a second transformer (`transformer_2`),
    which needs a plan of its own: pass a dict {"transformer": plan, "transformer_2": plan2}."""
    obj = pipe_or_transformer
    scheduler = getattr(obj, "scheduler", None)
    names = [n for n in ("transformer", "transformer_2") if getattr(obj, n, None) is not None]
    if not names:  # a bare transformer
        return [(obj, plan if not isinstance(plan, dict) else plan.get("transformer"), None)]
    plans = plan if isinstance(plan, dict) else {"transformer": plan}
    out = []
    for n in names:
        if n not in plans:
            if n == "transformer_2":
                raise ValueError("this pipeline has a second transformer (transformer_2, Wan 2.2): pass "
                                 "plan={'transformer': plan, 'transformer_2': plan2}")
            raise ValueError(f"no plan given for {n}")
        out.append((getattr(obj, n), plans[n], scheduler))
    return out


def apply(pipe_or_transformer, plan, backend: str | None = None):
    """Install a :class:`SparseAttnProcessor` on every attention module of the pipeline's
    transformer(s). Returns the processor, or a list [transformer's, transformer_2's] for Wan 2.2.

    The original processors are remembered, so :func:`remove` restores them exactly. Applying again
    replaces an earlier plan.
    """
    procs = []
    for transformer, p, scheduler in _transformers(pipe_or_transformer, plan):
        if not isinstance(p, SparsityPlan):
            raise TypeError(f"plan must be a SparsityPlan, got {type(p).__name__}")
        adapter = adapter_for(transformer)  # a clear error for unsupported models
        p.check_model(transformer)
        modules = adapter.processor_modules(transformer)
        for old in {id(m.processor): m.processor for _, m in modules if isinstance(m.processor, SparseAttnProcessor)}.values():
            old.unbind(transformer)  # an earlier plan's hook must not keep running
        if not hasattr(transformer, "_sparse_vdit_original"):
            # A SparseAttnProcessor set earlier by hand is not an original: remember the stock one.
            transformer._sparse_vdit_original = {
                name: m.processor if not isinstance(m.processor, SparseAttnProcessor) else adapter.stock_processor(m)
                for name, m in modules
            }
        proc = SparseAttnProcessor(p, backend=backend)
        proc.bind(transformer, scheduler=scheduler)
        for _, m in modules:
            _set_processor(m, proc)
        procs.append(proc)
    return procs[0] if len(procs) == 1 else procs


def remove(pipe_or_transformer) -> None:
    """Take sparse attention off: the processors before :func:`apply` come back (or, after a plain
    ``set_attn_processor``, the family's stock processors) and the hooks go."""
    obj = pipe_or_transformer
    names = [n for n in ("transformer", "transformer_2") if getattr(obj, n, None) is not None]
    transformers = [getattr(obj, n) for n in names] or [obj]
    for t in transformers:
        original = getattr(t, "_sparse_vdit_original", None)
        adapter = adapter_for(t)
        for name, m in adapter.processor_modules(t):
            proc = m.processor
            if isinstance(proc, SparseAttnProcessor):
                proc.unbind(t)
                restored = original.get(name) if original else None
                _set_processor(m, restored if restored is not None else adapter.stock_processor(m))
        if original is not None:
            del t._sparse_vdit_original


def _set_processor(module, processor) -> None:
    # MochiAttention has no set_processor; its forward calls self.processor.
    if hasattr(module, "set_processor"):
        module.set_processor(processor)
    else:
        module.processor = processor


def load_pipeline(path_or_id: str, device: str | None = None, dtype=None):
    """Load a diffusers pipeline (a local folder, or a hub id where the hub is reachable) on
    ``device`` (default: CUDA when present) in ``dtype`` (default: bf16 on CUDA, fp32 on CPU)."""
    import torch
    from diffusers import DiffusionPipeline

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    pipe = DiffusionPipeline.from_pretrained(path_or_id, torch_dtype=dtype).to(device)
    adapter_for(pipe.transformer)  # a clear error for unsupported models, before any calibration work
    return pipe
