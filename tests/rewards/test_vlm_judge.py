"""VLM judges against a hand-written teacher-forced computation, one pair at a time, on the world's VLM;
tensor preprocessing against the Qwen2-VL processor; pixel gradients by finite differences; bad inputs."""

from __future__ import annotations

import copy

import pytest
import torch

from mmalign import MediaBatch
from mmalign.rewards import available, build
from mmalign.rewards.vlm_judge import qwen2vl_pixel_values, qwen2vl_video_values
from mmalign.rewards.vlm_questions import ArtifactJudge
from mmalign.world.captions import prompt_set
from mmalign.world.questions import checklist_questions
from mmalign.world.render import render
from mmalign.world.vlm import vlm_path

WORLD = {"answer_prefix": "<answer>", "answer": "yes"}


@pytest.fixture(scope="module")
def world_vlm():
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = vlm_path()
    return AutoModelForImageTextToText.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)


@pytest.fixture(scope="module")
def batch():
    """Five world renders, quantised to uint8 levels so the processor's uint8 path sees the same pixels;
    prompts of different lengths, one mismatched."""
    prompts = prompt_set("heldout", 5, 3)
    pixels = (torch.stack([render(p.scene, 32) for p in prompts]) * 255).round() / 255
    texts = [p.text for p in prompts]
    texts[2] = texts[0]
    return MediaBatch(pixels, texts, [{"scene": p.scene.to_dict(), "gold": "no"} for p in prompts])


def reference_logprobs(model, processor, image, question, answer, prefix=""):
    """One pair: the chat prompt and answer tokens in one unpadded forward, log-softmax, gather; an image
    ``(3, H, W)`` or a video ``(T, 3, H, W)``, given to the processor as such."""
    kind = "video" if image.ndim == 4 else "image"
    messages = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True) + prefix
    uint8 = (image * 255).round().to(torch.uint8)
    inputs = processor(text=[text], return_tensors="pt", **{f"{kind}s": [uint8]})
    target = processor.tokenizer(answer, add_special_tokens=False)["input_ids"]
    n = len(target)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        tail = {"input_ids": target, "attention_mask": [1] * n}.get(key, [0] * n)
        inputs[key] = torch.cat([inputs[key], torch.tensor([tail])], 1)
    with torch.no_grad():
        logp = model(**inputs).logits[0].log_softmax(-1)
    return logp[-n - 1 : -1].gather(-1, torch.tensor(target)[:, None])[:, 0]


def judge(world_vlm, name, padding="left", **options):
    model, processor = world_vlm
    processor = copy.deepcopy(processor)
    processor.tokenizer.padding_side = padding
    return build({"name": name, "model": model, "processor": processor, **options})


def test_judges_are_registered():
    names = available()
    assert {"vqascore", "vlm_question", "vlm_artifact", "vlm_checklist", "prompt_echo"} <= set(names)
    assert names["vqascore"].startswith("VQAScore")


@pytest.mark.parametrize("padding", ["left", "right"])
def test_vqascore_equals_teacher_forced_geometric_mean(world_vlm, batch, padding):
    """Default template and the two-token answer "Yes" (geometric mean), in chunks of 2 rows."""
    reward = judge(world_vlm, "vqascore", padding, max_batch=2)
    out = reward(batch)
    expected = []
    for image, prompt in zip(batch.pixels, batch.prompts):
        question = f'Does this figure show "{prompt}"? Please answer yes or no.'
        logp = reference_logprobs(*world_vlm, image, question, "Yes")
        assert len(logp) == 2
        expected.append(logp.mean().exp())
    torch.testing.assert_close(out.scores, torch.stack(expected), rtol=1e-4, atol=1e-6)


def test_processor_path_for_other_image_processors(world_vlm, batch):
    """An image processor the torch path does not reproduce (here the PIL backend) goes through the processor."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    model, processor = world_vlm
    pil = copy.deepcopy(processor)
    pil.image_processor = Qwen2VLImageProcessorPil(**pil.image_processor.to_dict())
    reward = build({"name": "vqascore", "model": model, "processor": pil})
    assert not reward.tensor_pixels
    expected = judge(world_vlm, "vqascore")(batch).scores
    torch.testing.assert_close(reward(batch).scores, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("padding", ["left", "right"])
def test_own_text_encoding_equals_the_processors(world_vlm, batch, padding):
    """The Qwen2-VL family's text encoded beside the torch pixels (image token expanded by the processor's rule,
    each distinct row tokenized once) gives the processor's own input ids, masks, token types and grid; answers
    of different lengths; scores equal to tight tolerance."""
    reward = judge(world_vlm, "vqascore", padding)
    own = copy.copy(reward)
    own.tensor_pixels = False  # the processor's path: its uint8 preprocessing, its tokenization and padding
    contexts = [reward.context(q) for q in (batch.prompts[0], batch.prompts[1], batch.prompts[0], "x", "x")]
    assert len(set(contexts)) == 3
    targets = reward.processor.tokenizer(["Yes", "no", "a red circle", "Yes", "no"], add_special_tokens=False)
    fast, fast_starts = reward.encode(batch.pixels, contexts, targets["input_ids"])
    slow, slow_starts = own.encode(batch.pixels, contexts, targets["input_ids"])
    assert sorted(fast) == sorted(slow) and fast_starts == slow_starts
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw"):
        assert torch.equal(fast[key], slow[key]), key
    torch.testing.assert_close(fast["pixel_values"], slow["pixel_values"], rtol=0, atol=1e-5)
    torch.testing.assert_close(reward(batch).scores, own(batch).scores, rtol=1e-5, atol=1e-7)


def test_question_reward_fills_template_and_answer_from_metadata(world_vlm, batch):
    out = judge(world_vlm, "vlm_question", template="Does this image show {prompt}?", answer="{gold}",
                answer_prefix="<answer>")(batch)
    expected = [reference_logprobs(*world_vlm, image, f"Does this image show {prompt}?", "no", "<answer>").exp()
                for image, prompt in zip(batch.pixels, batch.prompts)]
    torch.testing.assert_close(out.scores, torch.cat(expected), rtol=1e-4, atol=1e-6)
    assert out.scores[0] < 0.5 < out.scores[2]  # matched "no" is unlikely; mismatched likely


def test_artifact_is_one_minus_yes_against_no(world_vlm, batch):
    out = judge(world_vlm, "vlm_artifact", answer="yes", contrast="no", answer_prefix="<answer>")(batch)
    question = ArtifactJudge.DEFAULT_TEMPLATE
    expected = []
    for image in batch.pixels:
        yes, no = (reference_logprobs(*world_vlm, image, question, a, "<answer>").sum() for a in ("yes", "no"))
        expected.append(1 - torch.sigmoid(yes - no))
    torch.testing.assert_close(out.scores, torch.stack(expected), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_prompt_echo_equals_teacher_forced_prompt_logprob(world_vlm, batch, reduction):
    out = judge(world_vlm, "prompt_echo", "right", reduction=reduction, answer_prefix="<answer>")(batch)
    logps = [reference_logprobs(*world_vlm, image, "Describe the image.", prompt, "<answer>")
             for image, prompt in zip(batch.pixels, batch.prompts)]
    assert len({len(lp) for lp in logps}) > 1  # answers of different lengths share the padded batch
    expected = torch.stack([lp.mean() if reduction == "mean" else lp.sum() for lp in logps])
    torch.testing.assert_close(out.scores, expected, rtol=1e-4, atol=1e-5)
    assert out.components["tokens"].tolist() == [float(len(lp)) for lp in logps]


def test_checklist_is_mean_yes_over_questions_from_metadata_or_the_world(world_vlm, batch):
    own = [{"questions": ["Is there a red circle?", "Does this image show a blue square?"]}] + list(batch.metadata[1:])
    mixed = MediaBatch(batch.pixels, batch.prompts, own)
    out = judge(world_vlm, "vlm_checklist", **WORLD)(mixed)
    expected = []
    for image, prompt, meta in zip(mixed.pixels, mixed.prompts, own):
        questions = meta.get("questions") or checklist_questions(prompt, meta)
        p = [reference_logprobs(*world_vlm, image, q, "yes", "<answer>").exp() for q in questions]
        expected.append(torch.cat(p).mean())
    torch.testing.assert_close(out.scores, torch.stack(expected), rtol=1e-4, atol=1e-6)
    assert out.components["questions"][0] == 2


def test_tensor_preprocessing_matches_the_processor(world_vlm):
    _, processor = world_vlm
    ip = processor.image_processor
    torch.manual_seed(0)
    uint8 = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)  # no resize: the uint8 path exactly
    values, grid = qwen2vl_pixel_values(uint8.float() / 255, ip)
    own = ip(images=list(uint8), return_tensors="pt")
    torch.testing.assert_close(values, own["pixel_values"], rtol=0, atol=1e-5)
    assert torch.equal(grid, own["image_grid_thw"])
    floats = torch.rand(2, 3, 40, 56)  # resized: the processor's float path, bicubic with antialiasing
    values, grid = qwen2vl_pixel_values(floats, ip)
    own = ip(images=list(floats), do_rescale=False, return_tensors="pt")
    assert grid.tolist() == own["image_grid_thw"].tolist() != [[1, 10, 14]] * 2
    torch.testing.assert_close(values, own["pixel_values"], rtol=0, atol=1e-5)


def test_pixel_gradients_match_finite_differences(world_vlm, batch):
    model, processor = world_vlm
    model64 = copy.deepcopy(model).double()
    reward = build({"name": "vqascore", "model": model64, "processor": processor, "dtype": "float64",
                    "differentiable": True, "template": "Does this image show {prompt}?", **WORLD})
    assert reward.differentiable
    torch.manual_seed(0)
    pixels = (0.1 + 0.8 * torch.rand(2, 3, 40, 40, dtype=torch.float64)).requires_grad_()  # resized to 32
    prompts = batch.prompts[:2]
    reward(MediaBatch(pixels, prompts)).scores.sum().backward()
    direction = torch.randn_like(pixels)
    eps = 1e-3  # scores are float32 (the contract), computed in float64
    with torch.no_grad():
        up, down = (reward(MediaBatch(pixels + s * eps * direction, prompts)).scores.sum() for s in (1, -1))
    numeric = (up - down) / (2 * eps)
    analytic = (pixels.grad * direction).sum()
    assert pixels.grad.abs().sum() > 0
    torch.testing.assert_close(analytic.float(), numeric, rtol=1e-3, atol=1e-5)


def test_bad_inputs_are_named(world_vlm, batch):
    model, processor = world_vlm
    reward = judge(world_vlm, "vlm_checklist", generator=None, **WORLD)
    imageonly = copy.deepcopy(processor)
    imageonly.video_processor = None
    with pytest.raises(ValueError, match=r"batch.pixels: vqascore judges videos \(B, T, C, H, W\) only with a "
                                         r"Qwen2-VL-family video processor .* got a video batch \(1, 2, 3, 32, 32\)"):
        build({"name": "vqascore", "model": model, "processor": imageonly})(MediaBatch(torch.rand(1, 2, 3, 32, 32), ["x"]))
    with pytest.raises(ValueError, match=r"metadata\[0\]\['questions'\]: expected the sample's questions"):
        reward(batch[:1])
    with pytest.raises(ValueError, match=r"metadata\[1\]\['questions'\]: expected a non-empty list of question"):
        reward(MediaBatch(batch.pixels[:2], batch.prompts[:2], [{"questions": ["Is it red?"]}, {"questions": "Is it?"}]))
    with pytest.raises(ValueError, match="metadata\\['scene'\\]: the world's checklist needs"):
        judge(world_vlm, "vlm_checklist")(MediaBatch(batch.pixels[:1], batch.prompts[:1]))
    with pytest.raises(ValueError, match=r"template: '\{prompt\} \{colour\}' names 'colour'"):
        judge(world_vlm, "vlm_question", template="{prompt} {colour}")(batch)
    with pytest.raises(ValueError, match="template: expected a non-empty string, got None"):
        build({"name": "vlm_question", "model": model, "processor": processor})
    with pytest.raises(ValueError, match="answer: expected text with at least one token, got ''"):
        judge(world_vlm, "vqascore", answer="{gold}")(MediaBatch(batch.pixels[:1], batch.prompts[:1], [{"gold": ""}]))
    with pytest.raises(ValueError, match="reduction: expected 'mean' or 'sum', got 'max'"):
        judge(world_vlm, "prompt_echo", reduction="max")
    with pytest.raises(ValueError, match="processor: a model object"):
        build({"name": "vqascore", "model": model})
    with pytest.raises(ValueError, match="generator: expected an import path"):
        judge(world_vlm, "vlm_checklist", generator="questions")
    with pytest.raises(ValueError, match="max_batch: expected a positive int, got 0"):
        judge(world_vlm, "vqascore", max_batch=0)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    pil = copy.deepcopy(processor)
    pil.image_processor = Qwen2VLImageProcessorPil(**pil.image_processor.to_dict())
    with pytest.raises(ValueError, match="differentiable: pixel gradients need a Qwen2-VL-family image processor"):
        build({"name": "vqascore", "model": model, "processor": pil, "differentiable": True})


# ------------------------------------------------------------------------------------------------ videos
@pytest.fixture(scope="module")
def tiny_vlm():
    from tiny_models import make_tiny_vlm

    return make_tiny_vlm(seed=3)


@pytest.fixture(scope="module")
def clips():
    """Three world clips of 3 frames (odd: the last frame fills the second temporal patch), uint8 levels."""
    from mmalign.world.video import render_videos, video_prompt_set

    prompts = video_prompt_set("train", 3, seed=4)
    videos = (render_videos(prompts, frames=3) * 255).round() / 255
    return MediaBatch(videos, [p.text for p in prompts])


@pytest.mark.parametrize("padding", ["left", "right"])
def test_video_judge_equals_teacher_forced_video_input(tiny_vlm, clips, padding):
    """Each clip goes to the VLM as a video (pixel_values_videos, video_grid_thw), batched in chunks of 2 rows, as
    the processor's own video path one clip at a time gives; its first frame alone as an image scores otherwise."""
    out = judge(tiny_vlm, "vqascore", padding, max_batch=2)(clips)
    echo = judge(tiny_vlm, "prompt_echo", padding)(clips)
    expected, echoed = [], []
    for video, prompt in zip(clips.pixels, clips.prompts):
        question = f'Does this figure show "{prompt}"? Please answer yes or no.'
        expected.append(reference_logprobs(*tiny_vlm, video, question, "Yes").mean().exp())
        echoed.append(reference_logprobs(*tiny_vlm, video, "Describe the image.", prompt).mean())
    torch.testing.assert_close(out.scores, torch.stack(expected), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(echo.scores, torch.stack(echoed), rtol=1e-4, atol=1e-5)
    first = judge(tiny_vlm, "vqascore")(MediaBatch(clips.pixels[:, 0], clips.prompts))
    assert not torch.allclose(first.scores, out.scores, rtol=1e-3, atol=0)


def test_video_preprocessing_matches_the_processor(tiny_vlm):
    _, processor = tiny_vlm
    vp = processor.video_processor
    torch.manual_seed(0)
    uint8 = torch.randint(0, 256, (2, 3, 3, 32, 32), dtype=torch.uint8)  # no resize: the uint8 path exactly
    values, grid = qwen2vl_video_values(uint8.float() / 255, vp)
    own = vp(videos=list(uint8), return_tensors="pt")
    torch.testing.assert_close(values, own["pixel_values_videos"], rtol=0, atol=1e-5)
    assert torch.equal(grid, own["video_grid_thw"]) and grid.tolist() == [[2, 8, 8]] * 2
    floats = torch.rand(2, 4, 3, 40, 56)  # resized: bicubic with antialiasing, with and without the pixel cap
    grids = []
    for cap in (False, True):
        sized = copy.deepcopy(vp)
        sized.size = {"shortest_edge": 256, "longest_edge": 4096}
        sized.cap_pixels_per_frame, sized.max_video_tokens = cap, 16
        values, grid = qwen2vl_video_values(floats, sized)
        own = sized(videos=list(floats), do_rescale=False, return_tensors="pt")
        assert grid.tolist() == own["video_grid_thw"].tolist()
        torch.testing.assert_close(values, own["pixel_values_videos"], rtol=0, atol=1e-5)
        grids.append(grid[0].tolist())
    assert grids[1][1] * grids[1][2] < grids[0][1] * grids[0][2]  # the cap binds


def test_video_pixel_gradients_match_finite_differences(tiny_vlm, clips):
    model, processor = tiny_vlm
    reward = build({"name": "vqascore", "model": copy.deepcopy(model).double(), "processor": processor,
                    "dtype": "float64", "differentiable": True})
    pixels = (0.1 + 0.8 * clips.pixels[:2].double()).requires_grad_()
    reward(MediaBatch(pixels, clips.prompts[:2])).scores.sum().backward()
    torch.manual_seed(0)
    direction = torch.randn_like(pixels)
    eps = 1e-3
    with torch.no_grad():
        up, down = (reward(MediaBatch(pixels + s * eps * direction, clips.prompts[:2])).scores.sum() for s in (1, -1))
    assert pixels.grad[:, 1:].abs().sum() > 0  # every frame, not the first alone
    torch.testing.assert_close((pixels.grad * direction).sum().float(), (up - down) / (2 * eps), rtol=1e-3, atol=1e-5)
