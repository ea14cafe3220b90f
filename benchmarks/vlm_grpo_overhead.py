"""What ``VLMGRPOTrainer`` costs per step against stock TRL ``GRPOTrainer``, and whether it trains the same weights.

Both trainers get the same shipped world VLM (loaded afresh for each run), the same world VQA rows, the same
reward functions (mmalign's ``RewardFunction`` adapters, which TRL calls like any other) and the same
``GRPOConfig``; mmalign's additions stay off (no dynamic sampling, no explicit reference), so the difference is
the subclass's own path. Runs alternate stock, wrapper, stock, … ``--repeats`` times; each run's first step is
warm-up and left out. Prints the median seconds per optimiser step of each, the ratio wrapper / stock, and the
largest weight difference between the two after the same steps (0 when the wrapper changes nothing TRL does).
Run it after a TRL upgrade: a ratio that moves, or weights that part, show up here.

    python benchmarks/vlm_grpo_overhead.py --steps 20 --repeats 3 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time


def _run(trainer_class, rows, args, threads: int) -> tuple[list[float], dict]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
    from trl import GRPOConfig

    from mmalign.trainers.vlm_grpo import reward_functions
    from mmalign.world.vlm import vlm_path

    torch.set_num_threads(threads)
    model = AutoModelForImageTextToText.from_pretrained(vlm_path())
    processor = AutoProcessor.from_pretrained(vlm_path())
    processor.tokenizer.padding_side = "left"
    functions, weights = reward_functions(["world_accuracy", {"name": "format", "think": False}])
    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kwargs):
            if not ends:
                ends.append(time.perf_counter())

        def on_step_end(self, a, state, control, **kwargs):
            ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out, num_generations=args.generations, per_device_train_batch_size=args.batch,
            max_steps=args.steps, max_completion_length=24, learning_rate=3e-4, beta=0.0, loss_type="dapo",
            reward_weights=weights, use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none",
            save_strategy="no", logging_steps=1, disable_tqdm=True, remove_unused_columns=False, seed=0,
        )
        trainer = trainer_class(model, functions, config, train_dataset=Dataset.from_list(rows),
                                processing_class=processor, callbacks=[Clock()])
        trainer.train()
    steps = [b - a for a, b in zip(ends, ends[1:])]
    return steps[1:], {k: v.detach().clone() for k, v in model.state_dict().items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="optimiser steps per run (the first is warm-up)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each trainer, alternating")
    parser.add_argument("--batch", type=int, default=64, help="completions per step")
    parser.add_argument("--generations", type=int, default=8, help="completions per question")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.steps < 2 or args.repeats < 1 or args.batch % args.generations:
        parser.error(f"--steps: expected ≥ 2, --repeats ≥ 1 and --batch a multiple of --generations, got "
                     f"{args.steps}, {args.repeats}, {args.batch}, {args.generations}")

    from trl import GRPOTrainer

    from mmalign.trainers.vlm_grpo import VLMGRPOTrainer
    from mmalign.world.vqa import world_vqa_rows

    rows = world_vqa_rows(512, "heldout", 0, jitter=0.5)
    times: dict[str, list[float]] = {"stock": [], "mmalign": []}
    weights: dict[str, dict] = {}
    for _ in range(args.repeats):
        for name, cls in (("stock", GRPOTrainer), ("mmalign", VLMGRPOTrainer)):
            steps, weights[name] = _run(cls, rows, args, args.threads)
            times[name] += steps
    median = {name: statistics.median(values) for name, values in times.items()}
    difference = max(float((weights["stock"][k] - v).abs().max()) for k, v in weights["mmalign"].items())
    result = {"steps_timed": {k: len(v) for k, v in times.items()}, "seconds_per_step": median,
              "ratio": median["mmalign"] / median["stock"], "max_weight_difference": difference}
    print(f"world VLM, {args.batch} completions per step ({args.generations} per question), {args.threads} thread(s), "
          f"{len(times['stock'])} timed steps each")
    print(f"stock trl.GRPOTrainer : {median['stock']:.4f} s/step (median)")
    print(f"mmalign VLMGRPOTrainer: {median['mmalign']:.4f} s/step (median)")
    print(f"ratio mmalign / stock : {result['ratio']:.3f}")
    print(f"largest weight difference after {args.steps} steps: {difference:.3g}")
    return result


if __name__ == "__main__":
    main()
