"""The compare demo on a real (tiny) training run folder: base and aligned drawn from the same seeds, their gold
and trained-reward numbers equal a direct evaluation of the run's exported model and its base, Vendi equals the
diversity module's, the run's curves and report come along."""

import pytest

pytest.importorskip("gradio")

import torch  # noqa: E402
from demo_server import served  # noqa: E402
from gradio_client import Client  # noqa: E402

from mmalign.demos.compare_demo import build_compare_demo, load_run, summary_rows  # noqa: E402
from mmalign.eval.diversity import diversity_scores, image_encoder  # noqa: E402
from mmalign.eval.generator import evaluate_generator, load_generator  # noqa: E402
from mmalign.rewards import build  # noqa: E402
from mmalign.world.captions import scene_from_prompt  # noqa: E402
from mmalign.world.gold import GoldReward  # noqa: E402

PROMPT = "a green box to the right of a purple triangle"


def _direct(sampler_args: dict, n: int, seed: int):
    """Each image alone from ``seed + i`` (batches of one), scored by gold and the trained reward."""
    adapter, policy, _ = load_generator(**sampler_args)
    rewards = {"gold": GoldReward(), "preference_proxy": build({"name": "preference_proxy", "scale": 1.0})}
    result = evaluate_generator(adapter, policy, [(PROMPT, {"scene": scene_from_prompt(PROMPT)})], rewards,
                                samples_per_prompt=n, seed=seed, batch_size=1, progress=False)
    return result


def test_base_and_aligned_numbers_equal_a_direct_evaluation(tiny_run):
    with served(build_compare_demo([tiny_run])) as url:
        client = Client(url, verbose=False)
        base, aligned, base_label, aligned_label, details, curves, table = client.predict(
            tiny_run.name, PROMPT, 3, 2, api_name="/compare")
    settings = details["settings"]
    assert settings["pipeline"] == "world" and details["base"]["seeds"] == details["aligned"]["seeds"] == [2, 3, 4]
    sampler = {k: settings[k] for k in ("num_steps", "eta", "guidance_scale")}
    for tag, source in (("base", {"pipeline": "world"}), ("aligned", {"run": str(tiny_run)})):
        direct = _direct({**source, **sampler}, 3, 2)
        assert details[tag]["gold"] == pytest.approx(direct.scores["gold"].tolist(), abs=1e-6)
        # the demo scores the 8-bit images it shows, the direct evaluation the float ones
        assert details[tag]["preference_proxy"] == pytest.approx(direct.scores["preference_proxy"].tolist(), abs=2e-3)
    assert details["base"]["preference_proxy"] != details["aligned"]["preference_proxy"]  # the LoRA does something
    assert "Vendi" in base_label and "Vendi" in aligned_label
    assert len(base) == len(aligned) == 3 and curves is not None
    assert table["headers"] == ["column", "before", "after", "paired_change"]
    assert [row[0] for row in table["data"]] == [row["column"] for row in summary_rows(tiny_run)]


def test_vendi_is_the_diversity_modules(tiny_run):
    from mmalign.demos.compare_demo import compare_run

    models = load_run(tiny_run)
    result = compare_run(models, PROMPT, 3, 0)
    scored, vendi = result["aligned"]
    encoder = image_encoder(build({"name": "preference_proxy", "scale": 1.0}))
    expected = diversity_scores(scored.pixels, [0, 0, 0], encoder)["diversity/vendi"][0]
    assert models.encoder_name == "preference_proxy"
    assert vendi == pytest.approx(float(expected), rel=1e-6)
    assert 1.0 <= vendi <= 3.0
    assert torch.equal(torch.tensor(scored.seeds), torch.tensor(result["base"][0].seeds))


def test_a_folder_that_is_not_a_run_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a run folder"):
        load_run(tmp_path / "empty")
    with pytest.raises(ValueError, match="--run: expected an existing folder"):
        build_compare_demo([tmp_path / "missing"])
