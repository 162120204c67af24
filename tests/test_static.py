"""Static performance check on the CPU: the shipped kernels compile for every architecture users run
(sm_80 .. sm_120), with the launch-time specialization Triton gives their arguments, and the configs
their pruning keeps do not spill. These are compiler proxies, not speed (see benchmarks/bench_static.py)."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from sparse_vdit.ops import static

ROOT = pathlib.Path(__file__).resolve().parents[1]
TABLE = ROOT / "benchmarks" / "results" / "static_table.json"
ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90a", "sm_100a", "sm_120")
EXPECTED_MMA = {"sm_80": "mma.sync", "sm_86": "mma.sync", "sm_89": "mma.sync", "sm_90a": "wgmma",
                "sm_100a": "tcgen05", "sm_120": "mma.sync"}


@pytest.fixture(scope="module")
def live_rows(tmp_path_factory):
    """A live compile of the tiled kernel (bf16, head_dim 128, 64-token blocks) on every architecture."""
    out = tmp_path_factory.mktemp("static") / "static.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    code = ("import json, sys; from sparse_vdit.ops import static; rows = [];"
            "[rows.append(static.asdict(static.compile_row(*c))) for c in static.shipped_configs(('tiled',), "
            f"{ARCHS!r}, ('bf16',)) if c[3] == 128 and c[4] == 64];"
            f"open({str(out)!r}, 'w').write(json.dumps(rows))")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_the_tiled_kernel_compiles_without_spills_on_every_architecture(live_rows):
    assert {r["arch"] for r in live_rows} == set(ARCHS)
    for r in live_rows:
        assert r["stack_bytes"] == 0, f"{r['arch']} {r['config']} spills"
        assert r["mma"] == EXPECTED_MMA[r["arch"]], (r["arch"], r["mma"])
        assert r["smem_bytes"] <= static.SMEM_LIMIT[r["arch"]]
        # TMA where the hardware has it; elsewhere the descriptors lower to plain global loads.
        if r["arch"] in ("sm_90a", "sm_100a", "sm_120"):
            assert r["tma"] > 0, r
        else:
            assert r["tma"] == 0 and r["ld_global"] > 0, r


def test_the_static_signature_carries_launch_attributes():
    """Without ``tt.divisibility`` on aligned pointers and multiple-of-16 integers a compile is not what
    runs (it overstated the gather kernel's registers, 255 against 178)."""
    fn = static._kernel("gather").fn
    sig, consts, attrs = static._signature("gather", fn, "bf16", 128, 64, 64, 64)
    names = fn.arg_names
    assert attrs[(names.index("q"),)] == [["tt.divisibility", 16]]
    assert attrs[(names.index("stride_qn"),)] == [["tt.divisibility", 16]]  # H * D = 1536
    assert (names.index("N"),) not in attrs  # 32,760 tokens: not a multiple of 16
    assert consts[(names.index("stride_qd"),)] == 1


def test_committed_table_covers_every_architecture_and_no_shipped_config_spills():
    table = json.loads(TABLE.read_text())
    assert "no GPU ran" in table["device"]
    rows = table["rows"]
    assert {r["arch"] for r in rows} >= set(ARCHS)
    assert {r["kernel"] for r in rows} >= {"tiled", "mass", "bwd_dq", "bwd_dkdv"}
    bad = [(r["arch"], r["kernel"], r["config"]) for r in rows
           if r["shipped"] and (r["stack_bytes"] > 0 or r["mma"] == "none" or r["smem_bytes"] > static.SMEM_LIMIT[r["arch"]])]
    assert not bad, f"shipped configs that spill, lose tensor cores or overflow shared memory: {bad}"
