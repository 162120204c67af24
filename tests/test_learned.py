"""The tiny Wan trained on the shapes world (weights shipped in the package): it learned to draw what
its prompt says, on prompt combinations it never saw in training."""
import json

import pytest
import torch

from sparse_vdit.testing import shapes


def test_world_renders_what_it_describes():
    """The frame analysis the learned test relies on reads colour and direction back from the world itself."""
    g = torch.Generator().manual_seed(0)
    for scene in shapes.ALL_SCENES:
        video = shapes.frame_vae().decode(shapes.render(scene, g)[None]).sample[0]  # [3, 29, H, W]
        assert shapes.describe((video.permute(1, 2, 3, 0) + 1) / 2) == (scene.colour, scene.direction), scene


def test_held_out_scenes_are_combinations_of_seen_words():
    seen = {w for sc in shapes.TRAIN_SCENES for w in (sc.colour, sc.shape, sc.direction)}
    assert shapes.HELD_OUT and not set(shapes.HELD_OUT) & set(shapes.TRAIN_SCENES)
    for sc in shapes.HELD_OUT:
        assert {sc.colour, sc.shape, sc.direction} <= seen


def test_shipped_weights_are_save_pretrained_and_small():
    files = {p.name: p.stat().st_size for p in shapes.WEIGHTS_DIR.iterdir()}
    assert "config.json" in files and "diffusion_pytorch_model.safetensors" in files
    assert sum(files.values()) <= 20 * 2 ** 20
    meta = json.loads((shapes.WEIGHTS_DIR / "loss.json").read_text())
    assert meta["done"] == meta["steps"]  # a finished run, not a checkpoint
    curve = [loss for _, loss in meta["curve"]]
    assert curve[-1] < 0.5 * curve[0]


@pytest.fixture(scope="module")
def held_out_videos():
    pipe = shapes.learned_wan_pipeline()
    pipe.set_progress_bar_config(disable=True)
    scenes = list(shapes.HELD_OUT)
    gen = [torch.Generator().manual_seed(100 + i) for i in range(len(scenes))]
    with torch.no_grad():
        frames = pipe([sc.prompt for sc in scenes], negative_prompt="", generator=gen, output_type="np",
                      **shapes.GENERATE_DEFAULTS).frames
    return scenes, frames


def test_learned_model_draws_one_object_of_the_colour_its_prompt_names(held_out_videos):
    """On combinations never seen in training, the frames show an object of the named colour. (The
    shipped weights have not learned the motion yet: the direction is reported, not required; see
    the README's section on the learned model.)"""
    scenes, frames = held_out_videos
    got = [shapes.describe(shapes.video_tensor(f)) for f in frames]
    colour_right = [g[0] == sc.colour for g, sc in zip(got, scenes)]
    detail = [(sc.prompt, g) for g, sc in zip(got, scenes)]
    assert sum(colour_right) >= 0.8 * len(scenes), f"{sum(colour_right)}/{len(scenes)} colours right: {detail}"
