"""``mmalign world ...``: build, sample, render, video and verify, each a small function over the Python API.

``add_world_parser(subparsers)`` adds the ``world`` command to the ``mmalign`` parser; every leaf sets
``func`` to a function of the parsed arguments that returns an exit status, as the other commands do.
"""

from __future__ import annotations

import argparse
import json

from mmalign.config import int_at_least, positive_int

__all__ = ["add_world_parser"]


def _scenes_and_prompts(args: argparse.Namespace):
    """``(scenes, prompts)`` from ``--prompt`` (repeated ``--n`` times) or ``--split``'s prompt set."""
    from mmalign.world.captions import prompt_set, scene_from_prompt

    if args.n < 1:
        raise ValueError(f"--n: expected a positive number of images or prompts, got {args.n}")
    if args.prompt is not None:  # an empty --prompt is an error of the grammar, not "no prompt"
        scene = scene_from_prompt(args.prompt, args.seed)
        return [scene] * args.n, [args.prompt] * args.n
    prompts = prompt_set(args.split, args.n, args.seed)
    return [p.scene for p in prompts], [p.text for p in prompts]


def _save(image, out: str) -> None:
    """Save ``image`` to ``--out``, making its folder; a ``ValueError`` naming ``--out`` for a suffix PIL cannot write."""
    from pathlib import Path

    from PIL import Image

    path = Path(out)
    if path.suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"--out: expected an image file name such as grid.png, got {out!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


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
    labels = [(f"{p}\n" if args.prompt is None else "") + _verdict(v) for p, v in zip(prompts, verdicts)]
    _save(image_grid(images, labels, args.columns), args.out)
    mean = sum(v.score for v in verdicts) / len(verdicts)
    print(f"wrote {len(images)} samples to {args.out}; mean gold {mean:.3f}")
    return 0


def _cmd_render(args: argparse.Namespace) -> int:
    from mmalign.eval.grid import image_grid
    from mmalign.world.render import render_batch

    scenes, prompts = _scenes_and_prompts(args)
    images = render_batch(scenes, args.size, args.jitter, args.seed)
    labels = None if args.prompt is not None else prompts
    _save(image_grid(images, labels, args.columns, scale=max(1, 128 // args.size)), args.out)
    print(f"wrote {len(images)} renders to {args.out}")
    return 0


def _cmd_video(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mmalign.eval.grid import VIDEO_SUFFIXES, save_video_grid
    from mmalign.world.video import render_video, verify_video, video_prompt_set, video_scene_from_prompt

    if args.prompt is not None:
        (scene, motion), text = video_scene_from_prompt(args.prompt, args.seed), args.prompt
    else:
        clip = video_prompt_set(args.split, 1, args.seed)[0]
        scene, motion, text = clip.scene, clip.motion, clip.text
    if Path(args.out).suffix.lower() not in VIDEO_SUFFIXES:  # before the clip is drawn
        raise ValueError(f"--out: expected a .gif or .mp4 file name such as clip.gif, got {args.out!r}")
    if args.generate:  # the shipped video generator draws the clip
        from mmalign.world.assets import load_video_pipeline
        from mmalign.world.video_build import sample_videos

        video = sample_videos(load_video_pipeline(), [text], args.seed, args.frames, args.steps, args.guidance,
                              noise_speed=args.noise_speed)[0]
    else:
        video = render_video(scene, motion, args.frames, args.size, args.jitter, args.seed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_video_grid(video[None], args.out, columns=1, scale=max(1, 128 // video.shape[-1]), ms=args.ms)
    result = verify_video(video, scene, motion)
    failed = [name for name, value in result.checks.items() if value < 1]
    print(f"wrote {len(video)} frames of {text!r} to {args.out}; gold {result.score:.2f}"
          + (f" (not always passed: {', '.join(failed)})" if failed else "")
          + (" (drawn by the video generator)" if args.generate else ""))
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from mmalign.media import open_image
    from mmalign.world.captions import scene_from_prompt
    from mmalign.world.scenes import Scene
    from mmalign.world.verify import verify

    if args.scene is not None:
        try:
            data = json.loads(args.scene)
        except json.JSONDecodeError as err:
            raise ValueError(f"--scene: expected a scene as JSON (Scene.to_dict), got {args.scene!r} ({err})") from None
        scene = Scene.from_dict(data)
    else:
        scene = scene_from_prompt(args.prompt)
    for path in args.images:
        result = verify(open_image(path), scene)
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
                           description="Train the tiny models and report gold scores (docs/world.md). An interrupted "
                                       "generator build resumes from its checkpoints when run again.")
    build.add_argument("--only", choices=("generator", "proxy", "preference", "preference-ensemble", "vlm", "video-generator",
                                          "motion-proxy"),
                       help="one model; preference-ensemble: the preference proxies of docs/overoptimization.md "
                            "(rebuilt here, not shipped)")
    build.add_argument("--out", help="folder for pipeline/, proxy/, preference/, vlm/, video_pipeline/ and motion_proxy/ (default: the package's assets)")
    build.add_argument("--steps", type=positive_int, help="override every stage's steps (smoke tests)")
    build.add_argument("--threads", type=positive_int,
                       help="torch threads per process (default: the CPUs over the processes; the VLM uses 1)")
    build.add_argument("--sequential", action="store_true",
                       help="build the models one after another in one process (default: the generator here, "
                            "the proxy and VLM in a second process)")
    build.add_argument("--eval-prompts", type=int_at_least(0), default=96,
                       help="prompts per split to evaluate the generator and proxy on; 0 skips")
    build.add_argument("--quiet", action="store_true", help="no progress bars")
    build.set_defaults(func=_cmd_build)

    sample = sub.add_parser("sample", help="sample the generator; grid with the gold verdict under each image")
    _add_selection(sample, 8)
    sample.add_argument("--steps", type=positive_int, help="DDIM steps (default: the shipped sampler's)")
    sample.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    sample.add_argument("--pipeline", help="pipeline folder (default: the shipped one)")
    sample.add_argument("--device", default="cpu")
    sample.set_defaults(func=_cmd_sample)

    render = sub.add_parser("render", help="render scenes of a prompt or a split into a grid")
    _add_selection(render, 8)
    render.add_argument("--size", type=int, default=32)
    render.add_argument("--jitter", type=float, default=1.0)
    render.set_defaults(func=_cmd_render)

    video = sub.add_parser("video", help="render (or --generate) a clip of moving shapes as a GIF, with its gold verdict")
    video.add_argument("--prompt", help="a caption with 'moving <direction>' (else a clip of --split)")
    video.add_argument("--split", default="heldout", choices=("train", "heldout"))
    video.add_argument("--frames", type=int_at_least(2), default=8)
    video.add_argument("--size", type=int_at_least(8), default=32)
    video.add_argument("--jitter", type=float, default=0.0)
    video.add_argument("--ms", type=positive_int, default=120, help="milliseconds per frame")
    video.add_argument("--seed", type=int, default=0)
    video.add_argument("--out", default="clip.gif", help="output .gif, or .mp4 with mmalign[video]")
    video.add_argument("--generate", action="store_true",
                       help="draw the clip with the shipped video generator instead of rendering it (--size is 32)")
    video.add_argument("--steps", type=positive_int, default=20, help="--generate: DDIM steps")
    video.add_argument("--guidance", type=float, default=5.0, help="--generate: classifier-free guidance scale")
    video.add_argument("--noise-speed", type=float, default=None, metavar="PIXELS",
                       help="--generate: start from one noise travelling this many latent pixels per frame in the "
                            "stated direction (frames that agree; 0.5 is the studied setting) instead of independent "
                            "noise in every frame")
    video.set_defaults(func=_cmd_video)

    verify = sub.add_parser("verify", help="gold verdict of image files against a prompt or scene")
    verify.add_argument("images", nargs="+")
    what = verify.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="a caption of the world grammar")
    what.add_argument("--scene", help="a scene as JSON (Scene.to_dict)")
    verify.set_defaults(func=_cmd_verify)
    return world
