"""Runs a tiny VLM GRPO job through the recipe runner; used by the multi-process and kill tests as a subprocess.

It ends right after training, as a user's script may: the trainer itself must leave the process group
in a state the interpreter can exit from (see ``mmalign.trainers.distributed``).

usage: python vlm_grpo_run.py OUTPUT_DIR STEPS [--dynamic-sampling] [--lora] [--kill-after-step N]
(--kill-after-step: die with SIGKILL right after the checkpoint of step N is written; one is written every step)
"""

import json
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ holds tiny_models.py
from tiny_models import make_tiny_vlm  # noqa: E402

from mmalign.trainers.vlm_grpo.recipe import VLMGRPOConfig, VLMGRPORecipeTrainer  # noqa: E402


def config(output_dir: str, steps: int, dynamic: bool = False, lora: bool = False) -> VLMGRPOConfig:
    return VLMGRPOConfig(
        model="tiny",
        data={"world": {"n": 32, "seed": 0}},
        rewards=[{"name": "world_accuracy"}, {"name": "length_penalty", "target": 0, "limit": 40, "unit": "chars"}],
        dynamic_sampling_rounds=2 if dynamic else None,
        lora={"rank": 4} if lora else None,
        grpo={"num_generations": 4, "per_device_train_batch_size": 4, "max_steps": steps, "max_completion_length": 6,
              "learning_rate": 1e-2, "beta": 0.05, "save_steps": 1, "shuffle_dataset": True},
        output_dir=output_dir,
        report=None,
    )


def kill_after(step_to_die: int):
    """A callback that kills the process right after the checkpoint of ``step_to_die`` (the recipe's own callbacks,
    the reward state among them, run before it)."""
    from transformers import TrainerCallback

    class Kill(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == step_to_die:
                os.kill(os.getpid(), signal.SIGKILL)

    return Kill()


if __name__ == "__main__":
    out, steps = sys.argv[1], int(sys.argv[2])
    model, processor = make_tiny_vlm(seed=0)
    runner = VLMGRPORecipeTrainer(config(out, steps, "--dynamic-sampling" in sys.argv, "--lora" in sys.argv), model, processor, progress=False)
    if "--kill-after-step" in sys.argv:
        runner.setup()
        runner.trainer.add_callback(kill_after(int(sys.argv[sys.argv.index("--kill-after-step") + 1])))
    runner.train()
    acc = runner.trainer.accelerator
    trained = acc.unwrap_model(runner.trainer.model)
    rank = acc.process_index
    torch.save({k: v.detach().clone() for k, v in trained.state_dict().items()}, Path(out) / f"final-rank{rank}.pt")
    info = {"world_size": acc.num_processes, "distributed_type": str(acc.distributed_type), "steps": runner.trainer.state.global_step}
    (Path(out) / f"done-rank{rank}.json").write_text(json.dumps(info))
