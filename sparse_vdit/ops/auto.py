"""``backend="auto"``: the fastest exact backend for a shape on this GPU, measured once per process.

On the first call for a key (batch, heads, length, head_dim, dtype, block shape, whether tokens are
reordered, density in tenths) every exact candidate runs on the call's own inputs: the tiled Triton
kernel, the gather Triton kernel, compiled FlexAttention on the same block mask, and dense SDPA when
the mask visits every block (then dense attention is the same function). Off CUDA the candidates
are the torch block-gather path and dense attention under the token mask (``torch_masked``, while
its N x N mask is small). The winner is cached; later calls with the key go straight to it. Backends that
cannot run the inputs (``ops.attention.unsupported``) are not tried; a broken install or a sticky CUDA
error is raised, not taken for a candidate that lost.
"""
from __future__ import annotations

import statistics
import time
from collections import OrderedDict
from typing import Callable, Sequence

import torch

MAX_KEYS = 256
_CHOICES: OrderedDict[tuple, str] = OrderedDict()


def pick_backend(key: tuple, candidates: Sequence[str], time_ms: Callable[[str], float]) -> str:
    """The cached choice for ``key``, else the candidate with the smallest ``time_ms`` (one that
    raises is skipped), cached. Raises RuntimeError if every candidate fails."""
    if key in _CHOICES:
        _CHOICES.move_to_end(key)
        return _CHOICES[key]
    timings, errors = {}, {}
    for name in candidates:
        try:
            timings[name] = float(time_ms(name))
        except Exception as e:  # noqa: BLE001 - a candidate that cannot run this shape is not a choice
            if is_fatal(e):
                raise
            errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    if not timings:
        raise RuntimeError(f"backend='auto': no candidate ran ({errors})")
    best = min(timings, key=timings.get)
    _CHOICES[key] = best
    while len(_CHOICES) > MAX_KEYS:
        _CHOICES.popitem(last=False)
    return best


_FATAL_MARKS = ("CUDA error", "illegal memory access", "device-side assert", "unspecified launch failure",
                "CUBLAS_STATUS", "cudaErrorLaunchFailure")


def is_fatal(e: BaseException) -> bool:
    """An error that is not about one candidate: a broken install (ImportError) or a sticky CUDA
    error, after which every later CUDA call fails too. ``auto`` re-raises these instead of trying on."""
    if isinstance(e, ImportError):
        return True
    accel = getattr(torch, "AcceleratorError", None)
    if accel is not None and isinstance(e, accel):
        return True
    text = str(e)
    return any(m in text for m in _FATAL_MARKS)


def choices() -> dict[tuple, str]:
    """What ``auto`` chose so far in this process, per key."""
    return dict(_CHOICES)


def cuda_time_ms(fn: Callable[[], object], reps: int = 3) -> float:
    """Median milliseconds of ``fn`` on the current CUDA stream, after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def cpu_time_ms(fn: Callable[[], object], reps: int = 3) -> float:
    """Median wall-clock milliseconds of ``fn`` on the CPU, after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def auto_key(q, mask, token_order, kv_token_order, return_lse: bool) -> tuple:
    B, H, N, D = q.shape
    return (B, H, N, D, str(q.dtype), mask.q_block, mask.kv_block, mask.heads, token_order is not None,
            kv_token_order is not None, return_lse,
            # a selected mask (built per call) keys by its width: its density would be a read-back
            ("selected", mask.kv_indices.shape[-1]) if mask.selected else round(mask.density(), 1))
