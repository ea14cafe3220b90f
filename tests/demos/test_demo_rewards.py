"""The rewards demo through its API (gradio_client on a localhost server): generated images are judged exactly as
gold and the proxies judge the same seeds drawn again directly; uploads are scored as uploaded; the pairwise
comparison agrees with the scores; the pure functions behind the page."""

import pytest

pytest.importorskip("gradio")

import torch  # noqa: E402
from demo_server import served  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402
from PIL import Image  # noqa: E402

from mmalign.demos.rewards_demo import build_rewards_demo, gallery, uploads_as_pixels  # noqa: E402
from mmalign.demos.scoring import compare_pair, quantize, score_images  # noqa: E402
from mmalign.media import MediaBatch, open_image  # noqa: E402
from mmalign.models.rollout import sample_trajectories  # noqa: E402
from mmalign.rewards import build  # noqa: E402
from mmalign.world.captions import scene_from_prompt  # noqa: E402
from mmalign.world.gold import GoldReward  # noqa: E402
from mmalign.world.render import render_batch  # noqa: E402
from mmalign.world.verify import verify  # noqa: E402

PROMPT = "a green box to the right of a purple triangle"


@pytest.fixture(scope="module")
def client(world_sampler, demo_rewards):
    with served(build_rewards_demo(world_sampler, demo_rewards)) as url:
        yield Client(url, verbose=False)


def _direct(sampler, prompt: str, seed: int) -> torch.Tensor:
    """The image of ``seed`` drawn again without the demo: one trajectory from a generator seeded ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return quantize(sample_trajectories(sampler.adapter, sampler.policy, [prompt], generator=generator).pixels)


def test_generated_images_get_the_verdicts_gold_gives_the_same_seeds(client, world_sampler):
    _, table, details = client.predict(PROMPT, 3, 5, api_name="/generate")
    assert details["seeds"] == [5, 6, 7]
    scene = scene_from_prompt(PROMPT)
    gold, proxy = GoldReward(), build({"name": "proxy", "scale": 1.0})
    for verdict, row in zip(details["verdicts"], details["scores"]):
        pixels = _direct(world_sampler, PROMPT, verdict["seed"])
        batch = MediaBatch(pixels, [PROMPT], [{"scene": scene}])
        expected = verify(pixels[0], scene)
        assert verdict["checks"] == [{"check": k, "passed": v} for k, v in expected.checks.items()]
        assert verdict["score"] == pytest.approx(expected.score)
        assert row["gold"] == pytest.approx(float(gold(batch).scores[0]), abs=1e-6)
        assert row["proxy"] == pytest.approx(float(proxy(batch).scores[0]), abs=1e-5)
        # the ensemble's uncertainty is its two members' population std
        members = torch.tensor([row["ensemble/proxy"], row["ensemble/preference_proxy"]])
        assert row["ensemble/uncertainty"] == pytest.approx(float(members.std(unbiased=False)), abs=1e-5)
    assert table["headers"][:3] == ["image", "seed", "gold"]


def test_uploads_are_scored_as_uploaded_and_compared_pairwise(client, tmp_path):
    scene = scene_from_prompt(PROMPT)
    renders = render_batch([scene, scene], size=48, jitter=1.0, seed=0)
    renders[1, :, :, 24:] = 0.0  # the right half blanked: the box is gone, gold falls
    paths = []
    for i, image in enumerate(renders):
        path = tmp_path / f"upload{i}.png"
        Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()).save(path)
        paths.append(path)
    _, _, details = client.predict(PROMPT, [handle_file(str(p)) for p in paths], [], api_name="/score_uploads")
    direct = MediaBatch.from_pil([open_image(p) for p in paths], [PROMPT] * 2).pixels
    expected = GoldReward()(MediaBatch(direct, [PROMPT] * 2, [{"scene": scene}] * 2)).scores
    assert [row["gold"] for row in details["scores"]] == pytest.approx(expected.tolist(), abs=1e-6)
    assert details["scores"][0]["gold"] > details["scores"][1]["gold"]
    comparison, pair = client.predict(0, 1, api_name="/compare_pair")
    rows = {r[0]: dict(zip(comparison["headers"], r)) for r in comparison["data"]}
    assert rows["gold"]["prefers"] == "a"
    assert rows["gold"]["a_minus_b"] == pytest.approx(float(expected[0] - expected[1]), abs=1e-5)
    assert len(pair) == 2


def test_a_bad_upload_is_refused_with_a_message(client, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image at all")
    with pytest.raises(Exception, match="not a readable image"):
        client.predict(PROMPT, [handle_file(str(text))], [], api_name="/score_uploads")


def test_prompts_outside_the_world_are_scored_without_a_verdict():
    image = torch.rand(2, 3, 16, 16)
    scored = score_images({"gold": GoldReward(), "jpeg": build("jpeg_compressibility")}, image, "a photo of a cat")
    assert scored.verdicts is None
    assert "gold" in scored.notes and "scene" in scored.notes["gold"]
    assert set(scored.notes) == {"gold", "verdict"}
    assert scored.columns["jpeg"].shape == (2,)
    assert [caption.split(" · ")[0] for _, caption in gallery(scored)] == ["#0", "#1"]


def test_pairwise_rows_follow_the_scores():
    scores = torch.tensor([0.2, 0.7, 0.7])
    scored = score_images({}, torch.zeros(3, 3, 8, 8), "x")
    scored.columns = {"r": scores, "r/uncertainty": torch.ones(3)}
    assert compare_pair(scored, 0, 1) == [{"column": "r", "a": 0.2, "b": 0.7, "a_minus_b": -0.5, "prefers": "b"}]
    assert compare_pair(scored, 1, 2)[0]["prefers"] == "tie"
    with pytest.raises(ValueError, match="b: expected an image index from 0 to 2, got 3"):
        compare_pair(scored, 0, 3)


def test_uploads_of_mixed_sizes_are_fitted_to_one_square():
    same = uploads_as_pixels([Image.new("RGB", (20, 10), (255, 0, 0))] * 2, 32)
    assert same.shape == (2, 3, 10, 20)
    mixed = uploads_as_pixels([Image.new("RGB", (20, 10)), Image.new("RGB", (12, 12))], 32)
    assert mixed.shape == (2, 3, 32, 32)


def test_images_of_the_allowed_folders_can_be_picked_and_no_others(world_sampler, tmp_path):
    scene = scene_from_prompt(PROMPT)
    path = tmp_path / "render.png"
    image = render_batch([scene], size=32, seed=0)[0]
    Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()).save(path)
    demo = build_rewards_demo(world_sampler, {"gold": GoldReward()}, allowed_dirs=[str(tmp_path)])
    with served(demo, allowed_dirs=(str(tmp_path),)) as url:
        client = Client(url, verbose=False)
        _, _, details = client.predict(PROMPT, [], [str(path)], api_name="/score_uploads")
        expected = verify(open_image(path), scene)
        assert details["verdicts"][0]["score"] == pytest.approx(expected.score)
        with pytest.raises(Exception, match="(?i)not in the list of choices|not an image of the allowed folders"):
            client.predict(PROMPT, [], ["/etc/hostname"], api_name="/score_uploads")
