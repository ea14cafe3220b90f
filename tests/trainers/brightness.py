"""A tiny run against mean brightness, shared by the trainers' "training raises the reward" tests."""

from diffusion_run import Brightness, config

from mmalign.rewards import register


def brightness_run(trainer_class, algorithm, tmp_path, tiny_sd_factory, epochs=6, **overrides):
    """Train full fine-tuning on brightness; the report's before/after reward summaries (same prompts, seeds)."""
    register("brightness", Brightness)
    report = {"prompts": {"world": "train", "n": 4, "seed": 0}, "samples_per_prompt": 8, "rewards": [],
              "grid_prompts": 0}
    base = config(str(tmp_path / "run"), epochs, algorithm)
    cfg = type(base).model_validate({**base.model_dump(), "reward": ["brightness"], "lora": None, "report": report,
                                     **overrides})
    trainer = trainer_class(cfg, pipeline=tiny_sd_factory(seed=0), progress=False)
    trainer.train()
    summary = trainer.report()
    trainer.cleanup()
    return summary["before"]["reward"], summary["after"]["reward"]
