"""``calibrate``: decide per head which mask survives, from the output error it causes.

The model runs dense. At sampled denoising steps, every sparse-eligible attention call also
computes, from its own q, k and v, the relative error of each candidate mask (and of its sink-aware
variant) against the dense output, per head, plus block-level attention-mass statistics. A head
gets the sparsest candidate whose worst error over prompts and the steps after the warm-up stays
within the budget, else it stays dense; the warm-up length is the one that minimizes the expected
attention cost. Partial measurements are saved after each prompt, so a run can stop and resume.
"""
from __future__ import annotations

import functools
import json
import math
import pathlib
import time
import warnings
from typing import Any, Callable, Sequence

import torch

from ..integration import (AttentionStrategy, LayerSlot, SparseAttnProcessor, adapter_for, apply, dense_plan,
                           eager_measurement, remove)
from ..masks import (DynamicSelection, block_matrix, is_dynamic, ladder, normalize_spec, sink_blocks, spec_layout,
                     spec_name)
from ..ops import BlockSparseMask, default_backend, dense_attention
from ..plan import SparsityPlan, model_fingerprint
from .measure import (LayerMeasurement, head_errors, layer_attention_mass, mass_inside, option_names, sink_frames,
                      top_key_share)

DEFAULT_CANDIDATES = ("sliding_tile", "radial", "spatial", "temporal")
WARMUP_CHOICES = (0.0, 0.1, 0.2, 0.3)
_MAX_CACHED = 256  # candidate / sink-aware mask sets kept at once


class MeasuringAttention(AttentionStrategy):
    """Dense attention in every sparse-eligible layer at the sampled steps, which also measures each
    candidate (and its sink-aware variant) on the call's own q, k and v, at temperature 1 and at each
    of ``temperatures``. A dynamic candidate's blocks are selected from the call's q and k. Elsewhere
    the stock processors run."""

    def __init__(self, candidates: list[dict], sample_steps: set[int], backend, sink_factor,
                 temperatures: tuple[float, ...] = ()):
        self.candidates = candidates
        self.temperatures = tuple(temperatures)
        self.options = option_names(candidates, self.temperatures)
        self.sample_steps = sample_steps
        self.backend = backend
        self.sink_factor = sink_factor
        self.records: list[LayerMeasurement] = []  # one per (sampled call, layer)
        self._cand_masks: dict[tuple, tuple] = {}
        self._sink_masks: dict[tuple, tuple] = {}
        self.progress = None  # a tqdm bar whose postfix shows the step being run

    def on_forward(self, binding) -> None:
        if self.progress is not None:
            measuring = "measuring" if binding.step in self.sample_steps else "dense"
            self.progress.set_postfix_str(f"step {binding.step + 1} ({measuring})", refresh=True)

    def runs(self, slot: LayerSlot) -> bool:
        return slot.layer is not None and slot.layout is not None and slot.step in self.sample_steps

    def attend(self, q, k, v, slot: LayerSlot, key_valid=None):
        o = dense_attention(q, k, v, key_valid=key_valid)
        self._measure(slot.layer, slot.step, slot.layout, q, k, v, o, key_valid,
                      self.backend or default_backend(q.device))
        return o

    @torch.no_grad()
    def _measure(self, layer, step, layout, q, k, v, o, key_valid, backend):
        device = q.device
        heads, D = q.shape[2], q.shape[3]
        # A candidate with its own ``order`` is measured on its own layout (mask, order and mass).
        layouts = [spec_layout(c, layout) for c in self.candidates]
        masses = {layout: layer_attention_mass(q, k, layout, key_valid, backend=backend)}
        for lay in layouts:
            if lay not in masses:
                masses[lay] = layer_attention_mass(q, k, lay, key_valid, backend=backend)
        mass = masses[layout]
        sinks = sink_frames(mass, layout, self.sink_factor)
        key = (layout, str(device), heads)
        if key not in self._cand_masks:
            if len(self._cand_masks) >= _MAX_CACHED:
                self._cand_masks.clear()
            blocks = [block_matrix(c, lay).to(device) for c, lay in zip(self.candidates, layouts)]
            self._cand_masks[key] = (blocks, [self._static_or_selection(c, b, lay, heads)
                                              for c, b, lay in zip(self.candidates, blocks, layouts)])
        blocks, plain = self._cand_masks[key]
        with_sinks = [self._with_sinks(c, b, sinks, lay, device) for c, b, lay in
                      zip(self.candidates, blocks, layouts)] if any(sinks) else None
        orders = [lay.token_order(device) for lay in layouts]
        errors, densities, inside = [], [], []
        for t in (1.0, *self.temperatures):
            scale = None if t == 1.0 else D ** -0.5 / t
            masks = [self._mask(m, q, k, key_valid, scale) for m in plain]
            err = head_errors(q, k, v, o, masks, orders, backend, key_valid, scale=scale)  # [C, H]
            if with_sinks is not None:  # each candidate with each head's own sink frames always visited
                sink_masks = [self._mask(m, q, k, key_valid, scale) for m in with_sinks]
                sink_err = head_errors(q, k, v, o, sink_masks, orders, backend, key_valid, scale=scale)
            else:  # no sinks found: the sink-aware variants are the candidates themselves
                sink_masks, sink_err = masks, err
            errors.append(torch.cat([err, sink_err]))
            for m, lay in zip(masks + sink_masks, layouts + layouts):  # the order of option_names
                densities.append(m.head_density().tolist())
                inside.append(mass_inside(masses[lay], m))
        select = [self._selection_cost(m, D) for m in plain] * (2 * (1 + len(self.temperatures)))
        self.records.append(LayerMeasurement(
            layer=layer, step=step, options=self.options,
            errors=torch.cat(errors).cpu().tolist(), densities=densities, sink_frames=sinks,
            mass_inside=torch.stack(inside).cpu().tolist(), top1pct_key_mass=top_key_share(mass).cpu().tolist(),
            selection_cost=select,
        ))

    @staticmethod
    def _static_or_selection(spec, blocks, layout, heads):
        """A static candidate's mask over ``heads`` heads, or a dynamic candidate's selection over the
        static ``blocks``."""
        if is_dynamic(spec):
            return DynamicSelection(spec, layout, blocks.device, static=blocks[None])
        return BlockSparseMask.from_dense(blocks.expand(heads, -1, -1), layout.block_size).for_token_order(
            layout.order_digest)

    @staticmethod
    def _mask(m, q, k, key_valid, scale):
        return m(q, k, key_valid=key_valid, scale=scale) if isinstance(m, DynamicSelection) else m

    @staticmethod
    def _selection_cost(m, head_dim) -> float:
        return m.selection_cost(head_dim) if isinstance(m, DynamicSelection) else 0.0

    def _with_sinks(self, spec, blocks, sinks, layout, device):
        """A candidate's block matrix with each head's sink-frame key blocks added: its mask, or its
        selection over that static part (cached)."""
        key = (id(blocks), layout, tuple(map(tuple, sinks)))
        if key not in self._sink_masks:
            # One set of sink frames' masks at a time: each layer and step may find other sinks, and a
            # mask holds its token-level form on the CPU (N x N per head, boolean and additive: 80 MB at
            # 2,048 tokens and four heads), so keeping 256 of them got a 29-rung calibration killed for
            # memory at 24 GB.
            if len(self._sink_masks) >= min(_MAX_CACHED, len(self.candidates)):
                self._sink_masks.clear()
            per_head = blocks.expand(len(sinks), -1, -1).clone()
            for h, frames in enumerate(sinks):
                if frames:
                    per_head[h][:, sink_blocks({"frames": frames}, layout).to(device)] = True
            if is_dynamic(spec):
                made = DynamicSelection(spec, layout, device, static=per_head)
            else:
                made = BlockSparseMask.from_dense(per_head, layout.block_size).for_token_order(layout.order_digest)
            self._sink_masks[key] = (blocks, made)  # the blocks keep id(blocks) from being reused
        return self._sink_masks[key][1]


def _check_embeds(name: str, embeds: list, transformer) -> None:
    width = adapter_for(transformer).text_embed_dim(transformer)
    for i, e in enumerate(embeds):
        if not isinstance(e, torch.Tensor) or e.dim() != 3:
            raise ValueError(f"{name}[{i}] must be a tensor [1, tokens, width], got "
                             f"{tuple(e.shape) if isinstance(e, torch.Tensor) else type(e).__name__}")
        if width is not None and e.shape[-1] != width:
            raise ValueError(f"{name}[{i}] has width {e.shape[-1]}, but {type(transformer).__name__} takes prompt "
                             f"embeddings of width {width} (its text encoder's hidden size)")


def calibration_prompts(target, transformer, prompts, prompt_embeds) -> list:
    """The prompts (strings) or prompt embeddings (tensors [1, T, width]) to calibrate on, checked."""
    if prompts is not None and prompt_embeds is not None:
        raise ValueError("give prompts or prompt_embeds, not both")
    if prompt_embeds is not None:
        items = list(prompt_embeds.unbind(0)) if isinstance(prompt_embeds, torch.Tensor) and prompt_embeds.dim() == 4 \
            else [prompt_embeds] if isinstance(prompt_embeds, torch.Tensor) else list(prompt_embeds)
        if not items:
            raise ValueError("prompt_embeds is empty: give at least one tensor [1, tokens, width]")
        _check_embeds("prompt_embeds", items, transformer)
        return items
    if prompts is None:
        raise ValueError("give prompts=[...] (a list of strings) or prompt_embeds=[...] (or a run callable)")
    if isinstance(prompts, str):
        raise TypeError(f"prompts must be a list of strings, got one string ({prompts[:40]!r}): use prompts=[{prompts[:40]!r}]")
    items = list(prompts)
    bad = [type(p).__name__ for p in items if not isinstance(p, str) or not p.strip()]
    if not items or bad:
        raise TypeError(f"prompts must be a non-empty list of non-empty strings, got {len(items)} items"
                        + (f" including {bad[0]}" if bad else ""))
    missing = [n for n in ("tokenizer", "text_encoder") if getattr(target, n, "absent") is None]
    if missing:
        raise ValueError(f"this pipeline has no {' / '.join(missing)}, so it cannot encode text prompts: give "
                         "prompt_embeds=[...] (and negative_prompt_embeds for classifier-free guidance)")
    return items


def pipeline_runner(items: list, embeds: bool, negative_prompt_embeds, num_inference_steps: int, seed: int,
                    pipe_kwargs: dict) -> Callable[[Any, int], Any]:
    """``run(pipe, i)``: one generation of prompt ``i`` (a string, or an embedding when ``embeds``),
    seeded by ``seed + i``, returning latents (calibration and analysis need no decoding)."""
    def run(pipe, i):
        gen = torch.Generator(device="cpu").manual_seed(seed + i)
        kw = dict(num_inference_steps=num_inference_steps, generator=gen, output_type="latent", **pipe_kwargs)
        if embeds:
            kw["prompt_embeds"] = items[i]
            if negative_prompt_embeds is not None:
                kw["negative_prompt_embeds"] = negative_prompt_embeds
            else:
                kw.setdefault("guidance_scale", 1.0)
        else:
            kw["prompt"] = items[i]
        with torch.no_grad():
            return pipe(**kw)

    return run


def sample_step_indices(num_steps: int, sample: Sequence[float] | None) -> list[int]:
    fractions = sample if sample is not None else (0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 0.95)
    return sorted({min(num_steps - 1, int(round(f * (num_steps - 1)))) for f in fractions})


def decide(records: list[dict], candidates: list[dict], num_layers: int, num_heads: int, num_steps: int,
           error_budget: float, warmup_choices=WARMUP_CHOICES, temperatures: Sequence[float] = (),
           target_density: float | None = None) -> dict[str, Any]:
    """Choose per head the cheapest candidate within ``error_budget`` (worst case over prompts and the
    sampled steps after the warm-up), else dense; pick the warm-up that minimizes expected cost.

    With ``target_density`` the per-head threshold gives way to an allocation: every head takes the
    option (dense included, at error 0 and cost 1) that minimizes ``error ** 2 + lam * cost``, with one
    ``lam`` for the whole model, the smallest that brings the expected attention cost to the target;
    options over ``error_budget`` stay out. At a given density that minimizes the sum of the heads'
    squared errors (heads' output errors add in quadrature in the layer's output), where a threshold
    lets every head it sparsifies err up to the budget. The warm-up is the one whose allocation has the
    least summed squared error.

    A candidate's cost is its mean density, plus, for a dynamic one, its selection's cost per call
    (``LayerMeasurement.selection_cost``), against 1 for dense. With ``temperatures`` measured too,
    the mask is chosen at whichever temperature lets it fit, and the head keeps a temperature only
    where it gives that mask a lower error than temperature 1.

    Returns {"heads": [[spec]], "dense_steps": float, "dense_layers": [...], "per_head": [...]}.
    """
    C = len(candidates)
    temps = (1.0, *temperatures)
    # the order of option_names: candidates, then with sinks; that again at each temperature
    options = [(c, sinks, t) for t in temps for sinks in (False, True) for c in range(C)]
    names = option_names(candidates, tuple(temperatures))
    records = [r if isinstance(r, LayerMeasurement) else LayerMeasurement.from_dict(r, names) for r in records]
    for r in records:
        if r.options != names:
            raise ValueError(f"record of layer {r.layer} measured options {r.options}, not {names}")
    O, nT = len(options), len(temps)
    best = None
    for warm in warmup_choices:
        first = math.ceil(warm * num_steps)
        worst = torch.zeros(num_layers, O, num_heads)
        cost_sum = torch.zeros(num_layers, O, num_heads)
        density_sum = torch.zeros(num_layers, O, num_heads)
        seen = torch.zeros(num_layers)
        for r in records:
            if r.step < first:
                continue
            seen[r.layer] += 1
            worst[r.layer] = torch.maximum(worst[r.layer], torch.tensor(r.errors))
            dens = torch.tensor(r.densities)
            select = torch.tensor(r.selection_cost or [0.0] * O)[:, None]
            density_sum[r.layer] += dens
            cost_sum[r.layer] += dens + select  # a dynamic option pays for its selection
        if not (seen > 0).all():
            continue  # a warm-up that leaves layers unmeasured cannot be judged
        density = density_sum / seen[:, None, None]  # a dynamic option's varies per call: its mean
        cost = cost_sum / seen[:, None, None]
        ok = worst <= error_budget
        cost_if_ok = torch.where(ok, cost, torch.full_like(cost, 2.0))
        if target_density is not None:
            choice, choice_cost, total_error = _allocate(worst, cost, ok, (target_density - warm) / (1 - warm))
            head_cost = choice_cost.clamp(max=1.0)
            expected = warm + (1 - warm) * float(head_cost.mean())
            key = (expected > target_density + 1e-6, total_error, expected)  # on target first, then least error
            if best is None or key < best[0]:
                best = (key, warm, choice, choice_cost, worst, density, expected)
            continue
        # The mask (candidate, sinks) first: the cheapest within budget at any temperature ...
        _, mask_choice = cost_if_ok.view(num_layers, nT, 2 * C, num_heads).min(dim=1).values.min(dim=1)  # [L, H]
        # ... then at that mask the temperature with the lowest error (1 unless another is lower).
        at_mask = mask_choice[:, None, None, :].expand(num_layers, nT, 1, num_heads)
        err_at = torch.where(ok, worst, torch.full_like(worst, float("inf"))).view(
            num_layers, nT, 2 * C, num_heads).gather(2, at_mask).squeeze(2)  # [L, nT, H]
        temp_choice = err_at.argmin(dim=1)  # the first minimum: temperature 1 on ties
        choice = temp_choice * (2 * C) + mask_choice
        choice_cost = cost_if_ok.gather(1, choice[:, None, :]).squeeze(1)
        head_cost = choice_cost.clamp(max=1.0)
        expected = warm + (1 - warm) * float(head_cost.mean())
        if best is None or expected < best[0] - 1e-9:
            best = (expected, warm, choice, choice_cost, worst, density, expected)
    if best is None:
        raise ValueError("calibration measured no layer at the sampled steps: give more steps or prompts")
    _, warm, choice, choice_cost, worst, density, expected = best
    heads, per_head = [], []
    for layer in range(num_layers):
        row, info = [], []
        for h in range(num_heads):
            if choice_cost[layer, h] >= 1.0:  # nothing within budget, or only masks that visit everything
                spec = {"kind": "dense"}
            else:
                c, with_sinks, temp = options[int(choice[layer, h])]
                spec = dict(candidates[c])
                if temp != 1.0:
                    spec["temperature"] = temp
                if with_sinks:
                    frames = _sinks_of(records, layer, h)
                    if frames:
                        spec["sinks"] = {"frames": frames}
            row.append(normalize_spec(spec))
            by_option = {names[i]: float(worst[layer, i, h]) for i in range(len(options))}
            reason = best_name = None
            if spec["kind"] == "dense":
                best_name = min(by_option, key=by_option.get)
                if target_density is not None and by_option[best_name] <= error_budget:
                    reason = (f"the density target {target_density:g} left it dense: its error would cost more than "
                              f"its attention saves elsewhere (best option {best_name}, error {by_option[best_name]:.3g})")
                elif by_option[best_name] > error_budget:
                    reason = f"best candidate error {by_option[best_name]:.3g} > budget {error_budget:g} ({best_name})"
                else:
                    reason = (f"the candidates within budget visit every block of this grid ({best_name}): "
                              f"the grid is small for them")
            info.append({
                "chosen": spec_name(spec),
                "reason": reason,
                "best_option": best_name,
                "density": float(density[layer, int(choice[layer, h]), h]) if spec["kind"] != "dense" else 1.0,
                "error": float(worst[layer, int(choice[layer, h]), h]) if spec["kind"] != "dense" else 0.0,
                # the same mask at temperature 1 (equal to "error" when no temperature is kept)
                "error_at_temperature_1": float(worst[layer, int(choice[layer, h]) % (2 * C), h])
                if spec["kind"] != "dense" else 0.0,
                "worst_error_by_option": by_option,
            })
        heads.append(row)
        per_head.append(info)
    dense_layers = [i for i, row in enumerate(heads) if all(s["kind"] == "dense" for s in row)]
    return {"heads": heads, "dense_steps": float(warm), "dense_layers": dense_layers, "per_head": per_head,
            "expected_attention_cost": expected}


def _allocate(worst: torch.Tensor, cost: torch.Tensor, ok: torch.Tensor, target: float, iters: int = 60):
    """Per head (``worst``, ``cost``, ``ok``: [L, O, H]) the option minimizing ``worst ** 2 + lam * cost``,
    dense (error 0, cost 1) among them, with the smallest ``lam`` whose mean head cost is at most
    ``target`` (a bisection; cost falls as ``lam`` grows). Returns (choice [L, H], its cost, 1 or more
    where dense, and the summed squared error)."""
    worst = torch.where(ok, worst.double() ** 2, torch.full_like(worst, float("inf"), dtype=torch.float64))
    cost = cost.double()
    cost = torch.where(ok, cost.clamp(max=1.0), torch.ones_like(cost))

    def pick(lam: float):
        score = worst + lam * cost
        value, choice = score.min(dim=1)  # [L, H]
        sparse = value < lam * 1.0  # beats dense (score lam) strictly
        chosen_cost = torch.where(sparse, cost.gather(1, choice[:, None, :]).squeeze(1), torch.full_like(value, 2.0))
        error = torch.where(sparse, worst.gather(1, choice[:, None, :]).squeeze(1), torch.zeros_like(value))
        return choice, chosen_cost, error

    target = target + 1e-6  # densities are float32
    lo, hi = 0.0, 1.0
    while float(pick(hi)[1].clamp(max=1.0).mean()) > target and hi < 1e6:
        lo, hi = hi, hi * 4
    for _ in range(iters):  # the smallest lam on target: least error
        mid = (lo + hi) / 2
        if float(pick(mid)[1].clamp(max=1.0).mean()) > target:
            lo = mid
        else:
            hi = mid
    choice, chosen_cost, error = pick(hi)
    return choice, chosen_cost, float(error.sum())


def dense_reasons(plan) -> list[str]:
    """Why the calibrated plan's dense heads are dense, one line per reason with its head count
    (from ``plan.metrics["per_head"]``), e.g. ``"12/12 heads: best candidate error 0.31 > budget 0.05
    (sliding_tile(3,3,3))"`` (the median error over those heads). Empty when no head is dense."""
    per_head = plan.metrics.get("per_head") or []
    total = sum(len(row) for row in per_head)
    groups: dict[tuple[str, str], list[float]] = {}
    for row in per_head:
        for head in row:
            reason = head.get("reason")
            if reason is None:
                continue
            if reason.startswith("best candidate error"):
                name = head["best_option"]
                groups.setdefault(("error", name), []).append(head["worst_error_by_option"][name])
            elif reason.startswith("the density target"):
                name = head["best_option"]
                groups.setdefault(("target", name), []).append(head["worst_error_by_option"][name])
            else:
                groups.setdefault(("full", reason), []).append(0.0)
    lines = []
    budget = plan.metrics.get("error_budget")
    for (kind, what), errors in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        if kind == "error":
            median = sorted(errors)[len(errors) // 2]
            lines.append(f"{len(errors)}/{total} heads dense: best candidate error {median:.3g} (median) > budget "
                         f"{budget:g} ({what})")
        elif kind == "target":
            median = sorted(errors)[len(errors) // 2]
            lines.append(f"{len(errors)}/{total} heads dense: the density target "
                         f"{plan.metrics.get('target_density'):g} is met without them (best candidate error "
                         f"{median:.3g} (median), {what})")
        else:
            lines.append(f"{len(errors)}/{total} heads dense: {what}")
    return lines


def _sinks_of(records, layer, head) -> list[int]:
    frames: set[int] = set()
    for r in records:
        if r.layer == layer:
            frames.update(r.sink_frames[head])
    return sorted(frames)


def _own_progress_bar(fn):
    """Run ``fn(pipe, ...)`` with the pipeline's own per-generation progress bar off (calibration's
    bar shows the prompt and step being measured; two bars would interleave), restored after."""
    @functools.wraps(fn)
    def wrapper(pipe_or_transformer, *args, **kwargs):
        if not hasattr(pipe_or_transformer, "set_progress_bar_config"):
            return fn(pipe_or_transformer, *args, **kwargs)
        saved = dict(getattr(pipe_or_transformer, "_progress_bar_config", {}) or {})
        pipe_or_transformer.set_progress_bar_config(**{**saved, "disable": True})
        try:
            return fn(pipe_or_transformer, *args, **kwargs)
        finally:
            pipe_or_transformer._progress_bar_config = saved
    return wrapper


@_own_progress_bar
def calibrate(
    pipe_or_transformer,
    *,
    run: Callable[[Any, int], Any] | None = None,
    prompt_embeds: Sequence[torch.Tensor] | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    prompts: Sequence[str] | None = None,
    num_inference_steps: int = 50,
    candidates: Sequence[str | dict] = DEFAULT_CANDIDATES,
    ladders: bool = False,
    error_budget: float = 0.05,
    target_density: float | None = None,
    dense_steps: float | None = None,
    tile: tuple[int, int, int] = (1, 8, 8),
    block: int | None = None,
    order: str = "fhw",
    sample_steps: Sequence[float] | None = None,
    sink_factor: float = 4.0,
    temperatures: Sequence[float] = (),
    backend: str | None = None,
    checkpoint: str | pathlib.Path | None = None,
    global_budget: float | None = None,
    progress: bool = True,
    seed: int = 0,
    **pipe_kwargs,
) -> SparsityPlan:
    """Calibrate a plan for a diffusers video pipeline (or a bare transformer with ``run``).

    Args:
        pipe_or_transformer: a pipeline (its ``transformer`` is calibrated) or a transformer.
        run: ``run(target, prompt_index)`` performs one generation; by default the pipeline is called
            with ``prompts[i]`` or ``prompt_embeds[i]``, ``num_inference_steps`` and ``pipe_kwargs``
            (height, width, num_frames, guidance_scale, ...).
        candidates: mask specs to try (each also with each head's detected sink frames).
        ladders: expand each candidate given as a bare kind name into its family's ladder of
            parameters (``sparse_vdit.masks.ladder``), so each head gets the cheapest rung within
            budget across all families; costs one measurement per rung. A ``dynamic`` candidate
            selects its blocks per call from q and k; its selection's FLOPs count in its cost.
        temperatures: softmax temperatures to try besides 1 (e.g. ``(0.9, 1.1, 1.25)``): every
            candidate is also measured at each, a mask may be chosen at one where it fits the
            budget only with it, and a head keeps a temperature only where it lowers the error of
            its chosen mask. Costs one more measurement of every candidate per temperature.
        error_budget: largest allowed relative error ||O_mask - O_dense|| / ||O_dense|| per head.
        target_density: instead of the cheapest mask within ``error_budget`` in every head, spend a
            given attention density where it buys the most: the plan's expected attention cost
            (dense warm-up steps and dense heads count 1) is brought to this fraction of dense with
            the least summed squared per-head error (one trade-off between error and density for all heads;
            masks over ``error_budget`` still stay out, so pass a loose one, e.g. 0.5, to let every
            head compete). Use it to compare with a uniform mask at its density.
        dense_steps: the dense warm-up (a fraction of the steps) the plan keeps; by default the one
            among 0, 0.1, 0.2 and 0.3 that costs least (with ``target_density``: errs least).
        tile, block, order: the token layout the plan's masks are built on (``VideoLayout``); e.g.
            ``tile=(6, 8, 8), block=64`` for STA's tiles, ``tile=(0, 0, 0), block=64`` for raster order.
        sample_steps: fractions of the schedule at which to measure (default 7 points).
        checkpoint: a JSON file for partial measurements; an existing one resumes the run.
        global_budget: optional bound on the end-to-end relative output error, checked on a held-out
            prompt (the last of ``prompts`` / ``prompt_embeds``, or ``run(target, num_prompts)``, which
            is then not measured); per-head budgets are tightened until the plan fits, else all dense.

    Returns a :class:`SparsityPlan` whose ``metrics`` hold every measurement behind each decision.
    """
    from tqdm.auto import tqdm

    target = pipe_or_transformer
    transformer = getattr(target, "transformer", target)
    adapter_for(transformer)
    if not 0 < error_budget < 1:
        raise ValueError(f"error_budget must lie in (0, 1), got {error_budget}")
    if target_density is not None and (isinstance(target_density, bool) or not 0 < target_density <= 1):
        raise ValueError(f"target_density is a fraction of dense attention in (0, 1], got {target_density!r}")
    if dense_steps is not None and (isinstance(dense_steps, bool) or not 0 <= dense_steps < 1):
        raise ValueError(f"dense_steps is a fraction of the denoising steps in [0, 1), got {dense_steps!r}")
    expanded = []
    for c in candidates:
        expanded.extend(ladder(c) if ladders and isinstance(c, str) else [normalize_spec(c)])
    cand = sorted({spec_name(c): c for c in expanded}.values(), key=lambda c: spec_name(c))
    if not cand or any(c["kind"] == "dense" for c in cand):
        raise ValueError("candidates must be a non-empty list of sparse mask specs (dense is always the fallback)")
    if any("temperature" in c for c in cand):
        raise ValueError("candidates carry no temperature: give the temperatures to try as temperatures=(...), and "
                         "calibration keeps one per head only where it lowers that head's error")
    temps = []
    for t in temperatures:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"temperatures must be positive numbers (softmax logits are divided by them), got {t!r}")
        if float(t) != 1.0 and float(t) not in temps:
            temps.append(float(t))
    temps = tuple(sorted(temps))
    if run is None:
        if not hasattr(target, "transformer"):
            raise ValueError("a bare transformer needs run=callable(transformer, prompt_index)")
        items = calibration_prompts(target, transformer, prompts, prompt_embeds)
        if prompt_embeds is not None:
            _check_embeds("negative_prompt_embeds", [negative_prompt_embeds] if negative_prompt_embeds is not None else [],
                          transformer)
            if negative_prompt_embeds is None:
                cfg = pipe_kwargs.get("guidance_scale")
                if cfg is not None and cfg > 1:
                    raise ValueError(f"guidance_scale={cfg} needs negative_prompt_embeds when prompt_embeds are given "
                                     "(the pipeline cannot encode a negative prompt itself): pass negative_prompt_embeds, "
                                     "or guidance_scale=1.0 for no classifier-free guidance")
                if cfg is None:
                    warnings.warn("calibrating without classifier-free guidance (guidance_scale=1.0): no "
                                  "negative_prompt_embeds were given; pass them to calibrate with CFG", stacklevel=2)
                    pipe_kwargs["guidance_scale"] = 1.0

        run = pipeline_runner(items, prompt_embeds is not None, negative_prompt_embeds, num_inference_steps, seed,
                              pipe_kwargs)
        num_prompts = len(items) - (1 if global_budget is not None else 0)
        if num_prompts < 1:
            raise ValueError("global_budget holds out the last prompt: give at least two prompts")
    else:
        num_prompts = int(pipe_kwargs.pop("num_prompts", 1))
    steps = sample_step_indices(num_inference_steps, sample_steps)
    base = dense_plan(transformer, tile=tile, block=block, order=order)
    done: dict[str, Any] = {"records": [], "prompts_done": 0}
    ckpt = pathlib.Path(checkpoint) if checkpoint else None
    if ckpt is not None and ckpt.exists():
        try:
            done = json.loads(ckpt.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"calibration checkpoint {ckpt} is not valid JSON ({e}); remove it to start over") from None
        if (done.get("model") != model_fingerprint(transformer) or done.get("candidates") != cand
                or tuple(done.get("temperatures", ())) != temps):
            raise ValueError(f"checkpoint {ckpt} was made for another model, candidate set or temperatures; remove it to start over")
    measurer = MeasuringAttention(cand, set(steps), backend, sink_factor, temps)
    # A sparse plan already applied is put back afterwards.
    previous = next((m.processor for _, m in adapter_for(transformer).processor_modules(transformer)
                     if isinstance(m.processor, SparseAttnProcessor)), None)
    proc = apply(transformer, base, backend=backend, attention=measurer)
    if getattr(target, "scheduler", None) is not None:
        proc.bind(transformer, scheduler=target.scheduler)
    t0 = time.perf_counter()
    try:
        bar = tqdm(range(done["prompts_done"], num_prompts), desc="calibrating", disable=not progress,
                   initial=done["prompts_done"], total=num_prompts, unit="prompt")
        measurer.progress = bar if progress else None
        for i in bar:
            proc.reset()
            measurer.records = []
            with eager_measurement():  # compiled blocks run eagerly while measured (no recompiles)
                run(target, i)
            done["records"].extend(r.to_dict() for r in measurer.records)
            done["prompts_done"] = i + 1
            if ckpt is not None:
                ckpt.parent.mkdir(parents=True, exist_ok=True)
                ckpt.write_text(json.dumps({**done, "model": model_fingerprint(transformer), "candidates": cand,
                                             "temperatures": list(temps)}))
    finally:
        layout = proc.layout  # the grid calibrated on, before removing forgets it
        remove(transformer)
        if previous is not None:
            apply(transformer, previous.plan, backend=previous.backend, attention=previous.attention)

    def make_plan(budget):
        d = decide(done["records"], cand, base.num_layers, base.num_heads, num_inference_steps, budget,
                   temperatures=temps, target_density=target_density,
                   warmup_choices=WARMUP_CHOICES if dense_steps is None else (float(dense_steps),))
        metrics = {
            "error_budget": budget, "target_density": target_density, "candidates": [spec_name(c) for c in cand], "temperatures": list(temps),
            "sampled_steps": steps,
            "num_inference_steps": num_inference_steps, "prompts": num_prompts,
            "layout": layout.describe() if layout else None,
            "expected_attention_cost": d["expected_attention_cost"],
            "per_head": d["per_head"], "records": done["records"],
        }
        return SparsityPlan(heads=d["heads"], **base.layout_options(), dense_steps=d["dense_steps"], dense_layers=d["dense_layers"],
                            model=model_fingerprint(transformer), metrics=metrics)

    plan = make_plan(error_budget)
    if global_budget is not None:
        plan = _fit_global_budget(target, transformer, run, num_prompts, plan, make_plan, error_budget, global_budget)
    plan.metrics["seconds"] = round(time.perf_counter() - t0, 2)
    reasons = dense_reasons(plan)
    plan.metrics["dense_reasons"] = reasons
    if all(s["kind"] == "dense" for row in plan.heads for s in row):
        warnings.warn("calibration kept every head dense: " + "; ".join(reasons) + ". Raise error_budget, or "
                      "try other candidates (ladders=True searches each family's rungs)", stacklevel=3)
    return plan


def _output_tensor(out):
    """The tensor a pipeline or transformer call returned (latents, sample or frames)."""
    if isinstance(out, torch.Tensor):
        return out
    for name in ("frames", "sample", "images"):
        value = getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ValueError("global_budget needs run(...) to return a tensor (or an output with frames / sample)")


def _fit_global_budget(target, transformer, run, held_out, plan, make_plan, error_budget, global_budget,
                       shrink: float = 0.6, tries: int = 6):
    """Check the plan's end-to-end error on the held-out prompt ``held_out``; tighten the per-head
    budget (re-deciding from the same measurements) until the relative output error fits."""
    reference = _output_tensor(run(target, held_out)).float()
    budget = error_budget
    history = []
    for _ in range(tries):
        apply(target, plan)
        try:
            out = _output_tensor(run(target, held_out)).float()
        finally:
            remove(target)
        err = float((out - reference).norm() / reference.norm().clamp(min=1e-12))
        history.append({"head_budget": budget, "end_to_end_error": err,
                         "expected_attention_cost": plan.metrics["expected_attention_cost"]})
        if err <= global_budget:
            break
        budget *= shrink
        plan = make_plan(budget)
    else:
        plan = dense_plan(transformer, **plan.layout_options())  # nothing sparse fits: stay dense
        plan.metrics["records"] = []
    plan.metrics["global_budget"] = {"budget": global_budget, "held_out_prompt": held_out, "history": history}
    return plan
