"""The world's video generator: its text encoder keeps the image one's meaning, a few training steps train only
what is new, the saved folder reloads through diffusers' loaders to the same outputs, an interrupted build resumes
to the same weights, and the shipped one draws clips that match their captions."""

from __future__ import annotations

import json

import pytest
import torch

from mmalign.world.assets import load_pipeline
from mmalign.world.video import video_prompt_set
from mmalign.world.video_generator import (
    VIDEO_WORDS,
    VideoGeneratorRecipe,
    assemble_video_pipeline,
    build_video_generator,
    extend_text_encoder,
    train_motion,
)

TINY = VideoGeneratorRecipe(clips=8, frames=4, steps=4, batch=2, warmup=1, checkpoint_every=2)


@pytest.fixture(scope="module")
def image_pipe():
    return load_pipeline()


def _latents(pipe, n: int, frames: int, seed: int = 0) -> torch.Tensor:
    return torch.randn((n, pipe.unet.config.in_channels, frames, 16, 16), generator=torch.Generator().manual_seed(seed))


def _clips(pipe, prompts, frames: int) -> torch.Tensor:
    return pipe(prompts, num_frames=frames, num_inference_steps=2, latents=_latents(pipe, len(prompts), frames),
                output_type="pt").frames


def test_the_video_tokenizer_keeps_image_captions_meaning(image_pipe):
    """Every video word is one token; on captions without them the extended text encoder gives the image encoder's
    hidden states (ids differ: they are mapped by token string)."""
    from mmalign.world.video_generator import _video_tokenizer

    tokenizer = _video_tokenizer(None)
    for word in VIDEO_WORDS:
        assert tokenizer.tokenize(word) == [word + "</w>"]
    encoder, new_rows = extend_text_encoder(image_pipe.text_encoder, image_pipe.tokenizer, tokenizer)
    texts = [c.text for split in ("train", "heldout") for c in video_prompt_set(split, 300)]
    used = {t for text in texts for t in tokenizer.tokenize(text)}
    vocab = tokenizer.get_vocab()
    assert {t for t in used if new_rows[vocab[t]]} == {"moving</w>", "up</w>", "down</w>"}  # left, right: image words
    captions = ["a red circle", "two blue squares on a black background", ""]

    def hidden(enc, tok):
        ids = tok(captions, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
        with torch.no_grad():
            return enc(ids).last_hidden_state

    old, new = hidden(image_pipe.text_encoder, image_pipe.tokenizer), hidden(encoder, tokenizer)
    torch.testing.assert_close(new, old, rtol=0, atol=1e-6)
    assert max(len(tokenizer(t).input_ids) for t in texts) <= tokenizer.model_max_length  # no caption is cut


def test_training_changes_only_what_is_new(image_pipe):
    recipe = VideoGeneratorRecipe(clips=8, frames=4, steps=3, batch=2, warmup=1, ema_decay=0.5)
    pipe = train_motion(image_pipe, recipe, progress=False)
    assert type(pipe).__name__ == "AnimateDiffPipeline" and type(pipe.unet).__name__ == "UNetMotionModel"
    spatial = {k: v for k, v in pipe.unet.state_dict().items() if "motion_modules" not in k}
    image = image_pipe.unet.state_dict()
    assert spatial.keys() == image.keys() and all(torch.equal(spatial[k], image[k]) for k in image)
    moved = [k for k, v in pipe.unet.state_dict().items() if "motion_modules" in k and "proj_out" in k and v.abs().sum()]
    assert moved  # the zero-initialised output projections left zero
    old_vocab, new_vocab = image_pipe.tokenizer.get_vocab(), pipe.tokenizer.get_vocab()
    old_rows = image_pipe.text_encoder.get_input_embeddings().weight
    rows = pipe.text_encoder.get_input_embeddings().weight
    assert all(torch.equal(rows[i], old_rows[old_vocab[t]]) for t, i in new_vocab.items() if t in old_vocab)
    new_state, old_state = pipe.text_encoder.state_dict(), image_pipe.text_encoder.state_dict()
    assert new_state.keys() == old_state.keys()
    assert all(torch.equal(new_state[k], old_state[k]) for k in old_state if "token_embedding" not in k)
    clips = _clips(pipe, ["a red circle moving left", "a blue square moving up"], 4)
    assert clips.shape == (2, 4, 3, 32, 32) and torch.isfinite(clips).all()


def test_the_saved_folder_reloads_to_the_same_outputs(image_pipe, tmp_path):
    """What is saved is only what is new (half-precision motion weights); reassembled on the image pipeline it
    gives the trained pipeline's clips, its motion weights rounded to half precision."""
    from mmalign.world.assets import load_video_pipeline, pipeline_path

    pipe = train_motion(image_pipe, TINY, progress=False)
    folder = build_video_generator(tmp_path / "video_pipeline", image_pipe, "../pipeline", TINY, progress=False)
    assert sorted(p.name for p in folder.iterdir()) == ["motion_adapter", "text_encoder", "tokenizer",
                                                         "video_pipeline.json"]
    assert json.loads((folder / "video_pipeline.json").read_text())["reused"] == ["vae", "unet", "scheduler"]
    state = pipe.unet.state_dict()  # parameters and the positional-encoding buffers, as saved
    pipe.unet.load_state_dict({k: v.half().float() if "motion_modules" in k else v for k, v in state.items()})
    reloaded = assemble_video_pipeline(folder, pipeline_path())
    prompts = ["two green boxes moving right", "a yellow triangle moving down on grey"]
    torch.testing.assert_close(_clips(reloaded, prompts, 4), _clips(pipe, prompts, 4), rtol=0, atol=1e-5)
    loaded = load_video_pipeline(path=str(folder))  # no pipeline/ beside it: the shipped one's components
    torch.testing.assert_close(_clips(loaded, prompts, 4), _clips(pipe, prompts, 4), rtol=0, atol=1e-5)


def test_an_interrupted_video_build_resumes_to_the_same_weights(image_pipe, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import mmalign.world.generator as generator

    whole = build_video_generator(tmp_path / "whole", image_pipe, "../pipeline", TINY, progress=False,
                                  work=tmp_path / "work-whole")
    assert not (tmp_path / "work-whole").exists()
    save = generator._Resumable.maybe_save

    def save_then_die(self, step, total):
        save(self, step, total)
        if step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(generator._Resumable, "maybe_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        build_video_generator(tmp_path / "resumed", image_pipe, "../pipeline", TINY, progress=False,
                              work=tmp_path / "work")
    assert (tmp_path / "work" / "motion.pt").is_file()
    monkeypatch.setattr(generator._Resumable, "maybe_save", save)
    resumed = build_video_generator(tmp_path / "resumed", image_pipe, "../pipeline", TINY, progress=False,
                                    work=tmp_path / "work")
    for part, name in (("motion_adapter", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")):
        a, b = (load_file(folder / part / name) for folder in (whole, resumed))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


@pytest.mark.parametrize("field, value", [("steps", 0), ("frames", 1), ("caption_dropout", 1.0), ("batch", True)])
def test_bad_recipe_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        VideoGeneratorRecipe(**{field: value})


def test_world_video_prompts_carry_scene_and_motion():
    from mmalign.prompts import PromptSource, load_prompts

    rows = load_prompts(PromptSource(world_video="heldout", n=3, seed=2))
    clips = video_prompt_set("heldout", 3, 2)
    assert rows == [(c.text, {"scene": c.scene.to_dict(), "motion": c.motion.to_dict()}) for c in clips]
    with pytest.raises(ValueError, match="exactly one of"):
        PromptSource(world="train", world_video="train")


def test_the_shipped_video_generator_matches_its_captions():
    """Its clips are (B, T, 3, 32, 32) videos whose gold on train captions beats the same clips judged against
    the other clips' captions."""
    from mmalign.world.assets import load_video_pipeline
    from mmalign.world.video import verify_videos
    from mmalign.world.video_build import sample_videos

    pipe = load_video_pipeline()
    clips = video_prompt_set("train", 8, seed=5)
    videos = sample_videos(pipe, [c.text for c in clips], seed=0, num_inference_steps=6)
    assert videos.shape == (8, 8, 3, 32, 32)
    scenes, motions = [c.scene for c in clips], [c.motion for c in clips]
    own = [r.score for r in verify_videos(videos, scenes, motions)]
    other = [r.score for r in verify_videos(videos, scenes[1:] + scenes[:1], motions[1:] + motions[:1])]
    assert sum(own) / 8 > sum(other) / 8 + 0.1


def test_the_shipped_generator_with_travelling_noise_draws_frames_that_agree():
    """Independent noise per frame gives frames that disagree on the scene; noise travelling with the caption's
    motion halves (at least) the mean change between consecutive frames, on the same captions."""
    from mmalign.world.assets import load_video_pipeline
    from mmalign.world.video_build import sample_videos

    pipe = load_video_pipeline()
    prompts = [c.text for c in video_prompt_set("train", 4, seed=7)]
    flicker = {}
    for speed in (None, 0.5):
        videos = sample_videos(pipe, prompts, seed=0, num_inference_steps=6, noise_speed=speed)
        flicker[speed] = (videos[:, 1:] - videos[:, :-1]).abs().mean().item()
    assert flicker[0.5] < flicker[None] / 2, flicker
    with pytest.raises(ValueError, match="prompts: expected a world caption with one 'moving"):
        sample_videos(pipe, ["a red circle"], noise_speed=0.5)  # no direction to travel in


def test_the_shipped_video_generator_loads_by_name_and_through_the_cli(tmp_path, capsys):
    import argparse

    from PIL import Image

    from mmalign.models.pipelines import load_pipeline as load_named
    from mmalign.world.commands import add_world_parser

    assert type(load_named("world-video")).__name__ == "AnimateDiffPipeline"  # a recipe's `pipeline: world-video`
    parser = argparse.ArgumentParser(prog="mmalign")
    add_world_parser(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "clip.gif"
    args = parser.parse_args(["world", "video", "--generate", "--prompt", "a red circle moving left", "--steps", "2",
                              "--frames", "4", "--out", str(out)])
    assert args.func(args) == 0
    assert "(drawn by the video generator)" in capsys.readouterr().out
    assert Image.open(out).n_frames == 4


def test_the_evaluation_against_a_pipeline_that_renders_its_captions():
    """A 'pipeline' that returns the clips' own renders scores the renders' gold, loses it against shuffled
    captions, and passes motion only for the stated direction among the four."""
    from types import SimpleNamespace

    from mmalign.world.video import render_videos, verify_videos
    from mmalign.world.video_build import evaluate_video_generator

    class Renderer:
        def __call__(self, prompts, num_frames, **_):
            picked = [next(c for c in self.clips if c.text == p) for p in prompts]
            return SimpleNamespace(frames=render_videos(picked, num_frames, jitter=1.0, seed=0))

    renderer = Renderer()
    renderer.clips = video_prompt_set("heldout", 6, seed=3)
    report = evaluate_video_generator(renderer, prompts=6, seed=3, splits=("heldout",))["heldout"]
    clips = renderer.clips
    expected = verify_videos(render_videos(clips, 8, jitter=1.0, seed=0), [c.scene for c in clips],
                             [c.motion for c in clips])
    assert report["gold_mean"] == round(sum(r.score for r in expected) / 6, 4) == 1.0
    assert report["gold_shuffled_captions"] < 0.8
    stated = [c.motion.direction for c in clips]
    for direction, rate in report["motion_if_stated"].items():
        groups = [d for c, d in zip(clips, stated) for _ in {(o.colour, o.shape) for o in c.scene.objects}]
        assert rate == round(sum(d == direction for d in groups) / len(groups), 4)


def test_eval_generator_on_the_world_video_pipeline(tmp_path, capsys):
    """`mmalign eval generator --pipeline world-video` samples video captions at --frames and scores them with
    gold_video by default: the same figures as evaluate_generator on an adapter built by hand."""
    from mmalign.cli import main
    from mmalign.eval.generator import evaluate_generator
    from mmalign.eval.scoring import build_rewards
    from mmalign.models.pipelines import adapter_for
    from mmalign.models.pipelines import load_pipeline as load_named
    from mmalign.prompts import PromptSource, load_prompts

    out = tmp_path / "eval.json"
    assert main(["eval", "generator", "--pipeline", "world-video", "--n", "2", "--samples-per-prompt", "1",
                 "--steps", "2", "--frames", "3", "--diversity-encoder", "none", "--quiet", "--out", str(out)]) == 0
    summary = json.loads(out.read_text())["summary"]
    assert summary["gold_video"]["n"] == 2
    adapter = adapter_for(load_named("world-video"), 5.0, num_frames=3)
    prompts = load_prompts(PromptSource(world_video="heldout", n=2, seed=1))
    direct = evaluate_generator(adapter, adapter.make_policy(2, 1.0), prompts, build_rewards(["gold_video"]), 1, 1234,
                                progress=False)
    assert direct.batch.pixels.shape[:2] == (2, 3)
    assert summary["gold_video"]["mean"] == pytest.approx(float(direct.scores["gold_video"].mean()), abs=1e-6)
    capsys.readouterr()
    assert main(["eval", "generator", "--pipeline", "world", "--n", "1", "--frames", "3"]) != 0  # images have no frames
    assert "num_frames" in capsys.readouterr().err
