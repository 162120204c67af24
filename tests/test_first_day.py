"""What a new user meets on the first day: saved checkpoints that load, and every mistake answered by
one clear error that names the value and what is valid (never a traceback from deep inside)."""
import gc
import json
import weakref

import pytest
import torch

import sparse_vdit as sv
from sparse_vdit.cli import main
from sparse_vdit.testing import FAMILIES, make, tiny_wan_pipeline, tiny_wan_transformer

COVER = {"kind": "sliding_tile", "window": [99, 99, 99]}


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("family", FAMILIES)
def test_saved_checkpoint_round_trip(family, tmp_path):
    """save_pretrained -> from_pretrained (needs accelerate, a declared dependency), then apply and
    calibrate on the loaded model."""
    model, call = make(family)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = type(model).from_pretrained(tmp_path / "ckpt").eval()
    saved, back = model.state_dict(), loaded.state_dict()
    assert saved.keys() == back.keys() and all(torch.equal(saved[k], back[k]) for k in saved)
    with torch.no_grad():
        ref = call(loaded, batch=1)
        assert _rel(ref, call(model, batch=1)) <= 1e-6
        sv.apply(loaded, sv.uniform_plan(loaded, COVER, tile=(1, 4, 4)))
        out = call(loaded, batch=1)
        sv.remove(loaded)
    assert _rel(out, ref) <= 1e-5

    def run(m, i):
        with torch.no_grad():
            for t in (900.0, 500.0):
                call(m, batch=1, t=t, seed=i)

    plan = sv.calibrate(loaded, run=run, num_prompts=1, num_inference_steps=2, candidates=["temporal"],
                        tile=(1, 4, 4), progress=False)
    assert (plan.num_layers, plan.num_heads) == sv.integration.attention_shape(loaded)


def test_wan_i2v_checkpoint_round_trip(tmp_path):
    m = tiny_wan_transformer(num_layers=2, image_dim=48, added_kv_proj_dim=128)
    m.save_pretrained(tmp_path / "i2v")
    loaded = type(m).from_pretrained(tmp_path / "i2v").eval()
    g = torch.Generator().manual_seed(0)
    x, e, img = torch.randn(1, 16, 3, 16, 16, generator=g), torch.randn(1, 512, 64, generator=g), torch.randn(1, 257, 48, generator=g)
    with torch.no_grad():
        ref = m(x, torch.tensor([900]), e, encoder_hidden_states_image=img).sample
        proc = sv.apply(loaded, sv.uniform_plan(loaded, COVER, tile=(1, 4, 4)))
        out = loaded(x, torch.tensor([900]), e, encoder_hidden_states_image=img).sample
        stats = proc.binding().stats
        sv.remove(loaded)
    assert stats["sparse"] == 2 and _rel(out, ref) <= 1e-5


@pytest.fixture(scope="module")
def saved_pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    tiny_wan_pipeline(text_encoder=True).save_pretrained(root / "with_text")
    tiny_wan_pipeline().save_pretrained(root / "no_text")
    return root


def test_saved_pipeline_calibrates_from_text_prompts(saved_pipelines):
    pipe = sv.integration.load_pipeline(str(saved_pipelines / "with_text"))
    pipe.set_progress_bar_config(disable=True)
    plan = sv.calibrate(pipe, prompts=["a red car on the highway"], height=64, width=64, num_frames=5,
                        num_inference_steps=2, candidates=["temporal"], tile=(1, 4, 4), progress=False)
    assert plan.model["class"] == "WanTransformer3DModel" and plan.metrics["records"]


def test_cli_calibrate_on_saved_pipelines(saved_pipelines, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red car\n\na cat in the snow\n")
    common = ["--height", "64", "--width", "64", "--frames", "5", "--steps", "2", "--candidates", "temporal",
              "--tile", "1,4,4"]
    assert main(["calibrate", "--model", str(saved_pipelines / "with_text"), "--prompts", str(prompts),
                 "--out", str(tmp_path / "a.json"), *common]) == 0
    assert sv.SparsityPlan.load(tmp_path / "a.json").metrics["prompts"] == 2
    embeds = tmp_path / "embeds.pt"
    g = torch.Generator().manual_seed(0)
    torch.save({"prompt_embeds": torch.randn(2, 12, 64, generator=g),
                "negative_prompt_embeds": torch.randn(1, 12, 64, generator=g)}, embeds)
    assert main(["calibrate", "--model", str(saved_pipelines / "no_text"), "--prompt-embeds", str(embeds),
                 "--out", str(tmp_path / "b.json"), *common]) == 0
    assert "calibrated in" in capsys.readouterr().out


# ---------------------------------------------------------------------------- the Python API
@pytest.fixture(scope="module")
def pipe():
    p = tiny_wan_pipeline()
    p.set_progress_bar_config(disable=True)
    return p


SMALL = dict(height=64, width=64, num_frames=5, num_inference_steps=2, candidates=["temporal"], tile=(1, 4, 4),
             progress=False)


def test_calibrate_refuses_a_single_string_as_prompts(pipe):
    with pytest.raises(TypeError, match=r"prompts must be a list of strings, got one string .*prompts=\['a red car'\]"):
        sv.calibrate(pipe, prompts="a red car", **SMALL)


def test_calibrate_text_prompts_without_a_text_encoder(pipe):
    with pytest.raises(ValueError, match="no tokenizer / text_encoder.*give prompt_embeds"):
        sv.calibrate(pipe, prompts=["a red car"], **SMALL)


def test_calibrate_embeds_without_negative_runs_without_cfg_and_says_so(pipe):
    e = torch.randn(1, 12, 64)
    with pytest.warns(UserWarning, match="without classifier-free guidance"):
        plan = sv.calibrate(pipe, prompt_embeds=[e], **SMALL)
    assert plan.metrics["records"]
    with pytest.raises(ValueError, match="guidance_scale=5.0 needs negative_prompt_embeds"):
        sv.calibrate(pipe, prompt_embeds=[e], guidance_scale=5.0, **SMALL)


def test_calibrate_wrong_embedding_width(pipe):
    with pytest.raises(ValueError, match=r"prompt_embeds\[0\] has width 32, but WanTransformer3DModel takes .* width 64"):
        sv.calibrate(pipe, prompt_embeds=[torch.randn(1, 12, 32)], negative_prompt_embeds=torch.randn(1, 12, 64), **SMALL)


def test_corrupted_calibration_checkpoint_names_its_path(pipe, tmp_path):
    bad = tmp_path / "ckpt.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=f"checkpoint {bad} is not valid JSON"):
        sv.calibrate(pipe, prompt_embeds=[torch.randn(1, 12, 64)], negative_prompt_embeds=torch.randn(1, 12, 64),
                     checkpoint=bad, **SMALL)


def test_apply_with_a_misspelled_transformer_name(pipe):
    plan = sv.dense_plan(pipe.transformer)
    with pytest.raises(ValueError, match=r"plans given for \['transformer2'\].*its transformers: \['transformer'\]"):
        sv.apply(pipe, {"transformer2": plan})


def test_mask_remembers_its_layout():
    layout = sv.VideoLayout(2, 8, 8, tile=(1, 4, 4))
    other = sv.VideoLayout(2, 8, 8, tile=(2, 2, 4))  # same length, other tiles
    mask = sv.masks.build("radial", layout, heads=2)
    q = torch.randn(1, 2, layout.seq_len, 16)
    sv.block_sparse_attention(q, q, q, mask, token_order=layout.token_order())  # fine
    with pytest.raises(ValueError, match="pass token_order=layout.token_order"):
        sv.block_sparse_attention(q, q, q, mask)
    with pytest.raises(ValueError, match="not the order of the layout this mask was built for"):
        sv.block_sparse_attention(q, q, q, mask, token_order=other.token_order())


def test_build_heads_must_be_positive():
    layout = sv.VideoLayout(2, 8, 8, tile=(1, 4, 4))
    with pytest.raises(ValueError, match="heads must be a positive int .* got 0"):
        sv.masks.build("radial", layout, heads=0)


def test_plan_tile_is_validated_on_load(tmp_path):
    plan = sv.SparsityPlan.uniform((2, 2), "radial", tile=(1, 4, 4))
    d = plan.to_dict()
    d["tile"] = [1, 3, 3]
    (tmp_path / "p.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"plan tile: tile volume must be a power of two >= 16 .* \(1, 3, 3\) = 9"):
        sv.SparsityPlan.load(tmp_path / "p.json")


def test_plan_constructors_point_models_to_integration():
    with pytest.raises(TypeError, match="sparse_vdit.uniform_plan"):
        sv.SparsityPlan.uniform(tiny_wan_transformer(num_layers=1), "radial")


def test_readme_fractional_warmup_with_set_attn_processor_works():
    """The README's hand-written plan (dense_steps=0.2) through plain set_attn_processor: the
    processor finds the pipeline's scheduler when it binds, so the fraction resolves."""
    p = tiny_wan_pipeline()
    p.set_progress_bar_config(disable=True)
    plan = sv.uniform_plan(p.transformer, "radial", dense_steps=0.2, dense_layers=[-1], tile=(1, 4, 4))
    proc = sv.SparseAttnProcessor(plan)
    p.transformer.set_attn_processor(proc)
    e = torch.randn(1, 12, 64)
    with torch.no_grad():
        p(prompt_embeds=e, negative_prompt_embeds=e, height=64, width=64, num_frames=5, num_inference_steps=5,
          output_type="latent")
    assert proc.binding().scheduler is p.scheduler and proc.binding().stats["sparse"] > 0
    sv.remove(p)


def test_no_process_wide_hooks_and_processor_is_collectable():
    from torch.nn.modules import module as nn_module

    before = (len(nn_module._global_forward_pre_hooks), len(nn_module._global_forward_hooks))
    proc = sv.SparseAttnProcessor(sv.SparsityPlan.dense((2, 2)))
    assert (len(nn_module._global_forward_pre_hooks), len(nn_module._global_forward_hooks)) == before
    ref = weakref.ref(proc)
    del proc
    gc.collect()
    assert ref() is None


# ---------------------------------------------------------------------------- the command line
CLI_MISTAKES = [
    (["inspect", "--mask", "radial", "--grid", "21,30"], "--grid takes 3 positive integers"),
    (["inspect", "--mask", "radial", "--tile", "1,3,3"], "tile volume must be a power of two"),
    (["inspect", "--mask", "diagonal"], "unknown mask kind 'diagonal'"),
    (["inspect", "--mask", "{bad json"], "neither a kind name nor valid JSON"),
    (["inspect"], "give a plan JSON or --mask SPEC"),
    (["inspect", "/nonexistent/plan.json"], "No such file"),
    (["inspect", "NOTAPLAN"], "not a sparse_vdit plan"),
    (["demo", "--steps", "0"], "--steps must be >= 1"),
    (["demo", "--error-budget", "2"], "--error-budget must lie in (0, 1)"),
    (["calibrate"], "one of the arguments --model --tiny is required"),
    (["calibrate", "--model", "/nonexistent", "--prompts", "PROMPTS"], "no pipeline folder at /nonexistent"),
    (["calibrate", "--model", "DIR"], "--model needs --prompts FILE or --prompt-embeds FILE.pt"),
    (["calibrate", "--model", "DIR", "--prompts", "/nonexistent.txt"], "--prompts /nonexistent.txt: no such file"),
    (["calibrate", "--model", "DIR", "--prompt-embeds", "NOTAPLAN"], "not a torch.save file"),
    (["calibrate", "--tiny", "sd3"], "--tiny 'sd3': valid are"),
    (["calibrate", "--tiny", "--steps", "0"], "--steps must be >= 1"),
    (["calibrate", "--tiny", "--error-budget", "0"], "--error-budget must lie in (0, 1)"),
    (["calibrate", "--tiny", "--tile", "1,4"], "--tile takes 3 integers >= 0"),
    (["calibrate", "--tiny", "--tile", "6,8,8"], "give a kernel block size"),
    (["inspect", "--mask", "sta", "--tile", "6,8,8", "--block", "100"], "block (kernel block size) must be a power of two"),
    (["inspect", "--mask", "sta", "--order", "whf"], "invalid choice: 'whf'"),
    (["inspect", "--mask", '{"kind": "radial_attn", "variant": "mochi"}'],
     "radial_attn variant must be 'wan' or 'hunyuan'"),
    (["calibrate", "--tiny", "--candidates", "radial,blob"], "unknown mask kind 'blob'"),
    (["calibrate", "--tiny", "--prompts", "PROMPTS"], "go with --model"),
    (["bench", "kernel", "--backend", "triton"], "the Triton backend needs a CUDA device"),
    (["bench", "kernel", "--shapes", "nope"], "unknown shapes ['nope']"),
    (["bench", "e2e"], "real-size models need a CUDA GPU"),
    (["bench", "calibration", "--model", "nope", "--tiny"], "unknown model 'nope'"),
    (["bench", "nope"], "invalid choice: 'nope'"),
    (["nope"], "invalid choice: 'nope'"),
    (["demo", "--stpes", "3"], "unrecognized arguments: --stpes"),
]


@pytest.mark.parametrize("argv,message", CLI_MISTAKES, ids=[" ".join(a) for a, _ in CLI_MISTAKES])
def test_cli_mistakes_give_one_message_and_exit_2(argv, message, tmp_path, capsys, monkeypatch):
    if torch.cuda.is_available() and "CUDA" in message:
        pytest.skip("the machine has a GPU")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    notaplan = tmp_path / "notaplan.json"
    notaplan.write_text('{"hello": 1}')
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "model_index.json").write_text("{}")
    (tmp_path / "prompts.txt").write_text("a red car\n")
    subst = {"NOTAPLAN": str(notaplan), "DIR": str(tmp_path / "dir"), "PROMPTS": str(tmp_path / "prompts.txt")}
    argv = [subst.get(a, a) for a in argv]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "Traceback" not in err and message in err, err
    assert err.strip().splitlines()[-1].startswith("sparse-vdit"), err  # one message, from the parser


def test_cli_help_and_version(capsys):
    for argv in (["--help"], ["bench", "--help"], ["bench", "kernel", "--help"], ["calibrate", "--help"], ["--version"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"sparse_vdit {sv.__version__}" in out and "(default: 0.05)" in out


def test_cli_debug_shows_the_traceback(tmp_path):
    notaplan = tmp_path / "x.json"
    notaplan.write_text("{}")
    with pytest.raises(ValueError, match="not a sparse_vdit plan"):
        main(["inspect", str(notaplan), "--debug"])
