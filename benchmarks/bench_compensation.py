"""Does compensating the attention mass a mask leaves out lower the error at equal density? Measured on
the learned tiny Wan's own attention calls (``sparse_vdit.testing.shapes``).

For a query token t, the skipped key blocks j are each stood in for by their mean key and value
(block pooling, as the dynamic family scores with): the estimated logit ``scale * q_t . k_mean_j +
log(count_j)`` and value ``v_mean_j`` join the exact sparse softmax through its log-sum-exp,

    o_t = (exp(lse_t) o_sparse_t + sum_j exp(l_tj) v_mean_j) / (exp(lse_t) + sum_j exp(l_tj)).

That costs ``N * M * D`` multiply-adds per head and term (1 / block of dense attention). Reported per
mask: the relative output error against dense attention, per head, with and without the
compensation, over every layer call at the sampled steps of one generation per prompt.

    python -m benchmarks.bench_compensation        # writes benchmarks/results/compensation_<device>.json
"""
from __future__ import annotations

import statistics

import torch

import sparse_vdit as sv
from sparse_vdit.integration import AttentionStrategy
from sparse_vdit.testing import shapes

from . import common

MASKS = ({"kind": "sliding_tile", "window": [1, 3, 3]}, {"kind": "sliding_tile", "window": [3, 3, 3]},
         {"kind": "sliding_tile", "window": [3, 5, 5]}, {"kind": "radial", "dense_frames": 0},
         {"kind": "dynamic", "keep": 8}, {"kind": "dynamic", "keep": 32})


def add_arguments(p):
    p.add_argument("--prompts", type=int, default=2, help="training prompts to run")
    p.add_argument("--steps", type=int, default=10, help="denoising steps")
    p.add_argument("--sample", nargs="*", type=float, default=[0.3, 0.6, 0.95], help="fractions of the steps measured")
    p.add_argument("--tile", default="1,4,4")
    p.add_argument("--json", default=None)


def main(argv=None):
    return common.cli_main(__doc__, add_arguments, run, argv)


class Capture(AttentionStrategy):
    """Dense attention; at the sampled steps, the call's q, k, v and layout are kept."""

    def __init__(self, steps):
        self.steps, self.calls = set(steps), []

    def runs(self, slot):
        return slot.layer is not None and slot.layout is not None and slot.step in self.steps

    def attend(self, q, k, v, slot, key_valid=None):
        self.calls.append((slot.layer, slot.step, slot.layout, q.detach().clone(), k.detach().clone(),
                           v.detach().clone()))
        return sv.ops.dense_attention(q, k, v, key_valid=key_valid)


def compensated(q, k, v, mask, layout, o, lse):
    """The sparse output ``o`` [B, H, N, D] (and its LSE [B, H, N]) with the skipped blocks stood in for
    by their mean key and value (model-order q, k, v [B, N, H, D])."""
    B, N, H, D = q.shape
    order = layout.token_order(q.device)
    block = layout.block_size
    km, count = sv.ops.pooled_blocks(k, order, block)  # [B, M, H, D], [1, M]
    vm, _ = sv.ops.pooled_blocks(v, order, block)
    blocks = mask.to_dense().expand(B, H, -1, -1)  # [B, H, Mq, Mk] in tiled order
    pos = layout.inverse_order().to(q.device)  # model token -> tiled position
    visited = blocks[:, :, pos // block, :]  # [B, H, N, Mk]: the blocks each token's query block visits
    logits = torch.einsum("bnhd,bmhd->bhnm", q.double(), km.double()) * D ** -0.5 + count.double().clamp(min=1).log()
    logits = logits.masked_fill(visited | (count == 0)[:, None, None, :], float("-inf"))  # the skipped blocks only
    lse_out = torch.logsumexp(logits, dim=-1)  # [B, H, N]
    o_out = torch.einsum("bhnm,bmhd->bhnd", torch.softmax(logits, -1).nan_to_num(0.0), vm.double())
    lse_in = lse.double()
    total = torch.logaddexp(lse_in, lse_out)
    w_in = torch.exp(lse_in - total).nan_to_num(0.0)[..., None]
    w_out = torch.exp(lse_out - total).nan_to_num(0.0)[..., None]
    return w_in * o.double() + w_out * o_out


def run(args, p):
    tile = tuple(int(x) for x in args.tile.split(","))
    pipe = shapes.learned_wan_pipeline()
    pipe.set_progress_bar_config(disable=True)
    steps = sorted({min(args.steps - 1, int(round(f * (args.steps - 1)))) for f in args.sample})
    cap = Capture(steps)
    sv.apply(pipe, sv.dense_plan(pipe.transformer, tile=tile), attention=cap)
    prompts = [sc.prompt for sc in shapes.TRAIN_SCENES[::max(1, len(shapes.TRAIN_SCENES) // args.prompts)]][:args.prompts]
    try:
        for i, prompt in enumerate(prompts):
            with torch.no_grad():
                pipe(prompt, negative_prompt="", generator=torch.Generator().manual_seed(i), output_type="latent",
                     **{**shapes.GENERATE_DEFAULTS, "num_inference_steps": args.steps})
    finally:
        sv.remove(pipe)
    rows = []
    for spec in MASKS:
        plain, comp, dens = [], [], []
        for layer, step, layout, q, k, v in cap.calls:
            with torch.no_grad():
                if sv.masks.is_dynamic(spec):
                    mask = sv.masks.DynamicSelection(spec, layout, text_rows=True)(q, k)
                else:
                    mask = sv.masks.build(spec, layout)
                qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
                o, lse = sv.ops.block_sparse_attention(qh.double(), kh.double(), vh.double(), mask, return_lse=True,
                                                       token_order=layout.token_order(), backend="torch")
                ref = torch.softmax(qh.double() @ kh.double().transpose(-1, -2) * q.shape[-1] ** -0.5, -1) @ vh.double()
                oc = compensated(q, k, v, mask, layout, o, lse)
            norm = ref.norm(dim=(2, 3))
            plain += ((o - ref).norm(dim=(2, 3)) / norm).flatten().tolist()
            comp += ((oc - ref).norm(dim=(2, 3)) / norm).flatten().tolist()
            dens.append(float(mask.head_density().mean()))
        better = sum(c < s for c, s in zip(comp, plain)) / len(plain)
        row = {"mask": sv.masks.spec_name(spec), "density": statistics.fmean(dens),
               "error_median": statistics.median(plain), "error_compensated_median": statistics.median(comp),
               "error_mean": statistics.fmean(plain), "error_compensated_mean": statistics.fmean(comp),
               "heads_better": better, "head_calls": len(plain)}
        rows.append(row)
        print(f"{row['mask']:24s} density {row['density']:.3f}  error median {row['error_median']:.3f} -> "
              f"{row['error_compensated_median']:.3f} compensated  (better in {better:.0%} of {len(plain)} head calls)",
              flush=True)
    device = torch.device("cpu")
    meta = common.result_meta(device, prompts=prompts, steps=args.steps, sampled_steps=steps, tile=list(tile))
    return common.write_json(args.json or common.RESULTS / f"compensation_{common.device_slug(device)}.json", meta, rows)


if __name__ == "__main__":
    main()
