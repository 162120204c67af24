"""What a new user meets in the first hour (issue 22): short reprs, reasons for dense heads, one
name per meaning across the command line, inspect refusing what it cannot honour, progress on long
work, and errors that name the cause."""
import argparse

import pytest
import torch

import sparse_vdit as sv
from sparse_vdit.cli import build_parser, main

SUBCOMMANDS = ("demo", "calibrate", "analyze", "edit", "inspect")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_plan_repr_is_the_short_summary():
    plan = sv.SparsityPlan.uniform((30, 12), "radial")
    plan.metrics = {"records": [{"x": list(range(1000))}] * 200, "per_head": [[{"a": 1}] * 12] * 30}
    text = repr(plan)
    assert len(text) < 600 and text.startswith(plan.summary()) and "plan.metrics" in text
    assert str(plan) == text


def test_calibration_says_why_heads_stay_dense(capsys, tmp_path):
    with pytest.warns(UserWarning, match="kept every head dense"):
        assert main(["calibrate", "--tiny", "cogvideox", "--steps", "2", "--out", str(tmp_path / "tiny.json")]) == 0
    out = capsys.readouterr().out
    assert "4/4 heads dense:" in out and "the grid is small" in out, out


def test_dense_reasons_name_the_best_candidate_and_its_error():
    per_head = [[{"reason": "best candidate error 0.31 > budget 0.05 (sliding_tile(3,3,3))",
                  "best_option": "sliding_tile(3,3,3)", "worst_error_by_option": {"sliding_tile(3,3,3)": 0.31}}] * 3,
                [{"reason": None}] * 3]
    plan = sv.SparsityPlan.uniform((2, 3), "radial")
    plan.metrics = {"per_head": per_head, "error_budget": 0.05}
    assert sv.calibration.dense_reasons(plan) == [
        "3/6 heads dense: best candidate error 0.31 (median) > budget 0.05 (sliding_tile(3,3,3))"]


def test_steps_means_denoising_steps_in_every_command():
    subs = _subparsers(build_parser())
    for name in ("demo", "calibrate", "analyze", "edit"):
        actions = {a.dest: a for a in subs[name]._actions}
        assert "denoising steps" in actions["steps"].help, name
        assert "num_steps" not in actions, name
    assert "transfer" in {a.dest: a for a in subs["edit"]._actions}["transfer_steps"].help


def test_help_never_prints_default_none_and_bench_lines_are_sentences(capsys):
    parser = build_parser()
    subs = _subparsers(parser)
    for name in SUBCOMMANDS:
        assert "(default: None)" not in subs[name].format_help(), name
    bench = _subparsers(subs["bench"])
    for kind, sub in bench.items():
        assert "(default: None)" not in sub.format_help(), kind
    action = next(a for a in subs["bench"]._actions if isinstance(a, argparse._SubParsersAction))
    assert len(action._choices_actions) == len(bench)
    for choice in action._choices_actions:
        assert choice.help.rstrip().endswith((".", ")")), (choice.dest, choice.help)


@pytest.mark.parametrize("argv,message", [
    (["inspect", "PLAN", "--mask", "radial"], "not both"),
    (["inspect", "PLAN"], "records no calibration grid"),
    (["inspect", "PLAN", "--grid", "3,8,8", "--ulysses", "0"], "--ulysses goes with a plan and must be >= 1"),
    (["inspect", "--mask", "radial", "--ulysses", "2"], "--ulysses goes with a plan, not with --mask"),
])
def test_inspect_refuses_what_it_cannot_honour(argv, message, tmp_path, capsys):
    plan = sv.SparsityPlan.uniform((2, 2), "radial", tile=(1, 4, 4))  # hand-written: no calibration grid
    path = plan.save(tmp_path / "plan.json")
    argv = [str(path) if a == "PLAN" else a for a in argv]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    captured = capsys.readouterr()
    assert exc.value.code == 2 and message in captured.err, captured.err
    assert captured.out == ""  # refused before printing anything


def test_inspect_uses_the_grid_a_calibrated_plan_records(tmp_path, capsys):
    plan = sv.SparsityPlan.uniform((2, 2), "radial", tile=(1, 4, 4))
    plan.metrics = {"layout": sv.VideoLayout(3, 8, 12, tile=(1, 4, 4), text_len=5).describe()}
    path = plan.save(tmp_path / "plan.json")
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "grid 3x8x12 tokens" in out and "calibrated on" in out and ", text 5 " in out, out


def test_calibration_reports_progress_and_keeps_the_pipeline_bar_off(capsys):
    from sparse_vdit.testing import tiny_wan_pipeline

    pipe = tiny_wan_pipeline()
    g = torch.Generator().manual_seed(0)
    embeds = [torch.randn(1, 16, 64, generator=g)]
    sv.calibrate(pipe, prompt_embeds=embeds, negative_prompt_embeds=torch.randn(1, 16, 64, generator=g), height=64,
                 width=64, num_frames=5, num_inference_steps=2, candidates=["temporal"], tile=(1, 4, 4),
                 guidance_scale=5.0)
    err = capsys.readouterr().err
    assert "calibrating" in err and "step 2" in err, err  # one bar, with the step being measured
    assert err.count("it/s]") == 0, err  # the pipeline's own per-step bar stayed off
    assert not pipe._progress_bar_config.get("disable", False)  # and is back as it was


def test_swapped_axes_and_a_wrong_grid_are_named():
    layout = sv.VideoLayout(frames=2, height=8, width=8, tile=(1, 4, 4))
    mask = sv.masks.build({"kind": "sliding_tile", "window": [3, 3, 3]}, layout, heads=2)
    q = torch.randn(1, layout.seq_len, 2, 32)  # [B, N, H, D]
    with pytest.raises(ValueError, match=r"looks like \[B, N, H, D\].*transpose\(1, 2\)"):
        sv.block_sparse_attention(q, q, q, mask, token_order=layout.token_order(), backend="torch")
    with pytest.raises(ValueError, match=r"looks like \[B, N, H, D\]"):
        sv.block_sparse_attention(q, q, q, sv.masks.build("dense", sv.VideoLayout(2, 8, 8, tile=(0, 0, 0), block=16),
                                                         heads=2), token_order=None, backend="torch")
    right = q.transpose(1, 2)
    with pytest.raises(ValueError) as e:  # a genuinely wrong length gets no axis hint
        sv.block_sparse_attention(right[:, :, :100], right[:, :, :100], right[:, :, :100], mask,
                                  token_order=layout.token_order(), backend="torch")
    assert "looks like" not in str(e.value)


def test_wrong_sequence_length_names_the_grid():
    from sparse_vdit.testing import make

    model, call = make("wan")
    proc = sv.apply(model, sv.uniform_plan(model, {"kind": "sliding_tile", "window": [1, 1, 1]}, tile=(1, 4, 4)))
    try:
        with torch.no_grad():
            call(model)
        slot = next(s for s in proc.binding(model).slots if s.groups is not None)
        q = torch.randn(1, slot.layout.seq_len + 4, 4, 32)
        with pytest.raises(ValueError, match=r"latent grid \d+x\d+x\d+ \(frames x height x width"):
            proc.attention.attend(q, q, q, slot)
    finally:
        sv.remove(model)
