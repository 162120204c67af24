"""Run the peers' own mask code, from checkouts the user points at, and count its token pairs exactly.

Nothing of the peers is copied here: each mask function is imported from the user's checkout
(``--peer-src DIR`` holding ``radial-attention/``, ``Sparse-VideoGen/`` and ``FastVideo/``). Their
CUDA-only imports (flashinfer, SageAttention, ...) are replaced by inert stand-ins while the module
loads, and ``Tensor.cuda`` returns the tensor itself while their mask builders run, so their logic
runs unchanged on the CPU. Each peer's mask becomes a joint count matrix over our video blocks
(``peers.count_pairs``: every video token pair evaluated, a chunk of queries at a time), from which
recall and density follow exactly.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import math
import os
import pathlib
import subprocess
import sys
import types

import torch

from sparse_vdit.masks import peers
from sparse_vdit.masks.layout import VideoLayout

REPOS = {"radial_attn": "radial-attention", "svg": "Sparse-VideoGen", "sta": "FastVideo"}
FILES = {
    "radial_attn": "radial_attn/attn_mask.py",
    "svg_wan": "svg/models/wan/utils.py",
    "svg_hunyuan": "svg/models/hyvideo/utils.py",
    "svg_placement": "svg/models/wan/placement.py",
    "sta": "fastvideo-kernel/tests/support_flex_sta.py",
}
# modules the peers import for their CUDA kernels or logging, absent here
_STUBBED = ("flashinfer", "sparse_sageattn", "sageattention", "spas_sage_attn", "einops", "termcolor", "loguru")


class _Inert(types.ModuleType):
    """A stand-in module: every attribute is a do-nothing callable."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda *a, **k: None


def commit(checkout: pathlib.Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


@contextlib.contextmanager
def _stubs(packages: dict[str, str] | None = None):
    """Inert stand-ins for the modules in ``_STUBBED`` that are not installed, and empty parent
    packages (``packages``: dotted name -> directory) so a peer's relative imports resolve."""
    added = []
    for name in _STUBBED:
        if name not in sys.modules and importlib.util.find_spec(name) is None:
            sys.modules[name] = _Inert(name)
            added.append(name)
    for name, path in (packages or {}).items():
        if name not in sys.modules:
            mod = types.ModuleType(name)
            mod.__path__ = [path]
            sys.modules[name] = mod
            added.append(name)
    try:
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)


@contextlib.contextmanager
def _cpu_only():
    """``Tensor.cuda`` and ``torch.cuda.memory_allocated`` harmless, and the peer's prints kept quiet."""
    cuda, allocated = torch.Tensor.cuda, torch.cuda.memory_allocated
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.cuda.memory_allocated = lambda *a, **k: 0
    try:
        with _stubs(), contextlib.redirect_stdout(io.StringIO()):  # some import inside their functions
            yield
    finally:
        torch.Tensor.cuda, torch.cuda.memory_allocated = cuda, allocated


def load(path: pathlib.Path, name: str, packages: dict[str, str] | None = None, env: dict[str, str] | None = None):
    """Import the file at ``path`` as module ``name`` with the stand-ins in place."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --peer-src must hold the peer's checkout "
                                f"(see benchmarks/bench_peers.py)")
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        with _stubs(packages):
            spec = importlib.util.spec_from_file_location(name, path)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod
            with contextlib.redirect_stdout(io.StringIO()):
                spec.loader.exec_module(mod)
            return mod
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class PeerSource:
    """The peers' mask functions, loaded from ``root`` (a directory of checkouts)."""

    def __init__(self, root: str | os.PathLike, compile: bool = True):
        self.root = pathlib.Path(root)
        self.compile = compile  # fuse the mask_mod evaluations (torch.compile, CPU)
        self._mods: dict[str, types.ModuleType] = {}

    def checkout(self, peer: str) -> pathlib.Path:
        return self.root / REPOS[peer]

    def has(self, peer: str) -> bool:
        return self.checkout(peer).is_dir()

    def commit(self, peer: str) -> str:
        return commit(self.checkout(peer))

    def module(self, key: str):
        if key not in self._mods:
            peer = "svg" if key.startswith("svg") else key
            base = self.checkout(peer)
            path = base / FILES[key]
            if key == "svg_hunyuan":  # imports a constant from diffusers: load it before the stand-ins exist
                importlib.import_module("diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video")
            if key.startswith("svg"):
                pkg = "svg.models." + ("wan" if key in ("svg_wan", "svg_placement") else "hyvideo")
                packages = {"svg": str(base / "svg"), "svg.models": str(base / "svg/models"),
                            pkg: str(path.parent)}
                logger = types.ModuleType("svg.logger")
                logger.logger = _Inert("logger")
                sys.modules.setdefault("svg.logger", logger)
                # the placement kernel is Triton: run it in the interpreter, on the CPU
                env = {"TRITON_INTERPRET": "1"} if key == "svg_placement" else None
                self._mods[key] = load(path, f"{pkg}.{path.stem}", packages, env)
            else:
                self._mods[key] = load(path, f"_peer_{key}")
        return self._mods[key]

    # ------------------------------------------------------------------ each peer's mask as joint counts
    def radial(self, layout: VideoLayout, variant: str, decay_factor: float, block: int) -> torch.Tensor:
        """``gen_log_mask_shrinked`` on the video padded to whole blocks (as the peer's own ``__main__``)."""
        mod = self.module("radial_attn")
        S, F = layout.height * layout.width, layout.frames
        N = S * F
        padded = -(-N // block) * block
        with _cpu_only():
            blocks = mod.gen_log_mask_shrinked(torch.zeros(1), padded, N, F, block_size=block, sparse_type="radial",
                                               decay_factor=decay_factor, model_type=variant)
        return peers.count_block_pairs(layout, torch.arange(N) // block, blocks.cpu())

    def svg_order(self, layout: VideoLayout) -> torch.Tensor:
        """The position in SVG's sequence of each raster video token of a temporal head, found by
        running its placement kernel (Triton interpreter) on token ids."""
        mod = self.module("svg_placement")
        S, F = layout.height * layout.width, layout.frames
        N = S * F
        ids = torch.arange(N, dtype=torch.float32).view(1, 1, N, 1).expand(1, 1, N, 16).contiguous()
        outs = [torch.zeros_like(ids) for _ in range(3)]
        saved = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            mod.wan_sparse_head_placement(ids, ids, ids, *outs, torch.ones(1, 1, dtype=torch.int32), 0, F, S)
        finally:
            if saved is None:
                os.environ.pop("TRITON_INTERPRET")
            else:
                os.environ["TRITON_INTERPRET"] = saved
        where = torch.empty(N, dtype=torch.long)
        where[outs[0][0, 0, :, 0].long()] = torch.arange(N)
        return where

    def svg_attend(self, layout: VideoLayout, variant: str, sparsity: float, temporal: bool) -> torch.Tensor:
        """The flex ``mask_mod`` SVG attends with, its width from SVG's ``sparsity_to_width``."""
        mod = self.module("svg_wan" if variant == "wan" else "svg_hunyuan")
        S, F = layout.height * layout.width, layout.frames
        context = peers.SVG_CONTEXT[variant]
        mul = mod.sparsity_to_width(sparsity, context, F, S)
        mask_mod = mod.generate_temporal_head_mask_mod(context, context, F, S, mul)
        seq = self.svg_order(layout) if temporal else torch.arange(S * F)
        return peers.count_pairs(layout, lambda q, k: mask_mod(0, 0, q, k), seq, compile=self.compile)

    def svg_select(self, layout: VideoLayout, variant: str, temporal: bool) -> torch.Tensor:
        """``get_attention_mask``, the mask SVG classifies heads with (it builds the whole N x N mask)."""
        mod = self.module("svg_wan" if variant == "wan" else "svg_hunyuan")
        S, F = layout.height * layout.width, layout.frames
        N = S * F
        context = peers.SVG_CONTEXT[variant]
        kw = {} if variant == "wan" else {"device": "cpu"}
        with _cpu_only():
            full = mod.get_attention_mask("temporal" if temporal else "spatial", N + context, context, F, S, **kw)
        video = full[:N, :N].bool()
        del full
        return peers.count_pairs(layout, lambda q, k: video[q, k], torch.arange(N))

    def sta(self, layout: VideoLayout, window, tile) -> torch.Tensor:
        """FastVideo's flex ``sta_mask_3d`` on the canvas padded to whole tiles (FastVideo runs three canvases
        that tiles divide; on others the padding is ours)."""
        mod = self.module("sta")
        F, H, W = layout.frames, layout.height, layout.width
        canvas = [math.ceil(n / t) * t for n, t in zip((F, H, W), tile)]
        mask_mod = mod.generate_sta_mask(canvas, list(window), list(tile), 0)
        v = torch.arange(F * H * W)
        f, h, w = v // (H * W), (v // W) % H, v % W
        n = [c // t for c, t in zip(canvas, tile)]
        tile_id = ((f // tile[0]) * n[1] + h // tile[1]) * n[2] + w // tile[2]
        offset = ((f % tile[0]) * tile[1] + h % tile[1]) * tile[2] + w % tile[2]
        seq = tile_id * (tile[0] * tile[1] * tile[2]) + offset
        return peers.count_pairs(layout, lambda q, k: mask_mod(0, 0, q, k), seq, compile=self.compile)
