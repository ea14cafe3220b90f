"""The ReNO demo: its live generator yields every iteration and the best iterate, whose reward is the best of
the trace and never below the initial; the stop flag ends the run at the next iteration; through the API the
page streams one update per iteration."""

import pytest

pytest.importorskip("gradio")

import torch  # noqa: E402
from demo_server import served  # noqa: E402
from gradio_client import Client  # noqa: E402

from mmalign.demos.reno_demo import DEFAULT_REWARD, build_reno_demo, live_reno  # noqa: E402
from mmalign.demos.scoring import load_sampler  # noqa: E402
from mmalign.inference.reno import optimize_noise  # noqa: E402
from mmalign.rewards import build  # noqa: E402
from mmalign.world.captions import scene_from_prompt  # noqa: E402
from mmalign.world.verify import verify  # noqa: E402

PROMPT = "a green box to the right of a purple triangle"


@pytest.fixture(scope="module")
def reno_setup():
    return load_sampler("world", guidance_scale=5.0), build(DEFAULT_REWARD)


def test_live_steps_are_optimize_noise_iterations(reno_setup):
    sampler, reward = reno_setup
    steps = list(live_reno(sampler, reward, PROMPT, seed=3, iterations=4, num_steps=2))
    assert [s.iteration for s in steps[:-1]] == [0, 1, 2, 3]
    final = steps[-1]
    assert final.result is not None and final.result.iterations == 4
    trace = [s.reward for s in steps[:-1]]
    assert final.best == pytest.approx(max(trace)) and final.best >= trace[0]
    direct = optimize_noise(sampler.adapter, [PROMPT], reward, seeds=[3], num_steps=2, iterations=4)
    assert trace == pytest.approx(direct.trace["reward"][:, 0].tolist(), abs=1e-5)
    scene = scene_from_prompt(PROMPT)
    assert final.verdict.score == verify(final.pixels, scene).score
    assert torch.equal(final.pixels, (final.result.best_pixels[0].clamp(0, 1) * 255).round() / 255)


def test_closing_the_generator_stops_the_run(reno_setup):
    sampler, reward = reno_setup
    seen = []
    steps = live_reno(sampler, reward, PROMPT, iterations=50, num_steps=1)
    for step in steps:
        seen.append(step.iteration)
        if step.iteration == 1:
            steps.close()  # what gradio does when the stop button cancels the page's generator
            break
    assert seen == [0, 1]


def test_a_bad_prompt_is_refused(reno_setup):
    with pytest.raises(ValueError, match="prompt: expected a non-empty text"):
        next(live_reno(*reno_setup, "  "))


def test_the_page_streams_every_iteration(reno_setup):
    sampler, reward = reno_setup
    with served(build_reno_demo(sampler, reward, max_iterations=5, num_steps=2)) as url:
        client = Client(url, verbose=False)
        job = client.submit(PROMPT, 1, 4, api_name="/reno")
        job.result(timeout=120)
        outputs = job.outputs()
        with pytest.raises(Exception, match="greater than maximum value 5"):  # the slider's own bound
            client.predict(PROMPT, 1, 9, api_name="/reno")
    summaries = [out[3] for out in outputs]
    assert [s["iteration"] for s in summaries[:4]] == [0, 1, 2, 3]
    final = summaries[-1]
    assert final["done"] and final["iterations"] == 4
    assert final["reward"] >= final["initial_reward"]
    assert final["reward"] == pytest.approx(max(s["reward"] for s in summaries[:4]))
    trace = final["trace"]  # the plotted curves: one point per iteration
    assert trace["preference_proxy"] == pytest.approx([s["reward"] for s in summaries[:4]])
    assert len(trace["best so far"]) == len(trace["gold"]) == 4 and outputs[-1][1] is not None


def test_cancelling_the_page_stops_the_optimisation(reno_setup):
    """What the stop button does (``cancels=``): the page's generator is cancelled, and the worker thread running
    ``optimize_noise`` ends at its next iteration instead of running all 50."""
    import threading
    import time

    sampler, reward = reno_setup
    with served(build_reno_demo(sampler, reward, max_iterations=50, num_steps=1)) as url:
        client = Client(url, verbose=False)
        job = client.submit(PROMPT, 0, 50, api_name="/reno")
        deadline = time.monotonic() + 60
        while len(job.outputs()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(job.outputs()) >= 2
        job.cancel()
        while any(t.name == "reno-demo" for t in threading.enumerate()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(t.name == "reno-demo" for t in threading.enumerate())
        assert len(job.outputs()) < 50 and not job.outputs()[-1][3]["done"]
