"""Does the learned tiny Wan use its prompt's direction word? The denoiser's estimate of the clean
video (``x_t - sigma * prediction``) for one training video of "a red circle moves right", noised
at a few sigmas, under prompts that differ only in the direction word: the object's centroid (by
redness) in the first and last key frame, against the truth.

    python -m benchmarks.motion_probe                       # the shipped weights
    python -m benchmarks.motion_probe --weights DIR         # a checkpoint of train_shapes (its text encoder too, if trained)
    python -m benchmarks.motion_probe --first-frame-sigma 0 # the first key frame clean, the rest at each sigma

With ``--first-frame-sigma`` the first key frame is noised less than the others (per-token timesteps,
as ``train_shapes --frame-noise`` / ``--anchor`` train some samples): the clean frame shows where the
object is, and only the direction word says where it goes.

    python -m benchmarks.motion_probe --sensitivity --cross-attention
    python -m benchmarks.motion_probe --generate [--weights DIR]

``--generate``: the learned-behaviour test's analysis on any weights: the held-out prompts with the
test's seeds, then the training prompts, generated whole by the pipeline (``shapes.GENERATE_DEFAULTS``)
and read back by ``shapes.describe`` (colour, direction), with how many are right.

``--sensitivity``: how far the prediction moves (L2) when one word of the prompt is swapped (the
direction, the colour, the shape; the empty prompt), against its norm. ``--cross-attention``: the
mean cross-attention probability the video tokens give each text token, per layer and head.
"""
from __future__ import annotations

import argparse

import torch

from sparse_vdit.testing import shapes, train_shapes

PROMPTS = ("a red circle moves right", "a red circle moves left", "a red circle moves down")


def centroids(video: torch.Tensor) -> list[tuple[float, float]]:
    """(y, x) of the red object in the first and last key frame of ``video`` [3, F, H, W] in [-1, 1]."""
    red = (video[0] - video[1]).clamp(min=0)
    return [tuple(round(c, 1) for c in shapes.centroid(red[t]).tolist()) for t in (0, red.shape[0] - 1)]


def _video(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = shapes.batch([shapes.Scene("red", "circle", "right")], g)
    return x0, torch.randn(x0.shape, generator=g)


def sensitivity(model, sigmas, text_tokens: int = shapes.MAX_TEXT_TOKENS, weights=None) -> None:
    """L2 change of the prediction when the prompt's direction, colour or shape word is swapped, or the
    prompt is empty, for one noised training video of "a red circle moves right"."""
    prompts = {"base": "a red circle moves right", "direction (left)": "a red circle moves left",
               "colour (blue)": "a blue circle moves right", "shape (square)": "a red square moves right",
               "empty prompt": ""}
    embeds = train_shapes.encode_prompts(list(prompts.values()), text_tokens, weights)
    x0, noise = _video()
    for sigma in sigmas:
        xt = (1 - sigma) * x0 + sigma * noise
        with torch.no_grad():
            preds = [model(xt, torch.tensor([sigma * 1000]), embeds[i:i + 1], return_dict=False)[0]
                     for i in range(len(prompts))]
        changes = ", ".join(f"{name} {float((p - preds[0]).norm()):.1f}" for name, p in zip(list(prompts)[1:], preds[1:]))
        print(f"sigma {sigma}: prediction norm {float(preds[0].norm()):.1f}; change when swapping: {changes}")


def cross_attention(model, sigmas, text_tokens: int = shapes.MAX_TEXT_TOKENS, weights=None) -> None:
    """Mean cross-attention probability of the video tokens on each text token (per layer, per head)."""
    prompt = "a red circle moves right"
    embeds = train_shapes.encode_prompts([prompt], text_tokens, weights)
    words = prompt.split() + ["</s>", f"padding ({text_tokens - 6}, summed)"]
    x0, noise = _video()
    found = []

    def hook(mod, args, kwargs, out):
        hs = args[0]
        enc = args[1] if len(args) > 1 else kwargs["encoder_hidden_states"]
        q, k = mod.norm_q(mod.to_q(hs)), mod.norm_k(mod.to_k(enc))
        B, N, _ = q.shape
        q = q.view(B, N, mod.heads, -1).transpose(1, 2)
        k = k.view(B, k.shape[1], mod.heads, -1).transpose(1, 2)
        p = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, -1).mean(2)[0]  # [H, text tokens]
        n = len(words) - 1
        found.append(torch.cat([p[:, :n], p[:, n:].sum(-1, keepdim=True)], -1))

    handles = [blk.attn2.register_forward_hook(hook, with_kwargs=True) for blk in model.blocks]
    try:
        for sigma in sigmas:
            found.clear()
            xt = (1 - sigma) * x0 + sigma * noise
            with torch.no_grad():
                model(xt, torch.tensor([sigma * 1000]), embeds, return_dict=False)
            print(f"sigma {sigma}: cross-attention mass per text token ({', '.join(words)})")
            for layer, p in enumerate(found):
                print(f"  layer {layer}: " + "  ".join("[" + " ".join(f"{x:.2f}" for x in row.tolist()) + "]" for row in p))
    finally:
        for h in handles:
            h.remove()


def travel(video: torch.Tensor, direction: str) -> float:
    """How far (px) the object's centroid (``shapes.track``) went from the first frame it is found in to
    the last, along ``direction``'s vector (the data's: 17.5 px); NaN where no object is found."""
    move = shapes.travel(shapes.track(video)[0])
    return float("nan") if move is None else float((move * torch.tensor(shapes.DIRECTIONS[direction])).sum())


def generate(weights=None, seeds: int = 1, guidance_scale: float | None = None) -> dict[str, dict[str, int]]:
    """Colour and direction read back from whole generated videos, held-out and training prompts
    (seeds 100 + i per prompt, as ``tests/test_learned.py``; ``seeds`` > 1 adds 200 + i, ...), with
    each video's travel along the named direction (:func:`travel`)."""
    settings = {**shapes.GENERATE_DEFAULTS, **({"guidance_scale": guidance_scale} if guidance_scale else {})}
    pipe = shapes.learned_wan_pipeline(weights)
    pipe.set_progress_bar_config(disable=True)
    counts = {}
    for name, scenes in (("held out", list(shapes.HELD_OUT)), ("training", list(shapes.TRAIN_SCENES[::4]))):
        right = {"colour": 0, "direction": 0, "videos": 0, "travel": []}
        for r in range(seeds):
            gen = [torch.Generator().manual_seed(100 * (r + 1) + i) for i in range(len(scenes))]
            with torch.no_grad():
                frames = pipe([sc.prompt for sc in scenes], negative_prompt="", generator=gen, output_type="np",
                              **settings).frames
            for sc, f in zip(scenes, frames):
                colour, direction = shapes.describe(shapes.video_tensor(f))
                right["travel"].append(round(travel(shapes.video_tensor(f), sc.direction), 1))
                print(f"{name}: {sc.prompt!r:32} -> colour {colour}, direction {direction}, "
                      f"travel along it {right['travel'][-1]} px", flush=True)
                right["colour"] += colour == sc.colour
                right["direction"] += direction == sc.direction
                right["videos"] += 1
        counts[name] = right
    print({k: f"colour {v['colour']}/{v['videos']}, direction {v['direction']}/{v['videos']}, travel along "
              f"the named direction {min(v['travel'])} to {max(v['travel'])} px" for k, v in counts.items()})
    return counts


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", default=None, help="weights folder (default: the shipped ones)")
    ap.add_argument("--sigmas", nargs="*", type=float, default=[0.95, 0.85, 0.7])
    ap.add_argument("--first-frame-sigma", type=float, default=None,
                    help="noise level of the first key frame (default: the same as the others)")
    ap.add_argument("--sensitivity", action="store_true", help="the prediction's change per swapped word")
    ap.add_argument("--cross-attention", action="store_true", help="cross-attention mass per text token")
    ap.add_argument("--generate", action="store_true",
                    help="generate held-out and training prompts whole and read colour and direction back")
    ap.add_argument("--seeds", type=int, default=1, help="with --generate: seeds per prompt")
    ap.add_argument("--guidance-scale", type=float, default=None,
                    help="with --generate: in place of shapes.GENERATE_DEFAULTS' guidance scale")
    ap.add_argument("--text-tokens", type=int, default=shapes.MAX_TEXT_TOKENS,
                    help="text tokens a prompt is padded to (as the weights were trained: train_shapes --text-tokens)")
    args = ap.parse_args(argv)
    if args.generate:
        generate(args.weights, args.seeds, args.guidance_scale)
        return
    model = shapes.learned_wan_pipeline(args.weights).transformer
    if args.sensitivity:
        sensitivity(model, args.sigmas, args.text_tokens, args.weights)
    if args.cross_attention:
        cross_attention(model, args.sigmas, args.text_tokens, args.weights)
    if args.sensitivity or args.cross_attention:
        return
    embeds = train_shapes.encode_prompts(PROMPTS, args.text_tokens, args.weights)
    g = torch.Generator().manual_seed(0)
    x0 = shapes.batch([shapes.Scene("red", "circle", "right")], g)
    noise = torch.randn(x0.shape, generator=g)
    print("truth (first, last key frame):", centroids(x0[0]))
    for sigma in args.sigmas:
        levels = torch.full((1, shapes.FRAMES), sigma)
        if args.first_frame_sigma is not None:
            levels[0, 0] = args.first_frame_sigma
        s = levels.view(1, 1, shapes.FRAMES, 1, 1)
        xt = (1 - s) * x0 + s * noise
        timestep = (levels * 1000).repeat_interleave((shapes.SIZE // 2) ** 2, dim=1)  # per token, patch (1, 2, 2)
        for i, prompt in enumerate(PROMPTS):
            with torch.no_grad():
                pred = model(xt, timestep, embeds[i:i + 1], return_dict=False)[0]
            print(f"sigma {sigma}: {prompt!r:30} estimate {centroids((xt - s * pred)[0])}")


if __name__ == "__main__":
    main()
