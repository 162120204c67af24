"""Static performance check on the CPU: every shipped kernel config compiles for sm_90a without
register spills and with tensor-core (wgmma) instructions; the tiled kernel uses 128-row query tiles
at head_dim 128 and TMA. These are compiler proxies, not speed (see benchmarks/bench_static.py)."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TABLE = ROOT / "benchmarks" / "results" / "static_sm90.json"


@pytest.fixture(scope="module")
def shipped_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("static") / "static.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    done = subprocess.run([sys.executable, "-m", "sparse_vdit.ops.static", "--kernels", "tiled,mass", "--json",
                           str(out)], env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())["rows"]


def test_no_shipped_config_spills_or_loses_tensor_cores(shipped_rows):
    assert shipped_rows and all(r["shipped"] for r in shipped_rows)
    spills = [(r["kernel"], r["config"], r["stack_bytes"]) for r in shipped_rows if r["stack_bytes"] > 0]
    no_mma = [(r["kernel"], r["config"]) for r in shipped_rows if r["wgmma"] == 0]
    assert not spills, f"shipped configs that spill: {spills}"
    assert not no_mma, f"shipped configs without wgmma: {no_mma}"


def test_tiled_kernel_uses_128_row_tiles_and_tma(shipped_rows):
    tiled = [r for r in shipped_rows if r["kernel"] == "tiled"]
    d128 = [r for r in tiled if " D128 " in r["config"]]
    assert d128 and all("rows128" in r["config"] for r in d128)
    assert all(r["tma"] > 0 for r in tiled)


def test_committed_table_holds_old_and_new_kernels_side_by_side():
    rows = json.loads(TABLE.read_text())["rows"]
    kernels = {r["kernel"] for r in rows}
    assert {"tiled", "gather", "gather_ordered", "mass"} <= kernels
    assert not [r for r in rows if r["shipped"] and (r["stack_bytes"] > 0 or r["wgmma"] == 0)]
