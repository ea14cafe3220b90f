"""World videos: clips of moving shapes, their captions and splits, and the motion-aware gold verifier."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from mmalign.media import MediaBatch
from mmalign.rewards import build
from mmalign.world import HELDOUT_PAIRS, render
from mmalign.world.video import (
    DIRECTIONS,
    Motion,
    frame_scenes,
    render_video,
    render_videos,
    verify_video,
    verify_videos,
    video_prompt_set,
    video_scene_from_prompt,
)

CLIPS = video_prompt_set("train", 24, seed=5) + video_prompt_set("heldout", 8, seed=5)


def _batch(videos: torch.Tensor, clips=CLIPS) -> MediaBatch:
    meta = [{"scene": c.scene.to_dict(), "motion": c.motion.to_dict()} for c in clips]
    return MediaBatch(videos, [c.text for c in clips], meta)


@pytest.fixture(scope="module")
def videos() -> torch.Tensor:
    return render_videos(CLIPS, frames=6, jitter=1.0, seed=0)


def test_prompt_sets_are_seeded_split_and_captioned():
    assert [c.text for c in video_prompt_set("train", 24, seed=5)] == [c.text for c in CLIPS[:24]]
    assert video_prompt_set("train", 8, seed=6)[0] != CLIPS[0]
    pairs = [{(o.colour, o.shape) for o in c.scene.objects} for c in CLIPS]
    assert not any(p & HELDOUT_PAIRS for p in pairs[:24]) and all(p & HELDOUT_PAIRS for p in pairs[24:])
    assert {c.motion.direction for c in CLIPS} == set(DIRECTIONS)
    for clip in CLIPS:
        assert f"moving {clip.motion.direction}" in clip.text
        assert all(o.position is None for o in clip.scene.objects)
        scene, motion = video_scene_from_prompt(clip.text)  # the caption states the clip
        assert scene.groups() == clip.scene.groups() and scene.relation == clip.scene.relation
        assert motion.direction == clip.motion.direction


def test_frames_move_at_constant_speed_and_stay_on_the_canvas():
    clip = video_scene_from_prompt("two blue squares moving up", seed=1)
    scenes = frame_scenes(*clip, frames=5)
    ys = torch.tensor([[o.y for o in s.objects] for s in scenes])
    steps = ys.diff(dim=0)
    torch.testing.assert_close(steps, torch.full_like(steps, -clip[1].travel / 4), rtol=0, atol=1e-9)
    assert all(o.x == a.x for s in scenes for o, a in zip(s.objects, scenes[0].objects))
    video = render_video(*clip, frames=5)
    assert video.shape == (5, 3, 32, 32)
    torch.testing.assert_close(video[2], render(scenes[2], 32))


def test_gold_passes_the_captioned_motion_and_fails_the_reversed_one(videos):
    scenes, motions = [c.scene for c in CLIPS], [c.motion for c in CLIPS]
    forward = verify_videos(videos, scenes, motions)
    assert all(r.score == 1.0 for r in forward)  # jittered renders satisfy every attribute and the motion
    backward = verify_videos(videos.flip(1), scenes, motions)
    still = verify_videos(videos[:, :1].expand(-1, 6, -1, -1, -1), scenes, motions)
    for results in (backward, still):
        motion = [ok for r in results for name, ok in r.checks.items() if name.endswith(".motion")]
        assert len(motion) >= len(CLIPS) and not any(motion)
        assert all(0.5 < r.score < 1 for r in results)  # the image attributes still hold in every frame
    clip = CLIPS[0]
    turned = {"left": "up", "right": "down", "up": "left", "down": "right"}[clip.motion.direction]
    result = verify_video(videos[0], clip.scene, turned)  # motion across the stated direction
    assert not any(ok for name, ok in result.checks.items() if name.endswith(".motion"))
    dx, dy = result.displacements["object0.motion"]
    ux, uy = DIRECTIONS[clip.motion.direction]
    assert dx * ux + dy * uy == pytest.approx(clip.motion.travel, abs=0.05)


def test_score_counts_image_attributes_by_their_rate_over_frames(videos):
    clip = CLIPS[3]
    video = videos[3].clone()
    video[:2] = video[:2].mean(1, keepdim=True)  # two of six frames lose their colours
    result = verify_video(video, clip.scene, clip.motion)
    colour = [v for name, v in result.checks.items() if name.endswith(".colour")]
    assert colour and all(v == pytest.approx(4 / 6) for v in colour)
    assert result.score == pytest.approx(sum(result.checks.values()) / len(result.checks))
    assert [f.score for f in result.frames][2:] == [1.0] * 4


def test_gold_video_reward(videos):
    reward = build("gold_video")
    out = reward(_batch(videos))
    expected = [r.score for r in verify_videos(videos, [c.scene for c in CLIPS], [c.motion for c in CLIPS])]
    torch.testing.assert_close(out.scores, torch.tensor(expected))
    reversed_out = reward(_batch(videos.flip(1)))
    assert (reversed_out.components["motion"] == 0).all() and (out.components["motion"] == 1).all()
    assert reversed_out.info["motion_rate"] == 0 and out.info["colour_rate"] == 1


def test_bad_inputs_are_named(videos):
    batch = _batch(videos)
    reward = build("gold_video")
    with pytest.raises(ValueError, match=r"batch.pixels: gold_video scores videos \(B, T, C, H, W\), got an image"):
        reward(MediaBatch(videos[:, 0], batch.prompts, batch.metadata))
    with pytest.raises(ValueError, match="batch.pixels: gold_video needs at least 2 frames per video, got T = 1"):
        reward(MediaBatch(videos[:, :1], batch.prompts, batch.metadata))
    with pytest.raises(ValueError, match=r"metadata\[0\]: the gold_video reward needs each clip's 'scene' and "
                                         r"'motion' \(video_prompt_set\), sample 0 lacks \['motion'\]"):
        reward(MediaBatch(videos[:1], batch.prompts[:1], [{"scene": batch.metadata[0]["scene"]}]))
    with pytest.raises(ValueError, match="the gold reward scores images, got videos"):
        build("gold")(batch)
    with pytest.raises(ValueError, match=r"video: expected a \(T, 3, H, W\) tensor, got \(3, 32, 32\)"):
        verify_video(videos[0, 0], CLIPS[0].scene, "up")
    with pytest.raises(ValueError, match=r"videos: expected a \(B, T, 3, H, W\) tensor with T >= 2 frames"):
        verify_videos(videos[:1, :1], [CLIPS[0].scene], ["up"])
    with pytest.raises(ValueError, match=r"motions\[0\]: expected a Motion, its dict"):
        verify_videos(videos[:1], [CLIPS[0].scene], [3])
    with pytest.raises(ValueError, match="direction: expected one of .*got 'sideways'"):
        Motion("sideways")
    placed = replace(CLIPS[0].scene, objects=(replace(CLIPS[0].scene.objects[0], position="left"),))
    with pytest.raises(ValueError, match=r"scenes\[0\]: a motion clip states no positions"):
        verify_videos(videos[:1], [placed], ["up"])
    with pytest.raises(ValueError, match="prompt: expected a world caption with one 'moving"):
        video_scene_from_prompt("a red circle")
    with pytest.raises(ValueError, match="prompt: a motion clip states no positions"):
        video_scene_from_prompt("a red circle on the left moving up")
    with pytest.raises(ValueError, match="frames: expected a positive int, got 0"):
        frame_scenes(CLIPS[0].scene, CLIPS[0].motion, 0)


def test_world_video_command_writes_a_gif(tmp_path, capsys):
    import argparse
    import importlib.util

    from PIL import Image

    from mmalign.world.commands import add_world_parser

    parser = argparse.ArgumentParser(prog="mmalign")
    add_world_parser(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "clip.gif"
    args = parser.parse_args(["world", "video", "--prompt", "two blue squares moving up", "--frames", "5",
                              "--out", str(out)])
    assert args.func(args) == 0
    assert "wrote 5 frames of 'two blue squares moving up'" in capsys.readouterr().out
    assert Image.open(out).n_frames == 5
    if importlib.util.find_spec("imageio_ffmpeg"):
        import imageio

        args = parser.parse_args(["world", "video", "--frames", "3", "--out", str(tmp_path / "clip.mp4")])
        assert args.func(args) == 0
        assert sum(1 for _ in imageio.get_reader(tmp_path / "clip.mp4")) == 3
    args = parser.parse_args(["world", "video", "--out", str(tmp_path / "clip.png")])
    with pytest.raises(ValueError, match="--out: expected a .gif or .mp4 file name"):
        args.func(args)
