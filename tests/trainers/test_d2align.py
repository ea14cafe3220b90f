"""D²-Align end to end on the tiny pipeline: stage 1 learns b from the frozen generator's samples, stage 2 trains
the generator on the corrected reward, the correction is saved atomically and loaded back on resume."""

import json

import pytest
import torch

from mmalign.config import TASKS, import_object
from mmalign.rewards.direction import DirectionCorrected, load_correction, save_correction
from mmalign.trainers.d2align import CORRECTION_FILE, D2AlignConfig, D2AlignTrainer
from mmalign.trainers.lora import trainable_state


def d2_config(output_dir, clip_dir, **overrides):
    reward = {"name": "clip", "model": str(clip_dir), "pretrained": None, "clamp": False}
    return D2AlignConfig(**{
        "pipeline": "tiny", "prompts": {"world": "train", "n": 16, "seed": 0}, "reward": [reward],
        "prompts_per_epoch": 2, "samples_per_prompt": 2, "prompts_per_update": 2, "num_steps": 3,
        "guidance_scale": 2.0, "learning_rate": 1e-2, "lora": {"rank": 2, "alpha": 2}, "report": None, "epochs": 1,
        "correction_prompts": 4, "correction_steps": 100, "correction_radius": 0.2, "output_dir": str(output_dir),
        **overrides,
    })


def test_config_and_task_table():
    assert import_object(TASKS["d2align"].config) is D2AlignConfig
    assert import_object(TASKS["d2align"].trainer) is D2AlignTrainer
    cfg = D2AlignConfig(pipeline="world", prompts={"world": "train"}, reward=["preference_proxy"])
    assert (cfg.task, cfg.method, cfg.omega, cfg.correction) == ("d2align", "direct_align", 1.5, None)
    with pytest.raises(ValueError, match="omega"):  # ω ≤ 0.5 would turn the correction towards the bias
        D2AlignConfig(pipeline="world", prompts={"world": "train"}, reward=["preference_proxy"], omega=0.4)
    with pytest.raises(ValueError, match="not differentiable"):
        D2AlignConfig(pipeline="world", prompts={"world": "train"}, reward=["jpeg_compressibility"])


def test_refuses_a_reward_that_is_not_clip_type(tmp_path, tiny_sd_factory):
    import diffusion_run  # noqa: F401  (registers the differentiable "brightness" reward)

    cfg = d2_config(tmp_path / "run", tmp_path).model_copy(update={"reward": ["brightness"]})
    with pytest.raises(ValueError, match="'brightness'"):
        D2AlignTrainer(cfg, pipeline=tiny_sd_factory(seed=0), progress=False).setup()
    assert not (tmp_path / "run" / CORRECTION_FILE).exists()


def test_stage_one_moves_b_and_stage_two_moves_the_generator(tmp_path, tiny_sd_factory, tiny_open_clip_dir):
    run = tmp_path / "run"
    trainer = D2AlignTrainer(d2_config(run, tiny_open_clip_dir), pipeline=tiny_sd_factory(seed=0), progress=False)
    trainer.setup()
    reward = trainer.loop.reward
    assert isinstance(reward, DirectionCorrected) and reward.omega == 1.5
    b, meta = load_correction(run / CORRECTION_FILE)
    assert sorted(p.name for p in run.iterdir() if "correction" in p.name) == [CORRECTION_FILE]  # no temp file
    assert torch.equal(reward.correction.cpu(), b)
    assert abs(float(b.norm()) - 0.2) < 1e-5
    assert meta["reward"] == "clip" and meta["samples"] == str(4 * 2)
    assert float(meta["moved_from_init"]) > 1e-3  # stage 1 moved b from its initial direction
    assert float(meta["objective_after"]) < float(meta["objective_before"])
    assert float(meta["cos_with_mean_image"]) < 0  # away from where the frozen samples sit

    before = {k: v.detach().clone() for k, v in trainable_state(trainer.loop.raw_denoiser).items()}
    trainer.train()
    after = trainable_state(trainer.loop.raw_denoiser)
    assert any(not torch.equal(before[k], after[k]) for k in before), "stage 2 changed no trainable weight"
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("loss", "grad_norm", "reward/mean", "reward/corrected_cosine/mean", "reward/cosine/mean"):
        assert torch.isfinite(torch.tensor(float(row[key]))), (key, row[key])

    # resumed: the run folder's correction is loaded, not learned again
    again = D2AlignTrainer(d2_config(run, tiny_open_clip_dir, epochs=2), pipeline=tiny_sd_factory(seed=0),
                           progress=False)
    again.learn_correction = lambda: pytest.fail("a resumed run must load its correction")
    again.setup()
    assert torch.equal(again.loop.reward.correction.cpu(), b)


def test_a_given_correction_is_used_and_copied(tmp_path, tiny_sd_factory, tiny_open_clip_dir):
    given = save_correction(tmp_path / "b.safetensors", torch.full((32,), 0.01), {"reward": "clip"})
    cfg = d2_config(tmp_path / "run", tiny_open_clip_dir, correction=str(given), omega=2.0)
    trainer = D2AlignTrainer(cfg, pipeline=tiny_sd_factory(seed=0), progress=False)
    trainer.learn_correction = lambda: pytest.fail("a given correction must not be learned")
    trainer.setup()
    assert trainer.loop.reward.omega == 2.0
    assert torch.equal(trainer.loop.reward.correction.cpu(), torch.full((32,), 0.01))
    assert torch.equal(load_correction(tmp_path / "run" / CORRECTION_FILE)[0], torch.full((32,), 0.01))

    other = save_correction(tmp_path / "other.safetensors", torch.full((32,), 0.02), {"reward": "clip"})
    clash = D2AlignTrainer(cfg.model_copy(update={"correction": str(other)}), pipeline=tiny_sd_factory(seed=0),
                           progress=False)
    with pytest.raises(ValueError, match="differs from the one this run was started with"):
        clash.setup()


def test_a_correction_for_another_reward_is_refused(tmp_path, tiny_sd_factory, tiny_open_clip_dir):
    given = save_correction(tmp_path / "b.safetensors", torch.full((32,), 0.01), {"reward": "proxy"})
    cfg = d2_config(tmp_path / "run", tiny_open_clip_dir, correction=str(given))
    with pytest.raises(ValueError, match="learned for reward 'proxy', not 'clip'"):
        D2AlignTrainer(cfg, pipeline=tiny_sd_factory(seed=0), progress=False).setup()
    assert not (tmp_path / "run" / CORRECTION_FILE).exists()
