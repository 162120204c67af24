"""sv.analyze (structure, sparsity, sinks, temperature) and attention-map transfer editing, on the
planted tiny model and every family."""
import pytest
import torch

import sparse_vdit as sv
from sparse_vdit.analysis.edit import TransferAttention
from sparse_vdit.cli import main
from sparse_vdit.integration import HeadGroup, LayerSlot
from sparse_vdit.ops import reference_attention
from sparse_vdit.testing import FAMILIES, make, planted_sink_transformer, tiny_wan_pipeline


@pytest.fixture(scope="module")
def planted_report(tmp_path_factory):
    """Layers 0-2 planted local, layer 3 random (global); two prompts."""
    pipe = tiny_wan_pipeline()
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    embeds = [torch.randn(1, 16, 64, generator=g) for _ in range(2)]
    out = tmp_path_factory.mktemp("analysis")
    return sv.analyze(pipe, prompt_embeds=embeds, negative_prompt_embeds=torch.randn(1, 16, 64, generator=g),
                      height=256, width=256, num_frames=29, guidance_scale=5.0, num_inference_steps=4,
                      sample_steps=(0.5,), tile=(1, 4, 4), out=out, progress=False), out


def test_structure_is_alike_across_prompts_for_local_heads_not_random_ones(planted_report):
    report, _ = planted_report
    sims = [entry["cross_prompt_similarity"] for entry in report["layers"]]
    assert min(sims[:3]) > 0.95
    assert sims[3] < min(sims[:3]) - 0.2


def test_pruning_sensitivity_marks_the_random_layer(planted_report):
    report, _ = planted_report
    assert [entry["cannot_be_pruned"] for entry in report["layers"]] == [False, False, False, True]
    for entry in report["layers"]:  # the curve falls as more key blocks are kept
        curve = [entry["pruning_curve"][str(f)] for f in report["fractions"]]
        assert all(b <= a + 1e-6 for a, b in zip(curve, curve[1:]))


def test_report_files_and_temperature(planted_report):
    report, out = planted_report
    names = {p.split("/")[-1] for p in report["files"]}
    assert names == {"structure.png", "sparsity.png", "sinks.png", "temperature.png", "analysis.json"}
    assert all((out / n).stat().st_size > 1000 for n in names)
    for entry in report["layers"]:
        assert set(entry["temperature_error"]) == {str(t) for t in report["temperatures"]}
        assert len(entry["best_temperature_per_head"]) == 4


def test_planted_sink_is_found_at_its_frame():
    m, x, e = planted_sink_transformer(num_layers=2, sink_layer=1)

    def run(model, i):
        with torch.no_grad():
            model(x, torch.tensor([900.0]), e)

    report = sv.analyze(m, run=run, num_prompts=1, num_inference_steps=1, sample_steps=(0.0,), tile=(1, 4, 4),
                        progress=False)
    sink_layer, local_layer = report["layers"][1], report["layers"][0]
    for head_keys in sink_layer["top_keys"]:
        assert all(key["frame"] == 0 and key["tile"][0] == 0 and not key["text"] for key in head_keys)
    assert sink_layer["top1pct_share"] > 5 * local_layer["top1pct_share"]


def test_text_sink_share_is_reported_for_joint_attention(tmp_path, capsys):
    assert main(["analyze", "--tiny", "hunyuan_video", "--steps", "2", "--out", str(tmp_path)]) == 0
    import json

    report = json.loads((tmp_path / "analysis.json").read_text())
    assert all(0 <= entry["first_text_token_share"] <= 1 for entry in report["layers"] if entry["measured"])
    assert "cross-prompt similarity" in capsys.readouterr().out


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "hunyuan_video"])
def test_analyze_cli_every_family(family, tmp_path):
    assert main(["analyze", "--tiny", family, "--steps", "2", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "sparsity.png").exists()


# ---------------------------------------------------------------------------- transfer
def _slot(layout, mask=None):
    groups = None if mask is None else (HeadGroup(mask, None),)
    return LayerSlot(stock=None, adapter=None, layer=0, groups=groups, token_order=layout.token_order(), layout=layout,
                     step=0)


@pytest.mark.parametrize("sparse", [False, True])
def test_transfer_gives_the_target_the_source_attention_probabilities(sparse):
    layout = sv.VideoLayout(3, 8, 8, tile=(1, 4, 4))
    H, D = 2, 16
    q, k, v = (torch.randn(2, layout.seq_len, H, D, dtype=torch.float64) for _ in range(3))
    mask = sv.masks.build("radial", layout, heads=H) if sparse else None
    strategy = TransferAttention(layers="all", steps="all", backend="torch")
    o = strategy.attend(q, k, v, _slot(layout, mask))
    full = sv.masks.build("dense", layout, heads=H)
    m = mask if sparse else full
    order = layout.token_order()
    bhnd = [x.transpose(1, 2) for x in (q, k, v)]
    ref_target, _ = reference_attention(bhnd[0][:1], bhnd[1][:1], bhnd[2][1:], m, token_order=order)
    ref_source, _ = reference_attention(bhnd[0][:1], bhnd[1][:1], bhnd[2][:1], m, token_order=order)
    assert (o[1:].transpose(1, 2) - ref_target).abs().max() < 1e-10  # softmax(Q_s K_s^T) V_t
    assert (o[:1].transpose(1, 2) - ref_source).abs().max() < 1e-10  # the source unchanged


def test_transfer_with_no_layers_equals_plain_generation():
    pipe = tiny_wan_pipeline()
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    es, et, neg = (torch.randn(1, 16, 64, generator=g) for _ in range(3))
    kw = dict(height=64, width=64, num_frames=5, num_inference_steps=3, output_type="latent", guidance_scale=5.0)
    none = sv.edit.transfer(pipe, source_embeds=es, target_embeds=et, negative_prompt_embeds=neg, layers=None, **kw)
    edited = sv.edit.transfer(pipe, source_embeds=es, target_embeds=et, negative_prompt_embeds=neg, **kw)
    with torch.no_grad():
        plain = pipe(prompt_embeds=torch.cat([es, et]), negative_prompt_embeds=torch.cat([neg, neg]),
                     generator=[torch.Generator().manual_seed(0) for _ in range(2)], **kw).frames
    assert torch.equal(none.frames, plain)
    assert torch.equal(edited.frames[0], plain[0])  # the source is generated as usual
    assert not torch.allclose(edited.frames[1], plain[1])  # the target took the source's maps


def test_transfer_with_a_sparse_plan_and_the_edit_cli(tmp_path):
    pipe = tiny_wan_pipeline()
    pipe.set_progress_bar_config(disable=True)
    plan = sv.uniform_plan(pipe.transformer, "sliding_tile", dense_layers=[-1], tile=(1, 4, 4))
    g = torch.Generator().manual_seed(0)
    es, et = (torch.randn(1, 16, 64, generator=g) for _ in range(2))
    out = sv.edit.transfer(pipe, source_embeds=es, target_embeds=et, plan=plan, layers=[0, 1], transfer_steps=[0, 1],
                           height=64, width=64, num_frames=5, num_inference_steps=3, output_type="latent")
    assert torch.isfinite(out.frames).all()
    from sparse_vdit.testing import shapes

    learned = shapes.learned_wan_pipeline()
    sv.uniform_plan(learned.transformer, "sliding_tile", tile=(1, 4, 4)).save(tmp_path / "plan.json")
    assert main(["edit", "--tiny", "--steps", "3", "--plan", str(tmp_path / "plan.json"), "--layers", "0,1",
                 "--out", str(tmp_path)]) == 0
    assert (tmp_path / "edit_side_by_side.png").stat().st_size > 1000
    with pytest.raises(TypeError, match="transfer_steps"):  # one name per meaning: steps are the denoising steps
        sv.edit.transfer(pipe, source_embeds=es, target_embeds=et, steps=[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_transfer_strategy_on_every_family(family):
    model, call = make(family)
    with torch.no_grad():
        plain = call(model, batch=2)
        sv.apply(model, sv.dense_plan(model, tile=(1, 4, 4)), attention=TransferAttention(backend="torch"))
        edited = call(model, batch=2)
        sv.remove(model)
    assert torch.allclose(edited[0], plain[0], atol=1e-5)  # the source half is unchanged
    assert not torch.allclose(edited[1], plain[1], atol=1e-4)  # the target half follows the source's maps
