"""The world's motion proxy: a 3-D conv direction classifier and the ``motion_proxy`` reward on it."""

from __future__ import annotations

import pytest
import torch

from mmalign.media import MediaBatch
from mmalign.rewards import build
from mmalign.world.motion_proxy import (
    CLASSES,
    MotionClassifier,
    MotionProxyRecipe,
    motion_batch,
    render_accuracy,
    train_motion_proxy,
)
from mmalign.world.motion_reward import MotionProxyScore
from mmalign.world.video import render_videos, video_prompt_set

CLIPS = video_prompt_set("heldout", 12, seed=3)


def test_batches_are_labelled_by_direction_and_still_clips_stand_still():
    still = torch.tensor([i % 3 == 0 for i in range(len(CLIPS))])
    videos, labels = motion_batch(CLIPS, 6, still, torch.zeros(len(CLIPS)), seed=0)
    assert videos.shape == (len(CLIPS), 6, 3, 32, 32)
    assert labels.tolist() == [0 if s else CLASSES.index(c.motion.direction) for c, s in zip(CLIPS, still)]
    # jitter is drawn afresh per frame, so a still clip's frames differ only slightly; a moving one's a lot
    change = (videos[:, -1] - videos[:, 0]).abs().mean(dim=(1, 2, 3))
    assert change[still].max() < change[~still].min()
    noisy, _ = motion_batch(CLIPS, 6, still, torch.full((len(CLIPS),), 0.1), seed=0)
    assert 0.05 < (noisy - videos).std() < 0.1 and noisy.min() >= 0 and noisy.max() <= 1


def test_the_classifier_rejects_what_is_not_a_clip_and_round_trips(tmp_path):
    model = MotionClassifier(channels=(8, 8)).eval()
    with pytest.raises(ValueError, match=r"clips: expected \(B, T >= 2, 3, H, W\)"):
        model(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="clips"):
        model(torch.rand(2, 1, 3, 32, 32))
    x = torch.rand(2, 5, 3, 24, 16)
    model.save_pretrained(str(tmp_path))
    loaded = MotionClassifier.from_pretrained(str(tmp_path)).eval()
    assert torch.equal(model(x), loaded(x)) and model(x).shape == (2, len(CLASSES))


def test_a_short_training_run_learns_direction_beyond_chance():
    model = train_motion_proxy(MotionProxyRecipe(clips=256, steps=300, batch=16, lr=3e-3), progress=False)
    assert render_accuracy(model, "heldout", n=100) > 0.6  # chance is 0.2 (five classes); 0.87 at 200 steps


@pytest.fixture(scope="module")
def reward() -> MotionProxyScore:
    return build("motion_proxy")


def test_the_shipped_proxy_reads_direction_off_renders(reward):
    clips = video_prompt_set("heldout", 40, seed=9)
    videos = render_videos(clips, 8, jitter=1.0, seed=1)
    right = reward(MediaBatch(videos, [c.text for c in clips])).scores
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    wrong = [c.text.replace(f"moving {c.motion.direction}", f"moving {opposite[c.motion.direction]}") for c in clips]
    told_wrong = reward(MediaBatch(videos, wrong)).scores
    assert right.min() >= 0 and right.max() <= 1
    assert (right > told_wrong).float().mean() >= 0.9 and right.mean() > 0.8
    still = videos[:, :1].expand_as(videos).contiguous()
    out = reward(MediaBatch(still, [c.text for c in clips]))
    assert out.components["still"].mean() > 0.5 and out.scores.mean() < right.mean()


def test_the_reward_is_differentiable_in_the_pixels_and_names_bad_prompts(reward):
    clips = CLIPS[:3]
    videos = render_videos(clips, 6, seed=0).requires_grad_(True)
    out = reward(MediaBatch(videos, [c.text for c in clips]))
    out.scores.sum().backward()
    assert videos.grad is not None and videos.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"batch.prompts\[1\].*moving"):
        reward(MediaBatch(videos.detach(), [clips[0].text, "a red circle", clips[2].text]))
    with pytest.raises(ValueError, match="videos"):
        reward(MediaBatch(videos.detach()[:, 0], [c.text for c in clips]))


def test_the_reward_gradient_matches_finite_differences():
    reward = MotionProxyScore(MotionClassifier(channels=(8,)).double())
    x = torch.rand(1, 3, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    prompts = ["a red circle moving up"]
    assert torch.autograd.gradcheck(lambda v: reward(MediaBatch(v, prompts)).scores, (x,), eps=1e-6, atol=1e-5)


def test_the_build_saves_a_loadable_proxy_with_its_report(tmp_path):
    import json

    from mmalign.world.build import build as build_world

    build_world("motion-proxy", tmp_path, steps=2, progress=False)
    folder = tmp_path / "motion_proxy"
    report = json.loads((folder / "build_report.json").read_text())
    assert report["recipe"]["steps"] == 2 and set(report["render_accuracy"]) == {"train", "heldout"}
    assert 0 <= report["generator_heldout"]["gold_motion"] <= 1 and 0 <= report["generator_train"]["proxy_mean"] <= 1
    scores = MotionProxyScore(str(folder))(MediaBatch(render_videos(CLIPS[:2], 4), [c.text for c in CLIPS[:2]]))
    assert scores.scores.shape == (2,)
