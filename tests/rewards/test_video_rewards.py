"""Video rewards on world clips with known motion: frame aggregation against a loop over frames, temporal
consistency, flicker and motion smoothness on clips made to differ in one way, pixel gradients by finite
differences, and named errors."""

from __future__ import annotations

import pytest
import torch

from mmalign.media import MediaBatch
from mmalign.rewards import available, build
from mmalign.world import proxy_path, render
from mmalign.world.video import DIRECTIONS, frame_scenes, render_videos, video_prompt_set

CLIPS = video_prompt_set("train", 12, seed=2)
PROMPTS = [c.text for c in CLIPS]
META = [{"scene": c.scene.to_dict(), "motion": c.motion.to_dict()} for c in CLIPS]


@pytest.fixture(scope="module")
def moving() -> torch.Tensor:
    return render_videos(CLIPS, frames=6)


def _batch(videos: torch.Tensor) -> MediaBatch:
    n = len(videos)
    return MediaBatch(videos, PROMPTS[:n], META[:n])


def _jittered(strength: float) -> torch.Tensor:
    """The clips of ``moving`` with the inner frames' positions moved by ``strength`` of a step along the motion,
    back and forth in turn: the same path, not at constant speed."""
    out = []
    for clip in CLIPS:
        dx, dy = DIRECTIONS[clip.motion.direction]
        step = clip.motion.travel / 5
        frames = []
        for t, scene in enumerate(frame_scenes(clip.scene, clip.motion, 6)):
            e = (-1) ** t * strength * step if 0 < t < 5 else 0.0
            objects = tuple(type(o)(**{**o.__dict__, "x": o.x + dx * e, "y": o.y + dy * e}) for o in scene.objects)
            frames.append(render(type(scene)(objects, scene.background, scene.background_stated, scene.relation)))
        out.append(torch.stack(frames))
    return torch.stack(out)


def test_video_rewards_are_registered():
    names = available()
    assert {"frame_aggregate", "temporal_consistency", "flicker", "motion_smoothness", "gold_video"} <= set(names)


@pytest.mark.parametrize("how", ["mean", "min", "max", "first", "last"])
def test_frame_aggregate_equals_a_loop_over_frames(moving, how):
    videos = moving.clone()
    videos[1, 2:4] = videos[1, 2:4].mean(1, keepdim=True)  # frames that fail gold's colour checks
    batch = _batch(videos)
    reward = build({"name": "frame_aggregate", "reward": {"name": "gold"}, "how": how})
    out = reward(batch)
    gold = build("gold")
    per_frame = torch.stack([gold(MediaBatch(videos[:, t], PROMPTS, META)).scores for t in range(6)], 1)
    expected = {"mean": per_frame.mean(1), "min": per_frame.amin(1), "max": per_frame.amax(1),
                "first": per_frame[:, 0], "last": per_frame[:, -1]}[how]
    torch.testing.assert_close(out.scores, expected)
    assert per_frame[1].min() < 1 and not reward.differentiable
    assert set(out.components) == set(gold(MediaBatch(videos[:, 0], PROMPTS, META)).components)


def test_frame_aggregate_gradients_match_finite_differences(moving):
    reward = build({"name": "frame_aggregate", "reward": {"name": "proxy", "dtype": "float64", "clamp": False},
                    "how": "min"})
    assert reward.differentiable
    pixels = (0.1 + 0.8 * moving[:2, :3].double()).requires_grad_()
    per_frame = torch.stack([reward.reward(MediaBatch(pixels[:, t].detach(), PROMPTS[:2])).scores
                             for t in range(3)], 1)
    torch.testing.assert_close(reward(MediaBatch(pixels, PROMPTS[:2])).scores, per_frame.amin(1))
    _check_gradients(reward, pixels)


def _check_gradients(reward, pixels: torch.Tensor, eps: float = 1e-3) -> None:
    """Directional derivative of the summed scores: autograd against central differences."""
    prompts = PROMPTS[: len(pixels)]
    pixels.grad = None
    reward(MediaBatch(pixels, prompts)).scores.sum().backward()
    assert pixels.grad.abs().sum() > 0
    torch.manual_seed(0)
    direction = torch.randn_like(pixels)
    with torch.no_grad():
        up, down = (reward(MediaBatch(pixels + s * eps * direction, prompts)).scores.double().sum() for s in (1, -1))
    torch.testing.assert_close((pixels.grad * direction).sum(), (up - down) / (2 * eps), rtol=2e-3, atol=1e-6)


@pytest.fixture(scope="module")
def consistency():
    return build({"name": "temporal_consistency", "model": proxy_path()})


def test_temporal_consistency_is_highest_for_still_clips_and_lowest_for_shuffled_ones(moving, consistency):
    still = consistency(_batch(moving[:, :1].expand(-1, 6, -1, -1, -1)))
    torch.testing.assert_close(still.scores, torch.ones(len(CLIPS)), rtol=0, atol=1e-5)
    ordered = consistency(_batch(moving))
    b = len(CLIPS)
    shuffled = torch.stack([moving[(torch.arange(b) + 5 * t) % b, t] for t in range(6)], 1)  # frame t: another clip's
    mixed = consistency(_batch(shuffled))
    assert (ordered.scores < 1).all() and (mixed.scores < ordered.scores).all()
    torch.testing.assert_close(ordered.scores, (ordered.components["previous"] + ordered.components["first"]) / 2)
    e = torch.nn.functional.normalize(consistency.backbone.encode_image(moving[0]), dim=-1)  # one clip by hand
    by_hand = sum((e[t] @ e[t - 1] + e[t] @ e[0]) / 2 for t in range(1, 6)) / 5
    torch.testing.assert_close(ordered.scores[0], by_hand.float(), rtol=1e-5, atol=1e-6)


def test_temporal_consistency_gradients(moving):
    reward = build({"name": "temporal_consistency", "model": proxy_path(), "dtype": "float64"})
    _check_gradients(reward, (0.1 + 0.8 * moving[:2, :3].double()).requires_grad_())


def test_flicker_is_larger_for_alternating_frames(moving):
    reward = build("flicker")
    alternating = moving.clone()
    alternating[:, 1::2] = moving[:, :1].roll(1, 0).expand(-1, 3, -1, -1, -1)  # every other frame another clip's
    smooth, flickering = reward(_batch(moving)), reward(_batch(alternating))
    assert (flickering.scores < smooth.scores).all() and (smooth.scores < 0).all()
    expected = (moving[:, 1:] - moving[:, :-1]).abs().mean((1, 2, 3, 4))
    torch.testing.assert_close(smooth.components["mean_abs_diff"], expected)
    torch.testing.assert_close(reward(_batch(moving[:, :1].expand(-1, 4, -1, -1, -1))).scores, torch.zeros(12))
    _check_gradients(reward, (0.1 + 0.8 * moving[:2, :3].double()).requires_grad_())


def test_motion_smoothness_prefers_constant_speed(moving):
    reward = build("motion_smoothness")
    linear = reward(_batch(moving)).scores
    jittered = reward(_batch(_jittered(0.5))).scores
    assert (linear > jittered).all()
    assert (reward(_batch(_jittered(0.8))).scores < jittered).all()
    sharp = build({"name": "motion_smoothness", "blur": 0})
    x = moving[:2]
    by_hand = (x[:, 1:-1] - (x[:, :-2] + x[:, 2:]) / 2).abs().mean((1, 2, 3, 4))
    torch.testing.assert_close(sharp(_batch(x)).components["deviation"], by_hand)
    # brightening at a growing rate over a random texture: every pixel's deviation is 0.05, far from abs's kink
    torch.manual_seed(1)
    t = torch.arange(3, dtype=torch.float64).view(1, 3, 1, 1, 1)
    accelerating = 0.1 + 0.4 * torch.rand(2, 1, 3, 16, 16, dtype=torch.float64) + 0.05 * t**2
    torch.testing.assert_close(reward(_batch(accelerating)).scores, torch.full((2,), -0.05))
    _check_gradients(reward, accelerating.requires_grad_())


def test_bad_inputs_are_named(moving, consistency):
    images = MediaBatch(moving[:, 0], PROMPTS, META)
    for name in ("flicker", "motion_smoothness", "frame_aggregate"):
        options = {"reward": "gold"} if name == "frame_aggregate" else {}
        with pytest.raises(ValueError, match=rf"batch.pixels: {name} scores videos \(B, T, C, H, W\), got an image "
                                             r"batch \(12, 3, 32, 32\)"):
            build({"name": name, **options})(images)
    with pytest.raises(ValueError, match="batch.pixels: temporal_consistency scores videos"):
        consistency(images)
    one = _batch(moving[:, :1])
    with pytest.raises(ValueError, match="batch.pixels: flicker needs at least 2 frames per video, got T = 1"):
        build("flicker")(one)
    with pytest.raises(ValueError, match="batch.pixels: temporal_consistency needs at least 2 frames"):
        consistency(one)
    with pytest.raises(ValueError, match="batch.pixels: motion_smoothness needs at least 3 frames per video, got T = 2"):
        build("motion_smoothness")(_batch(moving[:, :2]))
    with pytest.raises(ValueError, match="pixels: expected rank 4 .* or rank 5 .* got rank 6"):
        MediaBatch(moving[:, None], PROMPTS)
    with pytest.raises(ValueError, match="the gold reward scores images, got videos"):
        build("gold")(_batch(moving))
    with pytest.raises(ValueError, match="how: expected one of mean, min, max, first, last, got 'median'"):
        build({"name": "frame_aggregate", "reward": "gold", "how": "median"})
    with pytest.raises(ValueError, match="reward: frame_aggregate .* scope 'sample', got vendi of scope 'set'"):
        build({"name": "frame_aggregate", "reward": {"name": "vendi", "model": proxy_path(), "pretrained": None}})
    with pytest.raises(ValueError, match="reward 'frame_aggregate': expected the option\\(s\\) 'reward'"):
        build("frame_aggregate")
    with pytest.raises(ValueError, match="blur: expected a fraction of the frame's shorter side in \\[0, 0.5\\], got 2"):
        build({"name": "motion_smoothness", "blur": 2})
