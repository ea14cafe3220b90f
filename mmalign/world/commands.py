"""``mmalign world ...``: build, sample, render and verify, each a small function over the Python API.

``add_world_parser(subparsers)`` adds the ``world`` command to the ``mmalign`` parser; every leaf sets
``func`` to a function of the parsed arguments that returns an exit status, as the other commands do.
"""

from __future__ import annotations

import argparse
import json

__all__ = ["add_world_parser", "scene_from_prompt"]


def scene_from_prompt(prompt: str, seed: int = 0):
    """The ``Scene`` a grammar caption states, laid out at random by ``seed``; ``ValueError`` otherwise.

    Reads the grammar's own phrase tables, so every caption that ``caption()`` writes parses back.
    """
    from mmalign.world.captions import (
        BACKGROUND_PHRASES,
        BACKGROUND_WORDS,
        COUNT_WORDS,
        POSITION_PHRASES,
        RELATION_PHRASES,
        SHAPE_WORDS,
    )
    from mmalign.world.scenes import COLOURS, SIZES, Scene, SceneObject, layout

    words = prompt.lower().split()
    counts = {w: n for n, w in COUNT_WORDS.items()}
    nouns = {w: s for s, pairs in SHAPE_WORDS.items() for pair in pairs for w in pair}
    positions = {tuple(p.split()): name for name, ps in POSITION_PHRASES.items() for p in ps}
    relations = {tuple(p.split()): (name, k == 1) for name, ps in RELATION_PHRASES.items() for k, p in enumerate(ps)}
    backgrounds = {tuple(p.format(w).split()): name for name, ws in BACKGROUND_WORDS.items() for w in ws
                   for p in BACKGROUND_PHRASES}

    def match(table: dict, at: int):
        for phrase, value in table.items():
            if tuple(words[at : at + len(phrase)]) == phrase:
                return value, at + len(phrase)
        return None, at

    def fail(at: int):
        return ValueError(f"prompt: expected a caption of the world grammar, could not read {prompt!r} at word "
                          f"{at + 1} ({' '.join(words[at:at + 3]) or 'end'!r})")

    groups, relation, swapped, background, i = [], None, False, None, 0
    while True:
        count = counts.get(words[i]) if i < len(words) else None
        if count is None:
            raise fail(i)
        i += 1
        size = words[i] if i < len(words) and words[i] in ("small", "large") else None
        i += size is not None
        if i + 1 >= len(words) or words[i] not in COLOURS or words[i + 1] not in nouns:
            raise fail(i)
        colour, shape = words[i], nouns[words[i + 1]]
        position, i = match(positions, i + 2)
        groups.append((count, colour, shape, size, position))
        if i < len(words) and words[i] == "and":
            i += 1
            continue
        rel, j = match(relations, i)
        if rel is not None and relation is None and len(groups) == 1:
            (relation, swapped), i = rel, j
            continue
        background, i = match(backgrounds, i)
        if i != len(words):
            raise fail(i)
        break
    if swapped:
        groups.reverse()
    total = sum(g[0] for g in groups)
    scale = {1: None, 2: SIZES["medium"], 3: SIZES["small"]}.get(total)
    if scale is None and total != 1:
        raise ValueError(f"prompt: expected 1 to 3 objects, got {total} in {prompt!r}")
    objects = tuple(
        SceneObject(shape, colour, scale=scale or SIZES[size or "medium"], position=position, size=size)
        for count, colour, shape, size, position in groups
        for _ in range(count)
    )
    scene = Scene(objects, background or "black", background is not None, relation)
    return layout(scene, seed)


def _scenes_and_prompts(args: argparse.Namespace):
    """``(scenes, prompts)`` from ``--prompt`` (repeated ``--n`` times) or ``--split``'s prompt set."""
    from mmalign.world.captions import prompt_set

    if args.prompt:
        scene = scene_from_prompt(args.prompt, args.seed)
        return [scene] * args.n, [args.prompt] * args.n
    prompts = prompt_set(args.split, args.n, args.seed)
    return [p.scene for p in prompts], [p.text for p in prompts]


def _verdict(result) -> str:
    failed = [name for name, ok in result.checks.items() if not ok]
    return f"gold {result.score:.2f}" + (f"\nfailed: {', '.join(failed)}" if failed else "")


def _cmd_build(args: argparse.Namespace) -> int:
    from mmalign.world.build import build

    report = build(args.only, args.out, args.steps, args.eval_prompts, progress=not args.quiet,
                   parallel=not args.sequential, threads=args.threads)
    print(json.dumps(report, indent=2))
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from mmalign.eval.grid import image_grid
    from mmalign.world.assets import generate, load_pipeline
    from mmalign.world.verify import verify_batch

    scenes, prompts = _scenes_and_prompts(args)
    pipe = load_pipeline(args.device, path=args.pipeline)
    images = generate(pipe, prompts, args.seed, args.steps, args.guidance)
    verdicts = verify_batch(images, scenes)
    labels = [(f"{p}\n" if not args.prompt else "") + _verdict(v) for p, v in zip(prompts, verdicts)]
    image_grid(images, labels, args.columns).save(args.out)
    mean = sum(v.score for v in verdicts) / len(verdicts)
    print(f"wrote {len(images)} samples to {args.out}; mean gold {mean:.3f}")
    return 0


def _cmd_render(args: argparse.Namespace) -> int:
    from mmalign.eval.grid import image_grid
    from mmalign.world.render import render_batch

    scenes, prompts = _scenes_and_prompts(args)
    images = render_batch(scenes, args.size, args.jitter, args.seed)
    image_grid(images, None if args.prompt else prompts, args.columns, scale=max(1, 128 // args.size)).save(args.out)
    print(f"wrote {len(images)} renders to {args.out}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from PIL import Image

    from mmalign.world.scenes import Scene
    from mmalign.world.verify import verify

    scene = Scene.from_dict(json.loads(args.scene)) if args.scene else scene_from_prompt(args.prompt)
    for path in args.images:
        result = verify(Image.open(path), scene)
        checks = " ".join(f"{name}={'ok' if ok else 'FAIL'}" for name, ok in result.checks.items())
        print(f"{path}: {result.score:.3f}  {checks}")
    return 0


def _add_selection(parser: argparse.ArgumentParser, n: int) -> None:
    parser.add_argument("--prompt", help="a caption of the world grammar (else prompts of --split)")
    parser.add_argument("--split", default="heldout", choices=("train", "heldout"))
    parser.add_argument("--n", type=int, default=n, help="images (of --prompt) or prompts (of --split)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--columns", type=int, default=4)
    parser.add_argument("--out", default="grid.png", help="output image")


def add_world_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``world`` and its subcommands to the ``mmalign`` parser's ``add_subparsers()`` object."""
    world = subparsers.add_parser("world", help="the shapes world: build its models, sample, render, verify")
    sub = world.add_subparsers(dest="world_command", metavar="WORLD_COMMAND", required=True)

    build = sub.add_parser("build", help="rebuild the shipped generator, proxy, preference proxy and VLM from fixed seeds",
                           description="Train the tiny models and report gold scores (docs/world.md).")
    build.add_argument("--only", choices=("generator", "proxy", "preference", "vlm"))
    build.add_argument("--out", help="folder for pipeline/, proxy/, preference/ and vlm/ (default: the package's assets)")
    build.add_argument("--steps", type=int, help="override every stage's steps (smoke tests)")
    build.add_argument("--threads", type=int,
                       help="torch threads per process (default: the CPUs over the processes; the VLM uses 1)")
    build.add_argument("--sequential", action="store_true",
                       help="build the models one after another in one process (default: the generator here, "
                            "the proxy and VLM in a second process)")
    build.add_argument("--eval-prompts", type=int, default=96,
                       help="prompts per split to evaluate the generator and proxy on; 0 skips")
    build.add_argument("--quiet", action="store_true", help="no progress bars")
    build.set_defaults(func=_cmd_build)

    sample = sub.add_parser("sample", help="sample the generator; grid with the gold verdict under each image")
    _add_selection(sample, 8)
    sample.add_argument("--steps", type=int, help="DDIM steps (default: the shipped sampler's)")
    sample.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    sample.add_argument("--pipeline", help="pipeline folder (default: the shipped one)")
    sample.add_argument("--device", default="cpu")
    sample.set_defaults(func=_cmd_sample)

    render = sub.add_parser("render", help="render scenes of a prompt or a split into a grid")
    _add_selection(render, 8)
    render.add_argument("--size", type=int, default=32)
    render.add_argument("--jitter", type=float, default=1.0)
    render.set_defaults(func=_cmd_render)

    verify = sub.add_parser("verify", help="gold verdict of image files against a prompt or scene")
    verify.add_argument("images", nargs="+")
    what = verify.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="a caption of the world grammar")
    what.add_argument("--scene", help="a scene as JSON (Scene.to_dict)")
    verify.set_defaults(func=_cmd_verify)
    return world
