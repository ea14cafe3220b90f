"""Travelling initial noise: each frame a window of one larger Gaussian field, moved along the stated motion; the
video adapters draw it when ``noise_speed`` is set, rollouts and ReNO start from it, and without it every
adapter draws the plain standard normal noise it always did."""

import pytest
import torch
from tiny_models import make_tiny_animatediff_pipeline, make_tiny_sd_pipeline

from mmalign.config import VideoConfig
from mmalign.inference.reno import optimize_noise, seeded_noise
from mmalign.models.pipelines import adapter_for
from mmalign.models.rollout import sample_trajectories
from mmalign.models.video import stated_directions, travelling_noise
from mmalign.rewards import Reward, RewardOutput

RIGHT, UP = {"motion": {"direction": "right"}}, {"motion": {"direction": "up"}}


class Brightness(Reward):
    """Mean pixel value of a clip: differentiable, per sample."""

    name = "brightness"
    differentiable = True

    def forward(self, batch):
        return RewardOutput(batch.pixels.flatten(1).mean(1))


def test_each_frame_is_a_window_of_one_field_moved_along_the_direction():
    noise = travelling_noise([(1, 0), (0, -1)], (3, 5, 8, 8), torch.Generator().manual_seed(0), speed=0.5)
    assert noise.shape == (2, 3, 5, 8, 8)
    field = torch.randn((2, 3, 10, 10), generator=torch.Generator().manual_seed(0))  # margin: the last shift, 2
    for f, k in enumerate([0, 1, 1, 2, 2]):  # ⌊0.5·f + ½⌋ pixels by frame f
        for y in range(8):
            for x in range(8):
                # moving right, the pattern at x in frame 0 is at x + k in frame f (the window slides left)
                assert torch.equal(noise[0, :, f, y, x], field[0, :, y, 2 + x - k])
                # moving up (y down), the window slides down the field
                assert torch.equal(noise[1, :, f, y, x], field[1, :, y + k, x])
    right = noise[0]
    assert torch.equal(right[:, 4, :, 2:], right[:, 0, :, :-2])  # what was seen moves on
    assert not torch.equal(right[:, 4, :, :2], right[:, 0, :, -2:])  # what enters is fresh, not the far edge


def test_travelling_noise_is_standard_normal_in_every_frame():
    noise = travelling_noise([(1, 0), (0, 1), (-1, 0), (0, -1)] * 64, (4, 8, 16, 16),
                             torch.Generator().manual_seed(1), speed=0.5)
    per_frame = noise.transpose(1, 2).flatten(2)  # (B, F, C·h·w)
    assert per_frame.mean(dim=(0, 2)).abs().max() < 0.02
    assert (per_frame.std(dim=(0, 2)) - 1).abs().max() < 0.02


def test_still_noise_repeats_the_first_frame():
    still = travelling_noise([(0, 1)], (3, 4, 8, 8), torch.Generator().manual_seed(0), speed=0)
    assert torch.equal(still, still[:, :, :1].expand_as(still))


@pytest.mark.parametrize("call, message", [
    (lambda: travelling_noise([], (3, 4, 8, 8)), "directions: expected one"),
    (lambda: travelling_noise([(1, 0)], (3, 8, 8)), "latent_shape: expected"),
    (lambda: travelling_noise([(1, 0)], (3, 4, 8, 8), speed=-1), "noise_speed: expected"),
    (lambda: stated_directions(None), "metadata: travelling noise needs"),
    (lambda: stated_directions([RIGHT, {"scene": {}}]), r"metadata\[1\]: travelling noise needs motion.direction"),
    (lambda: stated_directions([{"motion": {"direction": "sideways"}}]), "metadata\\[0\\]"),
])
def test_bad_arguments_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.fixture(scope="module")
def travelling():
    return adapter_for(make_tiny_animatediff_pipeline(), 2.0, num_frames=4, noise_speed=1.0)


def test_the_adapter_draws_travelling_noise_and_plain_noise_without_a_speed(travelling):
    noise = travelling.initial_noise([RIGHT, UP], torch.Generator().manual_seed(3))
    expected = travelling_noise([(1, 0), (0, -1)], travelling.latent_shape, torch.Generator().manual_seed(3), 1.0)
    assert torch.equal(noise, expected)
    plain = adapter_for(travelling.pipeline, 2.0, num_frames=4)
    image = adapter_for(make_tiny_sd_pipeline(), 2.0)
    for adapter in (plain, image):  # standard normal, as sampling drew it before the prior existed
        drawn = adapter.initial_noise([{}, {}], torch.Generator().manual_seed(3))
        assert torch.equal(drawn, torch.randn((2, *adapter.latent_shape), generator=torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="noise_speed: StableDiffusionAdapter .* takes no such option"):
        adapter_for(image.pipeline, 2.0, noise_speed=0.5)
    with pytest.raises(ValueError, match="noise_speed: expected None or latent pixels per frame"):
        adapter_for(travelling.pipeline, 2.0, num_frames=4, noise_speed=-0.5)
    assert VideoConfig(num_frames=8, noise_speed=0.5).options() == {"num_frames": 8, "noise_speed": 0.5}


def test_rollouts_start_from_the_prior_one_draw_per_group(travelling):
    prompts, metadata = ["a red circle"] * 2 + ["two blue squares"] * 2, [RIGHT, RIGHT, UP, UP]
    policy = travelling.make_policy(2, 1.0)
    trajectory = sample_trajectories(travelling, policy, prompts, metadata, torch.Generator().manual_seed(5),
                                     group_size=2)
    expected = travelling.initial_noise([RIGHT, UP], torch.Generator().manual_seed(5)).repeat_interleave(2, 0)
    assert torch.equal(trajectory.latents[:, 0], expected)
    with pytest.raises(ValueError, match=r"metadata\[0\]: travelling noise needs motion.direction"):
        sample_trajectories(travelling, policy, prompts)
    with pytest.raises(ValueError, match="metadata: expected one dict per prompt"):
        sample_trajectories(travelling, policy, prompts, metadata[:3])


def test_reno_starts_each_prompt_from_its_seeded_prior(travelling):
    rows = seeded_noise(travelling, [11, 12], [RIGHT, UP])
    for row, seed, meta in zip(rows, (11, 12), (RIGHT, UP)):
        assert torch.equal(row, travelling.initial_noise([meta], torch.Generator().manual_seed(seed))[0])
    result = optimize_noise(travelling, ["a red circle", "two blue squares"], Brightness(),
                            metadata=[RIGHT, UP], seeds=[11, 12], iterations=1, guidance_scale=2.0)
    assert torch.equal(result.initial_noise, rows)
