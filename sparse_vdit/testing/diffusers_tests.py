"""A pytest plugin that runs diffusers' own model tests with sparse_vdit applied.

diffusers' test files build their transformers from a config (``self.model_class(**init_dict)``),
so the plugin wraps the constructors of the five video transformers: every instance gets a plan
applied as it is built (``--sparse-vdit dense`` or ``sparse``; ``off``, the default, changes
nothing). The stock run and the applied run of the same files then show what applying changes::

    # from a checkout of diffusers at the installed version (its tests/ folder)
    RUN_COMPILE=yes python -m pytest -p sparse_vdit.testing.diffusers_tests --sparse-vdit sparse \\
        --sparse-vdit-on-cpu -m compile tests/models/transformers/test_models_transformer_wan.py

``--sparse-vdit-on-cpu`` lets the tests diffusers marks "requires a hardware accelerator" run on the
CPU too (its compile tests are marked so; inductor compiles for the CPU). The session summary
reports how many block-sparse calls ran (counted where the op executes, so compiled graphs count
too): a sparse run with none would prove nothing.

The sparse plan is ``sliding_tile`` with window (1, 1, 1), each tile its own keys, on (1, 4, 4)
tiles (the smallest a plan takes): the test models' grids are tiny (e.g. Wan's 2 x 8 x 8 tokens, 8
tiles), and a wider window would cover every key.
"""
from __future__ import annotations

import contextlib
import functools

import pytest

FAMILY_CLASSES = ("WanTransformer3DModel", "HunyuanVideoTransformer3DModel", "CogVideoXTransformer3DModel",
                  "LTXVideoTransformer3DModel", "MochiTransformer3DModel")
SPARSE_SPEC = {"kind": "sliding_tile", "window": [1, 1, 1]}
TILE = (1, 4, 4)
ACCELERATOR_REASON = "test requires a hardware accelerator"

_COUNTS = {"models": 0, "calls": [0]}  # calls: the session's count_sparse_forwards counter
_COUNTER: list = []
_PER_TEST: dict[str, int] = {}  # test id -> block-sparse forwards it ran


def pytest_addoption(parser):
    group = parser.getgroup("sparse_vdit")
    group.addoption("--sparse-vdit", choices=("off", "dense", "sparse"), default="off",
                    help="apply a plan to every video transformer the tests build (default: off)")
    group.addoption("--sparse-vdit-on-cpu", action="store_true",
                    help="run tests marked as needing an accelerator on the CPU")


def pytest_configure(config):
    which = config.getoption("--sparse-vdit")
    if which == "off":
        return
    import diffusers

    import sparse_vdit as sv
    from sparse_vdit.testing.counting import count_sparse_forwards

    for name in FAMILY_CLASSES:
        cls = getattr(diffusers, name)
        init = cls.__init__
        if getattr(init, "_sparse_vdit_wrapped", False):
            continue

        @functools.wraps(init)
        def wrapped(self, *args, __init=init, **kwargs):
            __init(self, *args, **kwargs)
            if type(self).__name__ not in FAMILY_CLASSES:  # a subclass with a model of its own
                return
            plan = sv.dense_plan(self, tile=TILE) if which == "dense" else \
                sv.uniform_plan(self, SPARSE_SPEC, tile=TILE)
            sv.apply(self, plan)
            _COUNTS["models"] += 1

        wrapped._sparse_vdit_wrapped = True
        cls.__init__ = wrapped

    # Block-sparse forwards counted where they execute (any backend, inside compiled graphs too),
    # for the whole session.
    _COUNTER.append(contextlib.ExitStack())
    _COUNTS["calls"] = _COUNTER[0].enter_context(count_sparse_forwards())


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Before pytest's own skip evaluation: drop diffusers' accelerator-only skip marks along the item's chain."""
    if not item.config.getoption("--sparse-vdit-on-cpu"):
        return
    for node in item.listchain():
        node.own_markers[:] = [m for m in node.own_markers
                               if not (m.name == "skipif" and m.kwargs.get("reason") == ACCELERATOR_REASON)]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    before = _COUNTS["calls"][0]
    yield
    _PER_TEST[item.nodeid] = _COUNTS["calls"][0] - before


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    which = config.getoption("--sparse-vdit")
    if which == "off":
        return
    terminalreporter.write_line(
        f"sparse_vdit: {which} plan applied to {_COUNTS['models']} models; block-sparse forwards run: "
        f"{_COUNTS['calls'][0]}")
    for nodeid, n in _PER_TEST.items():
        terminalreporter.write_line(f"sparse_vdit: {n:4d} block-sparse forwards in {nodeid}")
