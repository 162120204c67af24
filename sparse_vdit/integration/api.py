"""``apply`` / ``remove``: put sparse attention on a pipeline or transformer, and take it off; the
model-aware plan constructors; loading a pipeline."""
from __future__ import annotations

from typing import Sequence

import torch

from ..plan import SparsityPlan, model_fingerprint
from .adapters import adapter_for, attention_shape
from .processor import AttentionStrategy, SparseAttnProcessor

TRANSFORMER_NAMES = ("transformer", "transformer_2")


def dense_plan(model, tile=(1, 8, 8), block: int | None = None, order: str = "fhw") -> SparsityPlan:
    """Every head of ``model`` dense: with it the model computes exactly what the stock processors compute."""
    return SparsityPlan.dense(attention_shape(model), tile=tile, model=model_fingerprint(model), block=block, order=order)


def uniform_plan(model, spec: str | dict, dense_steps: int | float = 0, dense_layers: Sequence[int] = (),
                 tile=(1, 8, 8), block: int | None = None, order: str = "fhw") -> SparsityPlan:
    """The same mask spec on every head of every sparse-eligible layer of ``model``, except
    ``dense_layers``; the first ``dense_steps`` denoising steps (a count, or a fraction) run dense."""
    return SparsityPlan.uniform(attention_shape(model), spec, dense_steps=dense_steps, dense_layers=dense_layers,
                                tile=tile, model=model_fingerprint(model), block=block, order=order)


def _transformers(pipe_or_transformer, plan):
    """(name, transformer, plan, scheduler). Wan 2.2 has a second transformer (`transformer_2`),
    which needs a plan of its own: pass a dict {"transformer": plan, "transformer_2": plan2}."""
    obj = pipe_or_transformer
    scheduler = getattr(obj, "scheduler", None)
    names = [n for n in TRANSFORMER_NAMES if getattr(obj, n, None) is not None]
    if not names:  # a bare transformer
        if isinstance(plan, dict):
            raise TypeError("a dict of plans is for a pipeline with several transformers; give a bare transformer "
                            "one SparsityPlan")
        return [("transformer", obj, plan, None)]
    plans = plan if isinstance(plan, dict) else {"transformer": plan}
    unknown = sorted(set(plans) - set(names))
    if unknown:
        raise ValueError(f"plans given for {unknown}, which this pipeline does not have; its transformers: {names}")
    out = []
    for n in names:
        if n not in plans:
            if n == "transformer_2":
                raise ValueError("this pipeline has a second transformer (transformer_2, Wan 2.2): pass "
                                 "plan={'transformer': plan, 'transformer_2': plan2}")
            raise ValueError(f"no plan given for {n}")
        out.append((n, getattr(obj, n), plans[n], scheduler))
    return out


def apply(pipe_or_transformer, plan, backend: str | None = None, attention: AttentionStrategy | None = None):
    """Install a :class:`SparseAttnProcessor` on every attention module of the pipeline's
    transformer(s), bound up front (the first forward already follows the plan).

    ``plan`` is a :class:`SparsityPlan`, or for a pipeline with two transformers (Wan 2.2) a dict
    ``{"transformer": plan, "transformer_2": plan2}``. Returns the processor, or a dict of processors
    with the same keys when given a dict. The original processors are remembered, so :func:`remove`
    restores them exactly. Applying again replaces an earlier plan. ``attention`` replaces the
    default :class:`SparseAttention` strategy (calibration and analysis measure through it).
    """
    procs = {}
    for name, transformer, p, scheduler in _transformers(pipe_or_transformer, plan):
        if not isinstance(p, SparsityPlan):
            raise TypeError(f"plan for {name} must be a SparsityPlan, got {type(p).__name__}")
        adapter = adapter_for(transformer)  # a clear error for unsupported models
        modules = adapter.processor_modules(transformer)
        proc = SparseAttnProcessor(p, backend=backend, attention=attention)
        for old in {id(m.processor): m.processor for _, m in modules if isinstance(m.processor, SparseAttnProcessor)}.values():
            old.unbind(transformer)  # an earlier plan's hook must not keep running
        if not hasattr(transformer, "_sparse_vdit_original"):
            # A SparseAttnProcessor set earlier by hand is not an original: remember the stock one.
            transformer._sparse_vdit_original = {
                n: m.processor if not isinstance(m.processor, SparseAttnProcessor) else adapter.stock_processor(m)
                for n, m in modules
            }
        proc.bind(transformer, scheduler=scheduler)  # checks that the plan fits
        for _, m in modules:
            set_module_processor(m, proc)
        procs[name] = proc
    return procs if isinstance(plan, dict) else procs["transformer"]


def remove(pipe_or_transformer) -> None:
    """Take sparse attention off: the processors before :func:`apply` come back (or, after a plain
    ``set_attn_processor``, the family's stock processors) and the hooks go."""
    obj = pipe_or_transformer
    names = [n for n in TRANSFORMER_NAMES if getattr(obj, n, None) is not None]
    transformers = [getattr(obj, n) for n in names] or [obj]
    for t in transformers:
        original = getattr(t, "_sparse_vdit_original", None)
        adapter = adapter_for(t)
        for name, m in adapter.processor_modules(t):
            proc = m.processor
            if isinstance(proc, SparseAttnProcessor):
                proc.unbind(t)
                restored = original.get(name) if original else None
                set_module_processor(m, restored if restored is not None else adapter.stock_processor(m))
        if original is not None:
            del t._sparse_vdit_original


def set_module_processor(module, processor) -> None:
    """Set one attention module's processor (MochiAttention has no ``set_processor``; its forward
    calls ``self.processor``)."""
    if hasattr(module, "set_processor"):
        module.set_processor(processor)
    else:
        module.processor = processor


def load_pipeline(path_or_id: str, device: str | None = None, dtype=None):
    """Load a diffusers pipeline (a local folder, or a hub id where the hub is reachable) on
    ``device`` (default: CUDA when present) in ``dtype`` (default: bf16 on CUDA, fp32 on CPU).

    Components saved as absent (``[null, null]`` in ``model_index.json``, e.g. a pipeline saved
    without its text encoder) are passed as None, so such a folder loads too.
    """
    import json
    import pathlib

    import torch
    from diffusers import DiffusionPipeline

    path = pathlib.Path(path_or_id)
    absent = {}
    if path.exists():
        index = path / "model_index.json"
        if not index.is_file():
            raise ValueError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
        try:
            spec = json.loads(index.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{index} is not valid JSON: {e}") from None
        absent = {k: None for k, v in spec.items() if isinstance(v, list) and v == [None, None]}
    elif path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") > 1:
        raise FileNotFoundError(f"no pipeline folder at {path_or_id}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    pipe = DiffusionPipeline.from_pretrained(path_or_id, **_dtype_kwarg(dtype), **absent).to(device)
    adapter_for(pipe.transformer)  # a clear error for unsupported models, before any calibration work
    return pipe


def _dtype_kwarg(dtype) -> dict:
    """diffusers >= 0.36 names the argument ``dtype`` (``torch_dtype`` is deprecated there)."""
    import inspect

    from diffusers import DiffusionPipeline

    params = inspect.signature(DiffusionPipeline.from_pretrained).parameters
    return {"dtype": dtype} if "dtype" in params else {"torch_dtype": dtype}


def eager_measurement():
    """A context in which compiled modules run eagerly (``torch.compiler.set_stance("force_eager")``):
    calibration, analysis and editing measure through Python-side strategies that Dynamo should not
    trace, and running them eagerly leaves the user's compiled graphs (and their recompile budget)
    untouched for the plan that is applied afterwards."""
    import contextlib

    stance = getattr(torch.compiler, "set_stance", None)
    return stance("force_eager") if stance is not None else contextlib.nullcontext()
