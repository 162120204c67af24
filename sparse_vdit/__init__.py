"""sparse_vdit: block-sparse attention for video diffusion transformers."""
from __future__ import annotations

import importlib.util as _ilu
import pathlib as _pathlib
import sys as _sys


def _alias_source_kernels() -> None:
    # Installed, `kernels/` is the subpackage sparse_vdit.kernels (setuptools package-dir). Run from a
    # source checkout on PYTHONPATH, it sits beside this package: register it under the same name.
    if "sparse_vdit.kernels" in _sys.modules or (_pathlib.Path(__file__).parent / "kernels").is_dir():
        return
    src = _pathlib.Path(__file__).resolve().parent.parent / "kernels" / "__init__.py"
    if not src.is_file():
        return

    class _LazyFinder:
        # Import lazily: loading Triton is only needed when the Triton backend runs.
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name == "sparse_vdit.kernels":
                return _ilu.spec_from_file_location(name, src, submodule_search_locations=[str(src.parent)])
            return None

    _sys.meta_path.append(_LazyFinder)


_alias_source_kernels()

from . import masks, ops, plan, viz  # noqa: E402
from .integration import SparseAttnProcessor, apply, remove  # noqa: E402
from .calibration import calibrate  # noqa: E402
from .masks import VideoLayout  # noqa: E402
from .plan import SparsityPlan  # noqa: E402
from .ops import BlockSparseMask, block_sparse_attention, reference_attention  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BlockSparseMask",
    "SparseAttnProcessor",
    "SparsityPlan",
    "VideoLayout",
    "apply",
    "calibrate",
    "block_sparse_attention",
    "masks",
    "ops",
    "plan",
    "reference_attention",
    "remove",
    "viz",
    "__version__",
]
