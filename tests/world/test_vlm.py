"""The world's VLM: the shipped Qwen2-VL folder through transformers' own auto classes, its tokenizer and
processor, SFT batches, the judge's AUROC and a few build steps."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mmalign.rewards.rules import extract_answer, parse_box
from mmalign.world.questions import IMAGE_SIZE, KINDS, question_set
from mmalign.world.render import render_batch
from mmalign.world.vlm import (
    VLMRecipe,
    answer,
    build_vlm,
    evaluate_vlm,
    judge_auroc,
    load_vlm,
    sft_batch,
    vlm_path,
    yes_probability,
)
from mmalign.world.vlm_tokenizer import ANSWER_TAGS, SPECIAL_TOKENS


@pytest.fixture(scope="module")
def shipped():
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = vlm_path()
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    return model, AutoProcessor.from_pretrained(folder)


def test_shipped_folder_is_a_qwen2_vl_checkpoint(shipped):
    model, processor = shipped
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    assert type(processor).__name__ == "Qwen2VLProcessor"
    assert type(processor.tokenizer).__name__ == "Qwen2Tokenizer"
    assert type(processor.video_processor).__name__ == "Qwen2VLVideoProcessor"
    tokenizer, config = processor.tokenizer, model.config
    ids = dict(zip(SPECIAL_TOKENS, tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))))
    assert (config.image_token_id, config.video_token_id) == (ids["<|image_pad|>"], ids["<|video_pad|>"])
    assert (config.vision_start_token_id, config.vision_end_token_id) == (
        ids["<|vision_start|>"], ids["<|vision_end|>"]
    )
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert len(tokenizer) <= config.text_config.vocab_size
    text = config.text_config
    assert sum(text.rope_parameters["mrope_section"]) == text.hidden_size // text.num_attention_heads // 2
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    assert size < 10 * 2**20 and (Path(vlm_path()) / "model.safetensors").stat().st_size < 10 * 2**20


def test_chat_template_writes_qwen_markup_and_images_become_sixteen_tokens(shipped):
    _, processor = shipped
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi?<|im_end|>\n<|im_start|>assistant\n"
    )
    image = (render_batch([question_set(1)[0].scene], IMAGE_SIZE) * 255).to(torch.uint8)
    batch = processor(text=[text], images=list(image), return_tensors="pt")
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8]]
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == 16


def test_every_question_word_is_one_token(shipped):
    tokenizer = shipped[1].tokenizer
    for q in question_set(70, "heldout", seed=123):
        assert len(tokenizer.tokenize(q.text)) == len(q.text.split()) + 1, q.text  # words and the final "?" or "."
        assert len(tokenizer.tokenize(q.completion)) <= 18  # a box: tags, brackets, 8 digits, 3 commas, 3 spaces
    for tag in ANSWER_TAGS:
        assert tokenizer.tokenize(tag) == [tag]
    assert tokenizer.decode(tokenizer("<answer>é ?</answer>")["input_ids"]) == "<answer>é ?</answer>"


def test_generate_on_a_batch_returns_parseable_answers(shipped):
    model, processor = shipped
    questions = question_set(2, "heldout", seed=7, kinds=("colour", "grounding"))
    images = render_batch([q.scene for q in questions], IMAGE_SIZE)
    completions = answer(model, processor, images, [q.text for q in questions])
    assert len(completions) == 2
    assert extract_answer(completions[0], require_tags=True) is not None, completions
    assert parse_box(extract_answer(completions[1], require_tags=True) or "") is not None, completions


def test_judge_probabilities_and_video_forward(shipped):
    model, processor = shipped
    scenes = [q.scene for q in question_set(2, seed=1)]
    images = render_batch(scenes, IMAGE_SIZE)
    p = yes_probability(model, processor, images, ["Does this image show a red circle?"] * 2)
    assert p.shape == (2,) and bool(((p >= 0) & (p <= 1)).all())
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What moves?"}]}],
        add_generation_prompt=True,
    )
    video = (images.repeat(2, 1, 1, 1) * 255).to(torch.uint8)  # 4 frames
    batch = processor(text=[text], videos=[video], return_tensors="pt")
    assert batch["video_grid_thw"].tolist() == [[2, 8, 8]]
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()


def test_sft_labels_cover_the_completion_and_end_of_turn_only(shipped):
    _, processor = shipped
    questions = question_set(7, seed=2)
    images = render_batch([q.scene for q in questions], IMAGE_SIZE)
    batch = sft_batch(processor, questions, images)
    for row, q in zip(batch["labels"], questions):
        target = processor.tokenizer.decode(row[row != -100])
        assert target == q.completion + "<|im_end|>"


@pytest.mark.slow
def test_shipped_model_is_half_right_and_a_good_judge(shipped):
    """The build's bars on fresh seeds: room for GRPO on answers, judgements good enough for a reward."""
    model, processor = shipped
    result = evaluate_vlm(model, processor, question_set(140, "heldout", seed=77))
    assert 0.25 <= result["accuracy"] <= 0.75, result
    assert judge_auroc(model, processor, 100, seed=77) >= 0.8


def test_build_runs_a_few_steps_and_loads(tmp_path):
    recipe = replace(VLMRecipe(), batch=4, eval_questions=len(KINDS), judge_prompts=6)
    report = build_vlm(tmp_path / "vlm", steps=2, progress=False, recipe=recipe)
    assert report["recipe"]["steps"] == 2 and report["size_bytes"] < 10 * 2**20
    assert set(report["heldout"]["accuracy_by_kind"]) == set(KINDS)
    assert 0.0 <= report["judge_auroc"] <= 1.0
    model, processor = load_vlm(path=str(tmp_path / "vlm"))
    images = render_batch([question_set(1)[0].scene], IMAGE_SIZE)
    assert len(answer(model, processor, images, ["What colour is the circle?"], max_new_tokens=3)) == 1
    with pytest.raises(ValueError, match="steps"):
        build_vlm(tmp_path / "bad", steps=0)
