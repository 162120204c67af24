"""``SparsityPlan``: per layer x head mask specs, dense steps and layers, tied to a model fingerprint."""
from __future__ import annotations

import copy
import json
import math
import pathlib
import warnings
from dataclasses import dataclass, field
from typing import Callable, Any, Sequence

from ..masks import normalize_spec, spec_name
from ..masks.layout import check_block, check_order, check_tile

PLAN_VERSION = 1
DENSE = {"kind": "dense"}
# Config keys that decide whether a plan fits a model: a mismatch in these is an error.
_STRUCTURAL_KEYS = ("num_layers", "num_attention_heads", "attention_head_dim", "num_single_layers")
# Keys recorded for a person to read, compared with a warning only.
_INFO_KEYS = ("patch_size", "patch_size_t", "in_channels", "out_channels", "text_dim", "ffn_dim",
              "cross_attn_norm", "sample_frames", "sample_height", "sample_width", "num_layers",
              "num_attention_heads", "attention_head_dim", "num_single_layers", "image_dim")


def model_fingerprint(model) -> dict[str, Any]:
    """Class name and the config values that matter (JSON-able)."""
    if isinstance(model, (tuple, list)):
        return {}
    cfg = dict(getattr(model, "config", {}) or {})
    keep = {}
    for k in dict.fromkeys(_STRUCTURAL_KEYS + _INFO_KEYS):
        if k in cfg:
            v = cfg[k]
            keep[k] = list(v) if isinstance(v, tuple) else v
    return {"class": type(model).__name__, "config": keep}


def _layers_heads(shape, what: str) -> tuple[int, int]:
    """(layers, heads) from a pair; a model is integration's business (sparse_vdit.dense_plan / uniform_plan)."""
    if isinstance(shape, (tuple, list)) and len(shape) == 2 and all(isinstance(x, int) and x > 0 for x in shape):
        return int(shape[0]), int(shape[1])
    if hasattr(shape, "config") or hasattr(shape, "forward"):
        raise TypeError(f"SparsityPlan.{what} takes (layers, heads); for a model use sparse_vdit.{what}_plan(model, ...)")
    raise ValueError(f"SparsityPlan.{what} takes (layers, heads) as two positive ints, got {shape!r}")


@dataclass
class SparsityPlan:
    """Which mask each (attention layer, head) uses, and when attention stays dense.

    heads: ``heads[layer][head]`` is a mask spec dict (``{"kind": "dense"}`` when dense).
    tile: (t, h, w) tile shape of the video layout (0: the whole axis); without ``block`` its volume
        is the kernel block size.
    dense_steps: the first denoising steps run dense: a count (int) or a fraction (float in [0, 1)).
    dense_layers: layers that always run dense (negative indices count from the end).
    model: the fingerprint of the model the plan was made for.
    metrics: free room for calibration measurements.
    block: the kernel block size when a tile spans several blocks (None: the tile volume).
    order: the layout's axis order, "fhw" (frame-major) or "hwf" (position-major).
    """

    heads: list[list[dict[str, Any]]]
    tile: tuple[int, int, int] = (1, 8, 8)
    dense_steps: int | float = 0
    dense_layers: list[int] = field(default_factory=list)
    model: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    version: int = PLAN_VERSION
    block: int | None = None
    order: str = "fhw"

    def __post_init__(self):
        if not self.heads or not all(isinstance(row, list) and row for row in self.heads):
            raise ValueError("heads must be a non-empty list (layers) of non-empty lists (heads) of specs")
        widths = {len(row) for row in self.heads}
        if len(widths) != 1:
            raise ValueError(f"every layer must list the same number of heads, got {sorted(widths)}")
        self.heads = [[normalize_spec(s) for s in row] for row in self.heads]
        try:
            if self.block is not None:
                check_block(self.block)
            self.tile = check_tile(tuple(self.tile) if isinstance(self.tile, (list, tuple)) else self.tile, self.block)
        except ValueError as e:
            raise ValueError(f"plan tile: {e}") from None
        try:
            check_order(self.order)
        except ValueError as e:
            raise ValueError(f"plan order: {e}") from None
        if isinstance(self.dense_steps, bool) or not isinstance(self.dense_steps, (int, float)):
            raise ValueError(f"dense_steps must be an int count or a float fraction in [0, 1), got {self.dense_steps!r}")
        if isinstance(self.dense_steps, float) and not 0.0 <= self.dense_steps < 1.0:
            raise ValueError(f"a fractional dense_steps must lie in [0, 1), got {self.dense_steps}")
        if isinstance(self.dense_steps, int) and self.dense_steps < 0:
            raise ValueError(f"dense_steps must be >= 0, got {self.dense_steps}")
        n = self.num_layers
        bad = [i for i in self.dense_layers if not -n <= int(i) < n]
        if bad:
            raise ValueError(f"dense_layers {bad} out of range for {n} layers (valid: {-n}..{n - 1})")
        self.dense_layers = sorted({int(i) % n for i in self.dense_layers})

    # ------------------------------------------------------------------ constructors
    @classmethod
    def dense(cls, shape: tuple[int, int], tile=(1, 8, 8), model: dict | None = None, block: int | None = None,
              order: str = "fhw") -> "SparsityPlan":
        """Every head of ``shape = (layers, heads)`` dense: with it a model computes exactly what the
        stock processors compute. ``model`` is a fingerprint to record (see ``sparse_vdit.dense_plan``)."""
        layers, heads = _layers_heads(shape, "dense")
        return cls([[dict(DENSE)] * heads for _ in range(layers)], tile=tile, model=dict(model or {}), block=block,
                   order=order)

    @classmethod
    def uniform(
        cls,
        shape: tuple[int, int],
        spec: str | dict,
        dense_steps: int | float = 0,
        dense_layers: Sequence[int] = (),
        tile=(1, 8, 8),
        model: dict | None = None,
        block: int | None = None,
        order: str = "fhw",
    ) -> "SparsityPlan":
        """The same mask spec on every head of every layer of ``shape = (layers, heads)``, except
        ``dense_layers``. For a model use ``sparse_vdit.uniform_plan(model, spec, ...)``."""
        layers, heads = _layers_heads(shape, "uniform")
        spec = normalize_spec(spec)
        return cls([[spec] * heads for _ in range(layers)], tile=tile, dense_steps=dense_steps,
                   dense_layers=list(dense_layers), model=dict(model or {}), block=block, order=order)

    def map_specs(self, fn: Callable[[dict[str, Any]], str | dict[str, Any]]) -> "SparsityPlan":
        """A copy whose every head spec is ``fn(spec)`` (normalized), everything else kept. For example
        ``plan.map_specs(sparse_vdit.masks.svg_attend)``: heads classified with Sparse VideoGen's
        selection masks then attend with its runtime masks, as SVG does."""
        out = copy.deepcopy(self)
        out.heads = [[normalize_spec(fn(copy.deepcopy(s))) for s in row] for row in self.heads]
        return out

    # ------------------------------------------------------------------ queries
    def layout_options(self) -> dict[str, Any]:
        """``tile``, ``block`` and ``order`` as ``VideoLayout`` keyword arguments."""
        return {"tile": tuple(self.tile), "block": self.block, "order": self.order}

    @property
    def num_layers(self) -> int:
        return len(self.heads)

    @property
    def num_heads(self) -> int:
        return len(self.heads[0])

    def head(self, layer: int, head: int) -> dict[str, Any]:
        """The spec of one head (``kind == "dense"`` when dense, also through ``dense_layers``)."""
        if not -self.num_layers <= layer < self.num_layers or not -self.num_heads <= head < self.num_heads:
            raise IndexError(f"(layer={layer}, head={head}) out of range for {self.num_layers} layers x {self.num_heads} heads")
        if layer % self.num_layers in self.dense_layers:
            return dict(DENSE)
        return copy.deepcopy(self.heads[layer][head])

    def layer_specs(self, layer: int) -> list[dict[str, Any]]:
        return [self.head(layer, h) for h in range(self.num_heads)]

    def layer_is_dense(self, layer: int) -> bool:
        return all(s["kind"] == "dense" for s in self.layer_specs(layer))

    def dense_step_count(self, num_steps: int | None) -> int:
        """How many of the first steps run dense; a fractional ``dense_steps`` needs ``num_steps``."""
        if isinstance(self.dense_steps, int):
            return self.dense_steps
        if self.dense_steps == 0.0:
            return 0
        if num_steps is None:
            raise ValueError(
                f"dense_steps={self.dense_steps} is a fraction of the denoising steps, but the number of steps "
                "is unknown: use sv.apply(pipe, plan) (it reads the scheduler), call "
                "processor.set_num_inference_steps(n), or give dense_steps as an int count"
            )
        return math.ceil(self.dense_steps * num_steps)

    def __repr__(self) -> str:
        """The short summary (``print(plan)``); the per-head measurements stay in ``plan.metrics``."""
        extra = f"\n  metrics: {len(self.metrics)} entries (plan.metrics)" if self.metrics else ""
        return self.summary() + extra

    def summary(self) -> str:
        """A few lines: model, shape, layout, dense steps / layers / heads, and the masks used."""
        kinds: dict[str, int] = {}
        for layer in range(self.num_layers):
            for s in self.layer_specs(layer):
                kinds[spec_name(s)] = kinds.get(spec_name(s), 0) + 1
        total = self.num_layers * self.num_heads
        dense_heads = sum(v for k, v in kinds.items() if k == "dense")
        lines = [
            f"SparsityPlan v{self.version} for {self.model.get('class', '?')}: {self.num_layers} layers x {self.num_heads} heads, "
            f"tile {'x'.join(map(str, self.tile))}" + (f", block {self.block}" if self.block else "")
            + (f", {self.order} order" if self.order != "fhw" else ""),
            f"  dense steps: {self.dense_steps}; dense layers: {self.dense_layers or 'none'}; "
            f"dense heads: {dense_heads}/{total}",
            "  masks: " + ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])),
        ]
        return "\n".join(lines)

    # ------------------------------------------------------------------ model check
    def check_fits(self, fingerprint: dict[str, Any], layers: int, heads: int) -> None:
        """Raise ValueError if the plan does not fit a model with this fingerprint and ``layers`` x
        ``heads`` sparse-eligible attention; warn on other config differences. (Integration counts a
        model's layers and heads: ``sparse_vdit.integration.check_plan``.)"""
        problems = []
        if self.model.get("class") and self.model["class"] != fingerprint.get("class"):
            problems.append(f"model class: plan {self.model['class']}, model {fingerprint.get('class')}")
        if layers != self.num_layers:
            problems.append(f"attention layers: plan {self.num_layers}, model {layers}")
        if heads != self.num_heads:
            problems.append(f"heads per layer: plan {self.num_heads}, model {heads}")
        pc, mc = self.model.get("config", {}), fingerprint.get("config", {})
        for k in _STRUCTURAL_KEYS:
            if k in pc and k in mc and pc[k] != mc[k]:
                problems.append(f"config {k}: plan {pc[k]}, model {mc[k]}")
        if problems:
            raise ValueError("this plan does not fit the model: " + "; ".join(problems))
        diffs = [k for k in pc if k in mc and pc[k] != mc[k]]
        if diffs:
            warnings.warn(f"plan was made for a model whose config differs in {diffs}; masks still apply", stacklevel=3)

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "sparse_vdit.SparsityPlan",
            "version": self.version,
            "model": self.model,
            "tile": list(self.tile),
            **({"block": self.block} if self.block is not None else {}),
            **({"order": self.order} if self.order != "fhw" else {}),
            "dense_steps": self.dense_steps,
            "dense_layers": self.dense_layers,
            "heads": self.heads,
            "metrics": self.metrics,
        }

    def save(self, path: str | pathlib.Path) -> pathlib.Path:
        """Write the plan as JSON: one line per layer for the heads (and for per-head calibration
        results), so a person can read and diff it. Raw calibration records (``metrics["records"]``,
        large at real sizes) are left out; ``sparse_vdit.calibration.save_report`` writes them."""
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        d = self.to_dict()
        metrics = {k: v for k, v in d["metrics"].items() if k != "records"}
        per_head = metrics.pop("per_head", None)
        top = {k: v for k, v in d.items() if k not in ("heads", "metrics")}
        lines = ["{"] + [f" {json.dumps(k)}: {json.dumps(v)}," for k, v in top.items()]
        if per_head:
            lines.append(f' "metrics": {json.dumps(metrics)[:-1]}{", " if metrics else ""}"per_head": [')
        else:
            lines.append(f' "metrics": {json.dumps(metrics)},')
        if per_head:
            lines.append(",\n".join("  " + json.dumps(row) for row in per_head))
            lines.append(" ]},")
        lines.append(' "heads": [')
        lines.append(",\n".join("  " + json.dumps(row) for row in d["heads"]))
        lines.append(" ]\n}")
        path.write_text("\n".join(lines) + "\n")
        return path

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SparsityPlan":
        if not isinstance(d, dict) or d.get("format") != "sparse_vdit.SparsityPlan":
            raise ValueError("not a sparse_vdit plan (missing \"format\": \"sparse_vdit.SparsityPlan\")")
        version = d.get("version")
        if version != PLAN_VERSION:
            raise ValueError(f"plan version {version!r} is not supported by this sparse_vdit (reads version {PLAN_VERSION})")
        missing = [k for k in ("heads", "tile") if k not in d]
        if missing:
            raise ValueError(f"plan is missing {missing}")
        return cls(heads=d["heads"], tile=tuple(d["tile"]), dense_steps=d.get("dense_steps", 0),
                   dense_layers=list(d.get("dense_layers", [])), model=d.get("model", {}),
                   metrics=d.get("metrics", {}), version=version, block=d.get("block"), order=d.get("order", "fhw"))

    @classmethod
    def load(cls, path: str | pathlib.Path) -> "SparsityPlan":
        path = pathlib.Path(path)
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        return cls.from_dict(d)
