"""The ``mmalign`` command: one small function per subcommand over the Python API."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from mmalign import __version__
from mmalign.config import int_at_least, positive_int
from mmalign.eval.bench_rewards import BENCHED
from mmalign.eval.preference import PROTOCOLS

__all__ = ["main", "build_parser"]


def _cmd_recipes(args: argparse.Namespace) -> int:
    from mmalign.config import list_recipes, recipes_dir

    recipes = list_recipes()
    if not recipes:
        print(f"no recipes found in {recipes_dir()}")
        return 1
    width = max(map(len, recipes))
    for name, description in recipes.items():
        print(f"{name:<{width}}  {description}")
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from mmalign.config import load_recipe, validate_recipe
    from mmalign.eval.scoring import ScoreRecipe, format_summary, run_score

    recipe_name, overrides = _split_recipe_and_overrides(args.recipe_and_overrides)
    flags = {
        "images": args.images,
        "prompts": args.prompts,
        "rewards": [_parse_reward(r) for r in args.reward] if args.reward else None,
        "batch_size": args.batch_size,
        "size": args.size,
        "device": args.device,
        "out": args.out,
        "on_error": "skip" if args.skip_unreadable else None,
    }
    flags = {k: v for k, v in flags.items() if v is not None}
    if recipe_name:
        recipe = load_recipe(recipe_name, overrides, schema=ScoreRecipe)
        recipe = validate_recipe({**recipe.model_dump(), **flags}, ScoreRecipe, source=recipe_name)
    else:
        from mmalign.config import apply_overrides, parse_overrides

        data = apply_overrides({"task": "score", **flags}, parse_overrides(overrides))
        recipe = validate_recipe(data, ScoreRecipe, source="command line")
    result = run_score(recipe, progress=not args.quiet)
    print(format_summary(result.summary))
    print(f"wrote {len(result.batch)} rows to {recipe.out}")
    return 0


def _cmd_rewards(args: argparse.Namespace) -> int:
    from mmalign.rewards import available

    rewards = available()
    width = max(map(len, rewards))
    for name, description in rewards.items():
        print(f"{name:<{width}}  {description}")
    return 0


def _cmd_eval_reward(args: argparse.Namespace) -> int:
    from mmalign.eval.preference import read_pairs
    from mmalign.eval.reward_accuracy import format_accuracy, reward_accuracy
    from mmalign.eval.scoring import build_rewards

    records = read_pairs(args.pairs)
    rewards = build_rewards([_parse_reward(r) for r in args.reward], args.device)
    table = reward_accuracy(records, rewards, args.protocol or PROTOCOLS, args.batch_size, not args.quiet)
    print(f"{len(records)} records from {args.pairs}")
    print(format_accuracy(table))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"pairs": str(args.pairs), "accuracy": table}, indent=2) + "\n")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from mmalign.config import load_recipe
    from mmalign.trainers import trainer_for

    recipe = load_recipe(args.recipe, args.overrides)
    trainer = trainer_for(recipe)(recipe, progress=not args.quiet)
    trainer.setup()
    try:
        trainer.train()
        summary = trainer.report()
        exported = trainer.export()
    finally:
        trainer.cleanup()
    if summary:
        width = max([24, *map(len, summary["before"])])
        for name in summary["before"]:
            b, a = summary["before"][name], summary["after"][name]
            d = summary.get("paired_change", {}).get(name)
            change = f"  change {_interval(d)}" if d else ""
            print(f"{name:>{width}}: {b['mean']:.4f} [{b['ci_low']:.4f}, {b['ci_high']:.4f}] -> "
                  f"{a['mean']:.4f} [{a['ci_low']:.4f}, {a['ci_high']:.4f}]{change}  (n={a['n']})")
        if summary.get("diversity_ratio") is not None:
            print(f"{'diversity_ratio':>{width}}: {summary['diversity_ratio']:.4f}  (after/before of the mean Vendi score)")
        if summary.get("by_kind"):
            print(f"per kind (paired 95% CI): {summary['by_kind']['text']}")
    print(f"run folder: {trainer.run_dir}  (weights: {exported})")
    for name in ("summary.json", "grid.png", "curves.png"):
        if (Path(trainer.run_dir) / name).is_file():
            print(f"{name:>14}: {Path(trainer.run_dir) / name}")
    return 0


def _cmd_optimize(args: argparse.Namespace) -> int:
    from mmalign.config import load_recipe
    from mmalign.inference.run import ReNORecipe, run_reno

    recipe = load_recipe(args.recipe, args.overrides)
    if not isinstance(recipe, ReNORecipe):
        raise ValueError(f"recipe task: {recipe.task!r} is not noise optimisation (task: reno); "
                         f"`mmalign train` or `mmalign score` runs it")
    summary = run_reno(recipe, progress=not args.quiet)
    print(f"{summary['prompts']} prompts × {summary['iterations']} reward calls, "
          f"{summary['seconds_per_prompt']:.2f} s per prompt")
    width = max(map(len, summary["rewards"]))
    for name, table in summary["rewards"].items():
        change = summary["paired_change"][name]
        line = f"{name:>{width}}: {table['initial']['mean']:.4f} -> ReNO {table['reno']['mean']:.4f}"
        line += (f" (change {_interval(change['reno'])}; rose for {summary['fraction_rose'][name]:.0%} of prompts, "
                 f"fell for {summary['fraction_fell'][name]:.0%})")
        if "best_of_n" in table:
            line += f" | best-of-N {table['best_of_n']['mean']:.4f} (ReNO − best-of-N {_interval(change['reno_minus_best_of_n'])})"
        print(line)
    for row in summary["stopped"]:
        print(f"stopped early: {row['prompt']!r}: {row['reason']}")
    print(f"run folder: {recipe.output_dir}")
    for name in ("summary.json", "grid.png", "traces.png", "traces.safetensors", "noise.safetensors"):
        if (Path(recipe.output_dir) / name).is_file():
            print(f"{name:>18}: {Path(recipe.output_dir) / name}")
    return 0


def _cmd_reward_train_artifact(args: argparse.Namespace) -> int:
    from mmalign.eval.artifact import train_artifact_classifier

    encoder = _parse_reward(args.encoder, "--encoder", "an OpenCLIP name or folder") if args.encoder else None
    figures = train_artifact_classifier(
        args.clean, args.artifact, args.out, encoder, steps=args.steps, hidden=args.hidden, heldout=args.heldout,
        seed=args.seed, batch_size=args.batch_size, size=args.size,
        on_error="skip" if args.skip_unreadable else "stop", device=args.device, progress=not args.quiet,
    )
    clean, artifact = figures["clean"], figures["artifact"]
    print(f"held-out AUROC {figures['heldout_auroc']:.4f} ({clean['heldout']} clean, {artifact['heldout']} artifact "
          f"images held out; train AUROC {figures['train_auroc']:.4f} on {clean['train']} + {artifact['train']})")
    print(f"wrote {args.out}  (reward spec: {{name: artifact_classifier, path: {args.out}}})")
    return 0


def _interval(stats: dict) -> str:
    return f"{stats['mean']:+.4f} [{stats['ci_low']:+.4f}, {stats['ci_high']:+.4f}]"


def _cmd_bench_rewards(args: argparse.Namespace) -> int:
    from mmalign.eval.bench_rewards import bench_rewards, format_rows, write_rows

    model = args.model
    if model is None:
        from mmalign.world.assets import proxy_path

        model = proxy_path()
    elif not Path(model).is_dir():
        raise ValueError(f"--model: expected an OpenCLIP folder (open_clip_config.json and weights), got {model!r}, "
                         "which is not a directory")
    judge = args.judge
    if judge is None:
        from mmalign.world.vlm import vlm_path

        judge = vlm_path()
    rows = bench_rewards(model, args.batch_sizes, args.images, args.image_size, repeats=args.repeats,
                         judge=None if judge == "none" else judge, rewards=args.rewards)
    print(format_rows(rows))
    if args.out:
        write_rows(rows, args.out)
    return 0


def _cmd_eval_generator(args: argparse.Namespace) -> int:
    from mmalign.eval.generator import evaluate_generator, load_generator
    from mmalign.eval.scoring import build_rewards
    from mmalign.prompts import PromptSource, load_prompts

    adapter, policy, sampler = load_generator(args.run, args.pipeline, args.device, args.steps, args.eta,
                                              args.guidance_scale, args.frames)
    steps, eta, guidance, pipeline_name = (sampler[k] for k in ("num_steps", "eta", "guidance_scale", "pipeline"))
    video = pipeline_name == "world-video"  # its captions state motion, and gold_video judges its clips
    world = {"world_video" if video else "world": args.split, "n": args.n, "seed": args.prompt_seed}
    source = PromptSource(file=args.prompts) if args.prompts else PromptSource(**world)
    rewards = build_rewards([_parse_reward(r) for r in args.reward or ["gold_video" if video else "gold"]], args.device)
    result = evaluate_generator(
        adapter, policy,
        load_prompts(source), rewards, args.samples_per_prompt, args.seed, progress=not args.quiet,
    )
    encoder, encoder_spec = _diversity_encoder(args.diversity_encoder, pipeline_name, rewards, args.device)
    result.add_diversity(encoder)
    summary = result.summary()
    width = max([24, *map(len, summary)])
    for name, s in summary.items():
        print(f"{name:>{width}}: {s['mean']:.4f}  95% CI [{s['ci_low']:.4f}, {s['ci_high']:.4f}]  n={s['n']}")
    if args.out:
        per_prompt = {"prompts": result.group_prompts(),
                      **{k: [float(v) for v in values] for k, values in result.diversity.items()}}
        out = {"summary": summary, "steps": steps, "eta": eta, "guidance": guidance,
               "diversity_encoder": encoder_spec, "diversity_per_prompt": per_prompt}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


def _cmd_eval_overoptimization(args: argparse.Namespace) -> int:
    from mmalign.config import apply_overrides, load_recipe, parse_overrides, validate_recipe
    from mmalign.eval.overoptimization_run import OverOptimizationRecipe, format_curves, run_overoptimization

    recipe_name, overrides = _split_recipe_and_overrides(args.recipe_and_overrides)
    data = ({"task": "overoptimization"} if recipe_name is None else
            load_recipe(recipe_name, overrides, schema=OverOptimizationRecipe).model_dump())
    flags = {"pipeline": args.pipeline, "run": args.run, "samples_per_prompt": args.samples_per_prompt,
             "num_steps": args.steps, "eta": args.eta, "guidance_scale": args.guidance_scale, "seed": args.seed,
             "batch_size": args.batch_size, "device": args.device, "out": args.out,
             "gold": _parse_reward(args.gold, "--gold") if args.gold else None,
             "proxies": dict(_labelled_proxy(text) for text in args.proxy) if args.proxy else None}
    data.update({k: v for k, v in flags.items() if v is not None})
    if args.run or args.pipeline:  # one generator flag replaces the recipe's generator
        data.update(run=args.run, pipeline=args.pipeline)
    if args.prompts:
        data["prompts"] = {"file": args.prompts}
    elif args.split or args.n or args.prompt_seed is not None:
        world = data.get("prompts") if (data.get("prompts") or {}).get("world") else {"world": "heldout"}
        data["prompts"] = {**world, **{k: v for k, v in (("world", args.split), ("n", args.n),
                                                           ("seed", args.prompt_seed)) if v is not None}}
    if recipe_name is None:
        data = apply_overrides(data, parse_overrides(overrides))
    recipe = validate_recipe(data, OverOptimizationRecipe, source=recipe_name or "command line")
    result = run_overoptimization(recipe, progress=not args.quiet)
    print(format_curves(result))
    for name in ("overoptimization.png", "overoptimization.csv", "overoptimization.json", "scores.csv"):
        print(f"{name:>22}: {Path(recipe.out) / name}")
    return 0


def _labelled_proxy(text: str) -> tuple[str, str | dict]:
    """``LABEL=SPEC`` or a bare ``SPEC`` (labelled by its name, with an ensemble's mode)."""
    label, sep, rest = text.partition("=")
    if sep and not label.lstrip().startswith(("{", "[")):
        return label.strip(), _parse_reward(rest, "--proxy")
    spec = _parse_reward(text, "--proxy")
    if isinstance(spec, dict):
        name = str(spec.get("name", "proxy"))
        return (f"{name}-{spec['mode']}" if "mode" in spec else name), spec
    return (spec if isinstance(spec, str) else "proxy"), spec


def _diversity_encoder(text: str | None, pipeline: str | None, rewards: dict, device: str):
    """The image encoder of ``--diversity-encoder`` (``none``: pixel metrics only); by default the world's
    ``proxy`` for the world pipeline, else the first scoring reward that has one, else none (with a note)."""
    from mmalign.eval.diversity import image_encoder
    from mmalign.rewards import build

    if text is not None:
        if text.strip().lower() == "none":
            return None, None
        spec = _parse_reward(text)
        return image_encoder(build(spec).to(device)), spec
    if pipeline in ("world", "world-video"):
        return image_encoder(build("proxy").to(device)), "proxy"
    for name, reward in rewards.items():
        try:
            return image_encoder(reward), name
        except ValueError:
            continue
    print("diversity: no reward with an image encoder; pixel metrics only (give --diversity-encoder for Vendi)")
    return None, None


def _cmd_bench_train(args: argparse.Namespace) -> int:
    from mmalign.models.pipelines import load_pipeline
    from mmalign.trainers.bench import (
        DEFAULT_VARIANTS,
        bench_algorithms,
        bench_prdp_update,
        format_algorithm_rows,
        format_train_rows,
    )

    def load():
        return load_pipeline(args.pipeline).to(args.device)

    print(f"{args.prompts} prompts × {args.samples_per_prompt} samples, {args.steps} DDIM steps, LoRA, on {args.device}; "
          f"reward jpeg_incompressibility (back-propagation: {args.backprop_reward})")
    rows = bench_algorithms(load, args.algorithms or DEFAULT_VARIANTS, args.prompts, args.samples_per_prompt,
                            args.steps, args.epochs, differentiable_reward=args.backprop_reward)
    print(format_algorithm_rows(rows))
    print("\nThe update alone (median seconds; peak memory; the first update's gradient norm, before clipping):")
    names = [r.task for r in rows]
    print(format_train_rows([r.update for r in rows], "prdp" if "prdp" in names else names[0]))
    if args.prdp_paths:
        print("\nPRDP update, per-timestep vs whole-graph backward:")
        print(format_train_rows(bench_prdp_update(load(), args.group_sizes, args.steps)))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from mmalign.demos import require_gradio

    try:
        require_gradio()
    except ImportError as err:
        raise ValueError(str(err)) from None
    from mmalign.demos.app import build_demo
    from mmalign.demos.launch import LaunchSettings, Limits, allowed_folders, launch

    limits = Limits(args.max_upload_mb, args.max_image_side, args.max_images)
    settings = LaunchSettings(args.host, args.port, args.share, args.concurrency, args.max_queue,
                              allowed_folders(args.allow_dir or []), limits)
    demo = build_demo(args.name, args.pipeline, args.run or [], [_parse_reward(r) for r in args.reward or []],
                      args.device, limits, settings.allowed_dirs, args.steps, args.guidance_scale,
                      args.max_iterations)
    launch(demo, settings)
    return 0


def _split_recipe_and_overrides(items: Sequence[str]) -> tuple[str | None, list[str]]:
    if items and "=" not in items[0]:
        return items[0], list(items[1:])
    return None, list(items)


def _parse_reward(text: str, flag: str = "--reward", what: str = "a reward name") -> str | dict:
    """``clip`` or a JSON object such as ``{"name": "clip", "model": "ViT-B-32"}`` (``flag``'s value)."""
    text = text.strip()
    if text.startswith(("{", "[")):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{flag}: expected {what} or a JSON object, got {text!r} ({err})") from None
    return text


def _recipe_command(sub, name: str, func, help: str, description: str) -> None:
    """A subcommand that runs one recipe: ``mmalign NAME RECIPE [KEY=VALUE ...] [--quiet]``."""
    command = sub.add_parser(name, help=help, description=description)
    command.add_argument("recipe", help="shipped recipe name or YAML file")
    command.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    command.add_argument("--quiet", action="store_true", help="no progress bars")
    command.set_defaults(func=func)


class _UsageError(Exception):
    """A command line argparse rejects, as one line: ``mmalign eval generator: argument --n: expected …``."""


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors (a bad flag value, a missing argument) end like every other bad input: one
    line on stderr and status 2 from ``main``, instead of the usage text and ``SystemExit``."""

    def error(self, message: str):
        raise _UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mmalign", description="Align image and video generators and vision-language models with rewards."
    )
    parser.add_argument("--version", action="version", version=f"mmalign {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    recipes = sub.add_parser("recipes", help="list the shipped recipes")
    recipes.set_defaults(func=_cmd_recipes)
    rewards = sub.add_parser("rewards", help="list the rewards that specs can name")
    rewards.set_defaults(func=_cmd_rewards)

    reward_group = sub.add_parser("reward", help="train rewards").add_subparsers(
        dest="what", metavar="WHAT", required=True
    )
    train_artifact = reward_group.add_parser(
        "train-artifact", help="train the artifact classifier from a clean and an artifact folder",
        description="Train artifact_classifier: embed both folders with a frozen CLIP image encoder, fit a small "
        "head on a seeded split, print the held-out AUROC and save the head (safetensors + config.json) as --out, "
        "which a recipe names as {name: artifact_classifier, path: OUT}.",
    )
    train_artifact.add_argument("--clean", required=True, help="folder of images without artifacts")
    train_artifact.add_argument("--artifact", required=True, help="folder of images with artifacts")
    train_artifact.add_argument("--out", required=True, help="folder to write the head into")
    train_artifact.add_argument("--encoder", help="OpenCLIP name or folder, or a JSON object {backend, model, "
                                "pretrained, processor} (default: OpenCLIP ViT-B-32/openai)")
    train_artifact.add_argument("--steps", type=positive_int, default=300, help="AdamW steps on the head")
    train_artifact.add_argument("--hidden", type=int_at_least(0), default=0,
                                help="width of the head's hidden layer (0: logistic regression)")
    train_artifact.add_argument("--heldout", type=float, default=0.2, help="fraction of each folder held out")
    train_artifact.add_argument("--seed", type=int, default=0, help="seed of the split and the head's start")
    train_artifact.add_argument("--batch-size", type=positive_int, default=32, help="images per encoder call")
    train_artifact.add_argument("--size", type=positive_int, help="resize images to a square of this size")
    train_artifact.add_argument("--skip-unreadable", action="store_true",
                                help="leave out files that are not readable images, with a warning (default: stop)")
    train_artifact.add_argument("--device", default="cpu")
    train_artifact.add_argument("--quiet", action="store_true", help="no progress bars")
    train_artifact.set_defaults(func=_cmd_reward_train_artifact)

    score = sub.add_parser(
        "score",
        help="score a folder of images with rewards → CSV/JSON",
        description="Score images with rewards. Give a recipe (name or YAML) and/or flags; key=value overrides "
        "any recipe field, e.g. `mmalign score score-example batch_size=4`.",
    )
    score.add_argument("recipe_and_overrides", nargs="*", metavar="[RECIPE] [KEY=VALUE ...]")
    score.add_argument("--images", help="folder of images")
    score.add_argument("--prompts", help="prompts .txt (one per image, in file-name order) or .jsonl (file, prompt)")
    score.add_argument("--reward", action="append", help="reward name or JSON spec; repeat for several")
    score.add_argument("--batch-size", type=int)
    score.add_argument("--size", type=int, help="resize images to a square of this size")
    score.add_argument("--device")
    score.add_argument("--out", help="output .csv or .json")
    score.add_argument("--skip-unreadable", action="store_true",
                       help="leave out files that are not readable images, with a warning naming them (default: stop)")
    score.add_argument("--quiet", action="store_true", help="no progress bar")
    score.set_defaults(func=_cmd_score)

    from mmalign.world.commands import add_world_parser

    add_world_parser(sub)

    _recipe_command(
        sub, "train", _cmd_train, "train a generator with a recipe (e.g. shapes-prdp)",
        "Run a training recipe; key=value overrides any field. A run folder that holds a checkpoint is resumed. "
        "Ends with the before/after report in the run folder.",
    )
    _recipe_command(
        sub, "optimize", _cmd_optimize, "optimise samples' initial noise against rewards (ReNO), beside best-of-N",
        "Run a noise-optimisation recipe (task: reno, e.g. shapes-reno); key=value overrides any field. Writes the "
        "initial / ReNO / best-of-N grid, the traces (plot and tensors), the noises and summary.json into the run "
        "folder.",
    )

    bench = sub.add_parser("bench", help="benchmarks: figures with the ratio to a reference measured in the same run")
    benches = bench.add_subparsers(dest="what", metavar="WHAT", required=True)
    rewards_bench = benches.add_parser(
        "rewards", help="images/s of CLIP-family rewards and vqascore vs naive one-image loops",
        description="images/s of mmalign's CLIP-family rewards at several batch sizes beside a naive loop (PIL "
        "preprocessing, one image and prompt at a time) on the same model and images.",
    )
    rewards_bench.add_argument("--model", help="OpenCLIP folder (default: the world's proxy)")
    rewards_bench.add_argument("--judge", help="VLM hub id or folder for vqascore against one pair at a time "
                               "(default: the world's VLM; 'none' skips it)")
    rewards_bench.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1, 8, 32])
    rewards_bench.add_argument("--images", type=positive_int, default=64, help="images per measurement")
    rewards_bench.add_argument("--image-size", type=positive_int, default=64, help="side of the random test images")
    rewards_bench.add_argument("--repeats", type=positive_int, default=1)
    rewards_bench.add_argument("--rewards", nargs="+", choices=BENCHED, default=list(BENCHED),
                               help="which rewards to time (default: all)")
    rewards_bench.add_argument("--out", help="write the figures as JSON")
    rewards_bench.set_defaults(func=_cmd_bench_rewards)
    train_bench = benches.add_parser(
        "train", help="the diffusion algorithms side by side: samples/s and peak memory at equal batch",
        description="PRDP, DDPO, diffusion GRPO and the back-propagation trainer (draft-all: DRaFT-K with K = every "
        "step; direct-align; +ckpt: UNet and VAE decoder checkpointing), each its own trainer for a few epochs at "
        "the same batch: seconds per epoch and samples/s; then the update alone: samples/s, peak memory saved for "
        "backward (and CUDA's peak) and gradient norm, as ratios to PRDP's. --prdp-paths adds one PRDP update "
        "per group size B with the per-timestep and the whole-graph backward.",
    )
    train_bench.add_argument("--pipeline", default="world", help="'world', a hub id or a pipeline folder")
    train_bench.add_argument("--algorithms", nargs="+", help="task names or draft-all[+ckpt], direct-align[+ckpt] "
                             "(default: prdp, ddpo, diffusion_grpo and the four back-propagation variants)")
    train_bench.add_argument("--backprop-reward", default="proxy", help="the back-propagation trainer's reward")
    train_bench.add_argument("--prompts", type=positive_int, default=2, help="prompts per epoch")
    train_bench.add_argument("--samples-per-prompt", type=positive_int, default=4)
    train_bench.add_argument("--epochs", type=positive_int, default=4, help="epochs per algorithm (the first is not timed)")
    train_bench.add_argument("--prdp-paths", action="store_true", help="also PRDP's two backward paths")
    train_bench.add_argument("--group-sizes", type=positive_int, nargs="+", default=[4, 8, 16], help="B for --prdp-paths")
    train_bench.add_argument("--steps", type=positive_int, default=10, help="DDIM steps of the trajectories")
    train_bench.add_argument("--device", default="cpu")
    train_bench.set_defaults(func=_cmd_bench_train)
    from mmalign.inference import bench as optimize_bench_module

    optimize_bench = benches.add_parser(
        "optimize", help="ReNO prompts/s: batched vs one prompt at a time",
        description=optimize_bench_module.__doc__.split("\n\n")[0],
    )
    optimize_bench_module.add_arguments(optimize_bench)
    optimize_bench.set_defaults(func=optimize_bench_module.run)
    from mmalign.kernels import bench as attention_bench_module

    attention_bench = benches.add_parser(
        "attention", help="fused attention kernels vs SDPA backends (CUDA; --smoke runs tiny shapes on the CPU)",
        description=attention_bench_module.__doc__.split("\n\n")[0],
    )
    attention_bench_module.add_arguments(attention_bench)
    attention_bench.set_defaults(func=attention_bench_module.run)

    from mmalign.demos import DEMOS

    demo = sub.add_parser(
        "demo", help="gradio demos: rewards, ReNO live, a run beside its base (needs mmalign[demo])",
        description="Launch a gradio demo on the embedded world (or the --pipeline, --run and --reward named): "
        + "; ".join(f"{k}: {v}" for k, v in DEMOS.items()) + ". Bound to 127.0.0.1, uploads and image sizes "
        "limited, files served only from --allow-dir folders, requests queued (docs/demos.md).",
    )
    demo.add_argument("name", choices=list(DEMOS), help="which demo")
    demo.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    demo.add_argument("--port", type=positive_int, help="port (default: gradio's first free one from 7860)")
    demo.add_argument("--share", action="store_true", help="also open a public gradio.live link (printed warning)")
    demo.add_argument("--pipeline", default="world",
                      help="'world', a hub id or a pipeline folder; 'none': the rewards demo scores uploads only")
    demo.add_argument("--run", action="append", help="training run folder for compare; repeat for several")
    demo.add_argument("--reward", action="append", help="reward name or JSON spec; repeat (default: the demo's)")
    demo.add_argument("--steps", type=positive_int, help="sampler steps (default: the pipeline's evaluation "
                      "setting; ReNO: 4)")
    demo.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale")
    demo.add_argument("--max-iterations", type=positive_int, default=50, help="ReNO: most reward calls per run")
    demo.add_argument("--allow-dir", action="append", help="a folder whose images the demo may read and serve; "
                      "repeat (default: none)")
    demo.add_argument("--max-upload-mb", type=float, default=10.0, help="largest uploaded file")
    demo.add_argument("--max-image-side", type=positive_int, default=2048, help="largest image side in pixels")
    demo.add_argument("--max-images", type=positive_int, default=16, help="most images per request")
    demo.add_argument("--concurrency", type=positive_int, default=2, help="requests run at once (the rest queue)")
    demo.add_argument("--max-queue", type=positive_int, default=64, help="most requests waiting in the queue")
    demo.add_argument("--device", default="cpu")
    demo.set_defaults(func=_cmd_demo)

    evaluate = sub.add_parser("eval", help="evaluate rewards and generators").add_subparsers(
        dest="what", metavar="WHAT", required=True
    )
    reward = evaluate.add_parser(
        "reward", help="preference accuracy of rewards on labelled pairs",
        description="Pairwise accuracy of each reward against pairs.jsonl labels, under the HPDv2, Pick-a-Pic "
        "and ImageReward protocols (docs/rewards.md).",
    )
    reward.add_argument("--pairs", required=True, help="pairs.jsonl: {prompt, a, b, label} or {prompt, images, ranks}")
    reward.add_argument("--reward", action="append", required=True, help="reward name or JSON spec; repeat")
    reward.add_argument("--protocol", action="append", choices=PROTOCOLS, help="default: all three")
    reward.add_argument("--batch-size", type=positive_int, default=32)
    reward.add_argument("--device", default="cpu")
    reward.add_argument("--out", help="write the table as JSON")
    reward.add_argument("--quiet", action="store_true", help="no progress bar")
    reward.set_defaults(func=_cmd_eval_reward)
    generator = evaluate.add_parser(
        "generator", help="gold/proxy evaluation of a run or pipeline on a prompt split",
        description="Sample a pipeline (or a training run's result) on world prompts or a prompt file with fixed "
        "seeds, score the images, print mean and 95%% CI per reward and of the per-prompt diversity metrics "
        "(docs/architecture.md, Diversity).",
    )
    generator.add_argument("--run", help="training run folder (its config, base pipeline and exported weights)")
    generator.add_argument("--pipeline", help="'world', 'world-video', a hub id or a pipeline folder")
    generator.add_argument("--split", choices=["train", "heldout"], default="heldout",
                           help="world prompt split (the video captions for world-video)")
    generator.add_argument("--n", type=positive_int, default=64, help="world prompts")
    generator.add_argument("--prompt-seed", type=int, default=1)
    generator.add_argument("--prompts", help="prompt file (.txt or .jsonl) instead of the world")
    generator.add_argument("--samples-per-prompt", type=positive_int, default=4)
    generator.add_argument("--reward", action="append",
                           help="reward name or JSON spec; default: gold (gold_video for world-video)")
    generator.add_argument("--frames", type=positive_int,
                           help="frames of each clip, video pipelines only (default: the run's, else the pipeline's)")
    generator.add_argument("--steps", type=positive_int, help="DDIM steps (default: the run's, else 20)")
    generator.add_argument("--eta", type=float, help="DDIM η (default: the run's, else 1)")
    generator.add_argument("--guidance-scale", type=float, help="CFG scale (default: the run's, else 5)")
    generator.add_argument("--seed", type=int, default=1234, help="noise seed")
    generator.add_argument(
        "--diversity-encoder", metavar="REWARD",
        help="CLIP-type reward (name or JSON spec) whose image encoder embeds the samples for the per-prompt "
        "diversity metrics (Vendi, pairwise distance); 'none' = pixel metrics only; default: 'proxy' for the "
        "world pipeline, else the first --reward with an image encoder",
    )
    generator.add_argument("--device", default="cpu")
    generator.add_argument("--out", help="write the summary as JSON")
    generator.add_argument("--quiet", action="store_true")
    generator.set_defaults(func=_cmd_eval_generator)
    overopt = evaluate.add_parser(
        "overoptimization", help="best-of-n by proxies, judged by gold, against KL (over-optimisation curves)",
        description="Sample N images per prompt once, score them with gold and every proxy (an ensemble's members "
        "one by one, combined with statistics of all samples), and write the unbiased best-of-n curves for n = 1, "
        "2, 4, … N of each proxy against KL = log n − (n−1)/n with 95%% CIs over prompts: overoptimization.png, "
        ".csv, .json and scores.csv in --out (docs/overoptimization.md). A recipe (name or YAML, task: "
        "overoptimization) and/or flags; key=value overrides any recipe field.",
    )
    overopt.add_argument("recipe_and_overrides", nargs="*", metavar="[RECIPE] [KEY=VALUE ...]")
    overopt.add_argument("--pipeline", help="'world', a hub id or a pipeline folder")
    overopt.add_argument("--run", help="training run folder instead of --pipeline")
    overopt.add_argument("--split", choices=["train", "heldout"], help="world prompt split (default: heldout)")
    overopt.add_argument("--n", type=positive_int, help="world prompts")
    overopt.add_argument("--prompt-seed", type=int, help="seed of the world prompts")
    overopt.add_argument("--prompts", help="prompt file (.txt or .jsonl) instead of the world")
    overopt.add_argument("--samples-per-prompt", type=int_at_least(2), help="N, the largest n (default 64)")
    overopt.add_argument("--proxy", action="append", metavar="[LABEL=]SPEC",
                         help="a proxy reward (name or JSON spec; {\"name\": \"ensemble\", \"mode\": \"uwo\", "
                              "\"members\": [...]} for an ensemble); repeat; replaces the recipe's proxies")
    overopt.add_argument("--gold", help="the reward treated as gold (name or JSON spec)")
    overopt.add_argument("--steps", type=positive_int, help="DDIM steps (default: the run's, else 20)")
    overopt.add_argument("--eta", type=float, help="DDIM η (default: the run's, else 1)")
    overopt.add_argument("--guidance-scale", type=float, help="CFG scale (default: the run's, else 5)")
    overopt.add_argument("--seed", type=int, help="noise seed")
    overopt.add_argument("--batch-size", type=positive_int, help="images per sampling batch")
    overopt.add_argument("--device")
    overopt.add_argument("--out", help="output folder")
    overopt.add_argument("--quiet", action="store_true", help="no progress bar")
    overopt.set_defaults(func=_cmd_eval_overoptimization)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except _UsageError as err:
        print(err, file=sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except ValueError as err:  # RecipeError and input validation: a message, not a traceback
        print(f"mmalign {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
