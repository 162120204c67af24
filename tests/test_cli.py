"""The command line runs end to end (the demo is exercised by the README's demo command)."""
import subprocess
import sys

import sparse_vdit as sv
from sparse_vdit.cli import main


def test_inspect_mask_and_plan(tmp_path, capsys):
    assert main(["inspect", "--mask", "radial", "--grid", "4,8,8", "--tile", "1,4,4", "--png", str(tmp_path / "m.png")]) == 0
    out = capsys.readouterr().out
    assert "radial(d=1): density 0.8750" in out and (tmp_path / "m.png").exists()
    plan = sv.SparsityPlan(heads=[[{"kind": "temporal"}, {"kind": "dense"}]] * 2, tile=(1, 4, 4), dense_layers=[1])
    plan.save(tmp_path / "p.json")
    assert main(["inspect", str(tmp_path / "p.json"), "--grid", "4,8,8"]) == 0
    out = capsys.readouterr().out
    assert "dense heads 2/2" in out and "average density" in out


def test_bench_kernel_smoke_on_cpu(tmp_path, monkeypatch):
    """The benchmark harness runs (torch backend, tiny shapes); CPU results are not performance and
    are written to a temporary folder."""
    from sparse_vdit.cli import benchmarks_module

    bench = benchmarks_module("bench_kernel")
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    monkeypatch.setattr(bench, "QUICK_SHAPES", {"tiny": (1, 2, 256, 64)})
    base = bench.main(["--quick", "--dtype", "float32", "--densities", "1.0", "0.25", "--reps", "3", "--no-flex",
                       "--block", "32", "--backend", "torch"])
    text = base.with_suffix(".json").read_text()
    assert '"device": "cpu' in text and '"density": 0.25' in text


def test_console_script_help():
    r = subprocess.run([sys.executable, "-m", "sparse_vdit.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "demo" in r.stdout


def test_bench_e2e_tiny_smoke(tmp_path):
    """The end-to-end benchmark harness runs on a tiny model (CPU timings are not performance)."""
    import json

    from sparse_vdit.cli import benchmarks_module

    bench = benchmarks_module("bench_e2e")
    out = bench.main(["--tiny", "--reps", "1", "--steps", "10", "--out", str(tmp_path / "e2e.json")])
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["model"] == "tiny-wan" and 0 < rows[0]["avg_density"] <= 1
    assert rows[0]["dense_layers"] == [1] and rows[0]["schedule_dense_warmup"] == 2


def test_calibrate_cli_tiny(tmp_path, capsys):
    assert main(["calibrate", "--tiny", "--steps", "2", "--candidates", "temporal", "--error-budget", "0.3",
                 "--out", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    assert "calibrated in" in out and (tmp_path / "plan_report" / "heatmap.png").exists()
    plan = sv.SparsityPlan.load(tmp_path / "plan.json")
    assert plan.metrics["per_head"] and plan.model["class"] == "WanTransformer3DModel"
    assert main(["inspect", str(tmp_path / "plan.json"), "--grid", "8,16,16"]) == 0


import pytest  # noqa: E402


@pytest.mark.parametrize("family", ["hunyuan_video", "cogvideox", "ltx_video", "mochi"])
def test_calibrate_cli_tiny_families(family, tmp_path, capsys):
    assert main(["calibrate", "--tiny", family, "--steps", "2", "--candidates", "temporal",
                 "--out", str(tmp_path / "plan.json")]) == 0
    plan = sv.SparsityPlan.load(tmp_path / "plan.json")
    assert plan.metrics["per_head"] and (tmp_path / "plan_report" / "sinks.png").exists()
    import json

    records = json.loads((tmp_path / "plan_report" / "measurements.json").read_text())["records"]
    assert records and {"errors", "sink_frames", "mass_inside"} <= set(records[0])
    assert "calibrated in" in capsys.readouterr().out


def test_bench_calibration_tiny_smoke(tmp_path):
    import json

    from sparse_vdit.cli import benchmarks_module

    out = benchmarks_module("bench_calibration").main(["--tiny", "--out", str(tmp_path / "c.json")])
    row = json.loads(out.read_text())["rows"][0]
    assert row["calibration_s"] > 0 and row["model"] == "tiny-wan"


def test_the_command_line_keeps_optional_packages_import_noise_quiet():
    """With torchao installed (a test dependency), importing diffusers' pipelines logs torchao's
    failed C++ extension loads and diffusers' note on moved torchao types: the command line, which
    uses neither, quiets those loggers before anything imports them."""
    pytest.importorskip("torchao")
    code = ("from sparse_vdit.cli import _quiet_optional_imports; _quiet_optional_imports(); "
            "from sparse_vdit.testing import shapes; shapes.learned_wan_pipeline(); print('loaded')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "loaded" in run.stdout, run.stderr
    for noise in ("Failed to load", "Unable to import `torchao`", "register_constant"):
        assert noise not in run.stderr, run.stderr


def test_calibrate_cli_with_the_dynamic_family_and_temperatures(tmp_path, capsys):
    assert main(["calibrate", "--tiny", "--steps", "2", "--candidates", "dynamic,temporal", "--temperatures", "1.25",
                 "--error-budget", "0.6", "--out", str(tmp_path / "plan.json")]) == 0
    plan = sv.SparsityPlan.load(tmp_path / "plan.json")
    assert plan.metrics["temperatures"] == [1.25] and "dynamic(k=4,w=1,1,1)" in plan.metrics["candidates"]
    import json

    records = json.loads((tmp_path / "plan_report" / "measurements.json").read_text())["records"]
    assert any(o.endswith("/T1.25") for o in records[0]["options"])
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "plan.json"), "--grid", "8,16,16"]) == 0
    assert any(s["kind"] == "dynamic" for row in plan.heads for s in row)  # at this loose budget it is chosen
    assert "dynamic heads: their key blocks are selected per call" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["calibrate", "--tiny", "--temperatures", "hot", "--out", str(tmp_path / "x.json")])
