"""What the kernels share: the constants of the exp2/log2 domain, the autotune space and the
token-index lookup through a tiled order."""
from __future__ import annotations

import math
import os

import triton
import triton.language as tl

# Softmax runs in base 2 (exp2 is one instruction): logits are scaled by log2(e) and LSEs brought
# back to natural log by ln(2).
LOG2E: tl.constexpr = tl.constexpr(1.0 / math.log(2.0))
LN2: tl.constexpr = tl.constexpr(math.log(2.0))
LOG2E_PY = 1.0 / math.log(2.0)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_configs(stages=(2, 3, 4), interpret: bool | None = None) -> list:
    """Warps and stages only: block size is a property of the mask (semantic), never tuned. Under
    the interpreter one config (tuning there is meaningless and slow)."""
    if INTERPRET if interpret is None else interpret:
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in stages]


# Architectures whose tensor cores are fed by mma.sync (no wgmma / tcgen05): A100, RTX 30/40, L40S, RTX 50.
MMA_SYNC_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_120")

# Autotune stages per kernel (warps are 4 or 8 for all): the space before any pruning.
STAGES = {"tiled": (2, 3, 4), "gather": (2, 3, 4), "gather_ordered": (2, 3, 4), "mass": (2, 3),
          "bwd_dq": (1, 2), "bwd_dkdv": (1, 2)}


_ARCH: list = []  # the current device's architecture, read once per process


def current_arch() -> str | None:
    """The static table's name for the current CUDA device ("sm_90a", ...), None without one (read
    once, then a constant: a compiled graph that asks sees no device query)."""
    if not _ARCH:
        import torch

        if not torch.cuda.is_available():
            _ARCH.append(None)
        else:
            major, minor = torch.cuda.get_device_capability()
            _ARCH.append({8: "sm_89" if minor >= 9 else ("sm_80" if minor == 0 else "sm_86"), 9: "sm_90a",
                          10: "sm_100a", 12: "sm_120"}.get(major, f"sm_{major}{minor}"))
    return _ARCH[0]


def arch_configs(kernel: str, arch: str | None, block_m: int, block_n: int, block_d: int) -> list:
    """The autotune configs ``kernel`` keeps on ``arch`` (e.g. "sm_90a") for this tile shape
    (``block_m``: rows per program): the full space less what the static table shows spilling there."""
    warps, stages = (4, 8), STAGES[kernel]
    wide = block_m * block_d >= 128 * 128  # a 128 x 128 (rows x head_dim) accumulator or larger
    if kernel == "tiled":
        if arch in MMA_SYNC_ARCHS:
            # No wgmma: 4 warps spill at any tile; descriptor loads lower to plain loads that the
            # stages do not pipeline, so one stage count is the whole space.
            warps, stages = (8,), (2,)
        else:
            # 4 warps spill on a 128 x 128 accumulator (sm_90a) or a 128 x 128 score tile (sm_100a).
            warps = (8,) if wide or block_m * block_n >= 128 * 128 else (4, 8)
            if block_n * block_d >= 128 * 128:
                stages = (2,)  # 128-token key blocks at head_dim 128 fit shared memory in 2 stages only
    elif kernel == "mass":
        if wide or block_n * block_d >= 128 * 128:
            warps = (8,)
    elif kernel.startswith("gather"):
        if block_m * block_d >= 64 * 128:
            warps = (8,)  # 4 warps spill from a 64 x 128 tile on (sm_90a table)
    elif kernel.startswith("bwd"):
        warps = (8,)  # every 4-warp backward config spills at head_dim 128
    return [triton.Config({}, num_warps=w, num_stages=s) for w in warps for s in stages]


def arch_pruner(kernel: str):
    """``early_config_prune`` for ``triton.autotune``: :func:`arch_configs` of the current GPU for the
    launch's tile shape. Under the interpreter (one config) nothing is pruned."""
    def prune(configs, named_args, **kwargs):
        if len(configs) <= 1:
            return configs
        keep = {(c.num_warps, c.num_stages) for c in arch_configs(
            kernel, current_arch(), kwargs.get("ROWS", kwargs["BLOCK_M"]), kwargs["BLOCK_N"], kwargs["BLOCK_D"])}
        return [c for c in configs if (c.num_warps, c.num_stages) in keep] or configs[:1]

    return prune


@triton.jit
def token_index(order, o_pos, N, HAS_ORDER: tl.constexpr):
    """Model token index of tiled positions ``o_pos`` and whether a token sits there (not padding)."""
    if HAS_ORDER:
        i_tok = tl.load(order + o_pos)
        m_tok = i_tok >= 0
        i_tok = tl.where(m_tok, i_tok, 0)
    else:
        i_tok = o_pos
        m_tok = o_pos < N
    return i_tok, m_tok


@triton.jit
def load_query_block(q, token_order, i_b, i_h, i_m,
                     stride_qb, stride_qh, stride_qn, stride_qd, N, HEAD_DIM,
                     BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HAS_ORDER: tl.constexpr):
    """The prologue both kernels share: a query block's token indices, validity and values."""
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] positions in the (tiled) sequence
    o_d = tl.arange(0, BLOCK_D)  # [BD]
    m_d = o_d < HEAD_DIM
    i_q, m_q = token_index(token_order, o_m, N, HAS_ORDER)  # [BM] token index in model order
    p_q = q + i_b * stride_qb + i_h * stride_qh + i_q[:, None] * stride_qn + o_d[None, :] * stride_qd
    b_q = tl.load(p_q, mask=m_q[:, None] & m_d[None, :], other=0.0)  # [BM, BD]
    return b_q, i_q, m_q, o_d, m_d


@triton.jit
def online_softmax_step(b_s, b_m, b_l, b_acc, b_v):
    """One key block of the online softmax (log2 domain): the running row max ``b_m``, row sum ``b_l``
    and accumulator ``b_acc`` [BM, BD] after logits ``b_s`` [BM, BN] and values ``b_v`` [BN, BD].
    A row that has seen only masked keys keeps max -inf; 0 is subtracted there so exp2 gives 0, not NaN."""
    b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
    b_m_safe = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
    b_alpha = tl.math.exp2(b_m - b_m_safe)
    b_p = tl.math.exp2(b_s - b_m_safe[:, None])
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v)
    return b_m_new, b_l, b_acc


@triton.jit
def online_softmax_finish(b_m, b_l, b_acc):
    """(output [BM, BD], natural-log LSE [BM]); a row with no key gives zeros and LSE = -inf, never NaN."""
    m_empty = b_l == 0.0
    b_l_safe = tl.where(m_empty, 1.0, b_l)
    b_o = b_acc / b_l_safe[:, None]
    b_lse = tl.where(m_empty, float("-inf"), (b_m + tl.math.log2(b_l_safe)) * LN2)
    return b_o, b_lse


def head_dim_block(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))
