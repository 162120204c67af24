"""The pytest plugin that runs diffusers' own test files with a plan applied
(``sparse_vdit.testing.diffusers_tests``, used by ``scripts/diffusers_own_tests.sh``): a model built
from a config gets the plan, a sparse plan really runs sparse (counted where the op runs, compiled
too), and off means stock."""
import pytest

pytest_plugins = ["pytester"]

TEST_FILE = '''
import pytest, torch
from diffusers import WanTransformer3DModel
from sparse_vdit.integration.processor import SparseAttnProcessor

def _model():
    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                                 out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2,
                                 cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32).eval()

def _inputs():
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 4, 2, 16, 16, generator=g), timestep=torch.tensor([500]),
                encoder_hidden_states=torch.randn(1, 12, 16, generator=g), return_dict=False)

def test_forward():
    model = _model()
    applied = any(isinstance(m.processor, SparseAttnProcessor) for m in model.modules() if hasattr(m, "processor"))
    print("APPLIED", applied)
    with torch.no_grad():
        out = model(**_inputs())[0]
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(**_inputs())[0]
    torch.testing.assert_close(compiled, out, rtol=0, atol=0)

@pytest.mark.skipif(True, reason="test requires a hardware accelerator")
def test_accelerator_only():
    print("RAN ACCELERATOR TEST")
'''


@pytest.mark.parametrize("mode", ["off", "sparse"])
def test_plugin_applies_the_plan_to_every_model_built_and_counts_sparse_calls(pytester, mode):
    pytester.makepyfile(test_built=TEST_FILE)
    result = pytester.runpytest_subprocess("-p", "sparse_vdit.testing.diffusers_tests", "--sparse-vdit", mode,
                                           "--sparse-vdit-on-cpu", "-s", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)  # the accelerator-only test ran on the CPU too
    out = result.stdout.str()
    assert "RAN ACCELERATOR TEST" in out
    assert f"APPLIED {mode != 'off'}" in out
    if mode == "sparse":
        line = [ln for ln in out.splitlines() if ln.startswith("sparse_vdit: sparse plan applied to")]
        assert line, out
        models, calls = (int(w) for w in line[0].replace(";", "").split() if w.isdigit())
        assert models == 1 and calls >= 4, line  # 2 layers, eager and compiled
        per_test = [ln for ln in out.splitlines() if ln.endswith("block-sparse forwards in test_built.py::test_forward")]
        assert per_test and int(per_test[0].split()[1]) == calls, out
