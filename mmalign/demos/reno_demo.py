"""The ``reno`` demo: a prompt runs ReNO live. ``optimize_noise`` runs in a worker thread; its per-iteration
callback hands each iterate to the page, which redraws the image (with the gold verdict on world prompts) and
the reward curve; the stop button cancels the page's generator, whose exit makes the next callback stop the run.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from mmalign.demos import require_gradio
from mmalign.demos.launch import user_errors
from mmalign.demos.scoring import Sampler, quantize, world_scene
from mmalign.demos.verdict_drawing import display_scale, draw_verdict, to_pil
from mmalign.inference.reno import NoiseOptimization, optimize_noise
from mmalign.rewards import Reward
from mmalign.world.verify import GoldResult, verify

__all__ = ["DEFAULT_REWARD", "Step", "build_reno_demo", "curve_figure", "live_reno"]

#: what ReNO optimises unless ``--reward`` says otherwise: the world's preference proxy (its cosine), the reward
#: the embedded trainers use, hackable enough that the gold curve beside it is worth watching
DEFAULT_REWARD = {"name": "preference_proxy", "scale": 1.0}


@dataclass
class Step:
    """One iterate of a live run: its image, reward and the best so far, gold where the prompt states a scene;
    ``result`` is set on the last one (the best iterate, as ``optimize_noise`` returns it)."""

    iteration: int
    pixels: torch.Tensor  # (3, H, W), 8-bit values
    reward: float
    best: float
    verdict: GoldResult | None
    result: NoiseOptimization | None = None


def live_reno(sampler: Sampler, reward: Reward, prompt: str, seed: int = 0, iterations: int = 15,
              num_steps: int = 4, lr: float = 5.0) -> Iterator[Step]:
    """Yield a ``Step`` per ReNO iteration of ``prompt``, then one for the best iterate (``result`` set).
    Closing the generator early stops the optimisation at its next iteration."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt: expected a non-empty text, got {prompt!r}")
    scene, _ = world_scene(prompt)
    metadata = [{"scene": scene}] if scene is not None else [{}]
    updates: queue.Queue = queue.Queue()
    stop = threading.Event()

    def callback(state) -> bool:
        updates.put(("step", state))
        return stop.is_set()

    def work() -> None:
        try:
            updates.put(("done", optimize_noise(
                sampler.adapter, [prompt], reward, metadata=metadata, seeds=[int(seed)], num_steps=num_steps,
                iterations=iterations, lr=lr, callback=callback)))
        except BaseException as err:  # handed to the page's thread, which raises it
            updates.put(("error", err))

    thread = threading.Thread(target=work, name="reno-demo", daemon=True)
    thread.start()
    try:
        while True:
            kind, item = updates.get()
            if kind == "error":
                raise item
            if kind == "step":
                pixels = quantize(item.pixels[0])
                yield Step(item.iteration, pixels, float(item.scores[0]), float(item.best_scores[0]),
                           verify(pixels, scene) if scene is not None else None)
            else:
                pixels = quantize(item.best_pixels[0])
                best = float(item.best_scores[0])
                yield Step(int(item.best_iteration[0]), pixels, best, best,
                           verify(pixels, scene) if scene is not None else None, result=item)
                return
    finally:
        stop.set()


def curve_figure(trace: dict[str, list[float]], title: str = ""):
    """The curves so far (``{series: values per iteration}``) as a matplotlib figure, legend inside."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    for series, values in trace.items():
        if values:
            axes.plot(range(len(values)), values, marker="o", markersize=3, label=series)
    axes.set(xlabel="iteration", ylabel="value", title=title)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    return figure


def _picture(step: Step):
    scale = display_scale(*step.pixels.shape[-2:])
    return draw_verdict(step.pixels, step.verdict, scale) if step.verdict is not None else to_pil(step.pixels, scale)


def build_reno_demo(sampler: Sampler, reward: Reward, max_iterations: int = 50, num_steps: int = 4,
                    example: str = "a green box to the right of a purple triangle"):
    """The demo as a ``gr.Blocks``: ``reward`` is optimised, at most ``max_iterations`` reward calls a run."""
    gr = require_gradio()

    @user_errors
    def run(prompt: str, seed: float, iterations: float):
        count = int(iterations)
        if not 1 <= count <= max_iterations:
            raise ValueError(f"iterations: expected 1 to {max_iterations}, got {iterations!r}")
        trace: dict[str, list[float]] = {reward.name: [], "best so far": [], "gold": []}
        for step in live_reno(sampler, reward, prompt, int(seed), count, num_steps):
            if step.result is None:
                trace[reward.name].append(step.reward)
                trace["best so far"].append(step.best)
                if step.verdict is not None:
                    trace["gold"].append(step.verdict.score)
                status = f"iteration {step.iteration + 1}/{count}: {reward.name} {step.reward:.4f}"
            else:
                status = (f"done: best iterate {step.iteration} of {step.result.iterations}, {reward.name} "
                          f"{float(step.result.initial_scores[0]):.4f} → {step.best:.4f}")
            summary = {"iteration": step.iteration, "reward": step.reward, "best": step.best,
                       "gold": None if step.verdict is None else step.verdict.score, "done": step.result is not None,
                       "initial_reward": None if step.result is None else float(step.result.initial_scores[0]),
                       "iterations": None if step.result is None else step.result.iterations, "trace": trace}
            yield _picture(step), curve_figure(trace, f"{reward.name} per iteration (gold: watched, not optimised)"), status, summary

    with gr.Blocks(title="mmalign · ReNO", analytics_enabled=False) as demo:
        gr.Markdown(f"## ReNO, live\nThe initial noise of one sample is optimised against **{reward.name}** "
                    f"({num_steps}-step deterministic sampler); the image and the curves update every iteration. "
                    "Gold (on world prompts) is watched, never optimised.")
        prompt = gr.Textbox(label="prompt", value=example, max_length=500)
        with gr.Row():
            seed = gr.Number(0, precision=0, label="seed")
            iterations = gr.Slider(1, max_iterations, value=min(15, max_iterations), step=1, label="iterations")
        with gr.Row():
            go = gr.Button("Run ReNO", variant="primary")
            stop = gr.Button("Stop", variant="stop")
        status = gr.Markdown()
        with gr.Row():
            image = gr.Image(label="current iterate", type="pil", format="png", height=400)
            curve = gr.Plot(show_label=False)
        details = gr.JSON(label="this iteration")
        event = go.click(run, [prompt, seed, iterations], [image, curve, status, details], api_name="reno")
        stop.click(None, None, None, cancels=[event])
    return demo
