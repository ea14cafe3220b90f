"""Tiny models built in code for tests and test subprocesses (random weights, CPU-sized)."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import torch


def byte_level_vocab() -> dict[str, int]:
    """A CLIP-style BPE vocabulary with every byte as a token, alone and word-final: with no merges, any
    text tokenizes, one token per byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = [chr(c) for c in printable] + [chr(256 + i) for i in range(256 - len(printable))]
    tokens = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
    return {t: i for i, t in enumerate(tokens)}


TINY_OPEN_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def save_tiny_open_clip(folder) -> Path:
    """A random tiny OpenCLIP model (always the same weights) saved in the published folder layout (config JSON +
    safetensors) into ``folder``."""
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(1234)
    model = CLIP(**TINY_OPEN_CLIP)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
    config = {"model_cfg": TINY_OPEN_CLIP, "preprocess_cfg": {"mean": CLIP_MEAN, "std": CLIP_STD}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    return folder


def make_tiny_sd_pipeline(seed: int = 0, prediction_type: str = "epsilon"):
    """A random Stable Diffusion pipeline small enough for CPU tests: 16 px images, 8×8×4 latents."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    parts = _tiny_sd_parts()
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8,
    )
    pipe = StableDiffusionPipeline(**parts, unet=unet, scheduler=_tiny_ddim(prediction_type), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tiny_sd_parts() -> dict:
    """SD's byte-level CLIP tokenizer, a one-layer CLIP text tower (16 wide) and a VAE with 4 latent channels and
    factor 2 (16 px images, 8×8 latents), drawn from the global RNG in that order."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer(vocab=byte_level_vocab(), merges=[], model_max_length=32)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                       pad_token_id=1)
    )
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16,
    )
    return {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer}


def _tiny_ddim(prediction_type: str = "epsilon", beta_schedule: str = "scaled_linear"):
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule=beta_schedule, clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)


def make_tiny_text_to_video_pipeline(seed: int = 0):
    """A random ModelScope-style ``TextToVideoSDPipeline`` for CPU tests: a ``UNet3DConditionModel`` (spatial and
    temporal convolutions and attention) over 4 frames of 8×8×4 latents (16 px frames), SD's tiny text tower and
    VAE, a DDIM scheduler."""
    from diffusers import TextToVideoSDPipeline, UNet3DConditionModel

    torch.manual_seed(seed)
    parts = _tiny_sd_parts()
    unet = UNet3DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8,
    )
    pipe = TextToVideoSDPipeline(**parts, unet=unet, scheduler=_tiny_ddim())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_tiny_motion_adapter(seed: int = 1):
    """A random AnimateDiff ``MotionAdapter`` matching the tiny SD UNet's blocks (temporal attention, 2 heads)."""
    from diffusers import MotionAdapter

    torch.manual_seed(seed)
    return MotionAdapter(block_out_channels=(16, 32), motion_layers_per_block=1, motion_num_attention_heads=2,
                         motion_norm_num_groups=8, motion_max_seq_length=8)


def make_tiny_animatediff_pipeline(seed: int = 0):
    """A random ``AnimateDiffPipeline`` for CPU tests: the tiny SD pipeline's UNet made a ``UNetMotionModel`` with
    a tiny motion adapter (as ``AnimateDiffPipeline(unet=UNet2DConditionModel, motion_adapter=...)`` builds it), 16 px
    frames, DDIM with AnimateDiff's linear betas."""
    from diffusers import AnimateDiffPipeline

    sd = make_tiny_sd_pipeline(seed)
    pipe = AnimateDiffPipeline(vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=sd.unet,
                               motion_adapter=make_tiny_motion_adapter(), scheduler=_tiny_ddim(beta_schedule="linear"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_tiny_wan_pipeline(seed: int = 0):
    """A random ``WanPipeline`` for CPU tests: a two-block ``WanTransformer3DModel`` over (4, 2, 4, 4) latents
    (5 frames of 32 px: the Wan VAE's 4× temporal and 8× spatial factors, with per-channel latent mean and std), a
    one-layer UMT5 encoder, the flow-matching Euler scheduler with shift 3."""
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )

    torch.manual_seed(seed)
    text_encoder, tokenizer = _tiny_t5_encoder(32, umt5=True)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.05, 0.3],
                           latents_std=[1.5, 2.0, 0.8, 1.2])
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


#: SDXL's published scheduler config (an Euler scheduler that DDIM reads: no clipping, no final ᾱ = 1)
SDXL_SCHEDULER = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
    "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}


def make_tiny_sdxl_pipeline(seed: int = 0, force_zeros_for_empty_prompt: bool = True):
    """A random SDXL pipeline small enough for CPU tests: two text encoders of different widths (16 and 24, the
    second with a 12-wide projection for the pooled embedding), a UNet with SDXL's text-and-time added
    conditioning, SDXL's scheduler config; 16 px images, 8×8×4 latents."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    tokenizers = [CLIPTokenizer(vocab=byte_level_vocab(), merges=[], model_max_length=32) for _ in range(2)]
    text = dict(vocab_size=len(tokenizers[0]), intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=16, **text))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=24, projection_dim=12, **text))
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16,
        scaling_factor=0.13025,
    )
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16 + 24, attention_head_dim=4, norm_num_groups=8, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 12,  # six size/crop ids of width 8, then the pooled text
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1], unet=unet, scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe

@functools.lru_cache(maxsize=1)
def _world_tokenizer():
    from mmalign.world.vlm_tokenizer import build_tokenizer

    return build_tokenizer()


def make_tiny_vlm(seed: int = 0, hidden_size: int = 32):
    """A random Qwen2-VL with the world's tokenizer and processor (32 px images), small enough for CPU tests:
    ``(model, processor)``; the model has no hub id or folder, as a model built in memory."""
    from dataclasses import replace

    from transformers import GenerationConfig, Qwen2VLForConditionalGeneration

    from mmalign.world.vlm import VLMRecipe, build_processor, vlm_config

    tokenizer = copy.deepcopy(_world_tokenizer())
    recipe = replace(VLMRecipe(), hidden_size=hidden_size, layers=1, heads=2, kv_heads=1,
                     intermediate_size=2 * hidden_size, vision_dim=16, vision_depth=1, vision_heads=1)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(vlm_config(tokenizer, recipe)).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id], pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.pad_token_id,
    )
    return model, build_processor(tokenizer, recipe.patch_size)


def make_tiny_qwen25_vl(seed: int = 0):
    """A random Qwen2.5-VL (window-attention vision tower, ``second_per_grid_ts`` for videos) with the world's
    tokenizer and a 32 px processor: ``(model, processor)``, built in memory."""
    from transformers import (
        GenerationConfig,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = copy.deepcopy(_world_tokenizer())
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in tokenizer.all_special_tokens}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=-(-len(tokenizer) // 64) * 64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        ),
        vision_config=dict(depth=1, hidden_size=16, out_hidden_size=32, intermediate_size=32, num_heads=1,
                           patch_size=4, spatial_merge_size=2, temporal_patch_size=2, window_size=16,
                           fullatt_block_indexes=[0]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id], pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.pad_token_id,
    )
    pixels = {"shortest_edge": 32 * 32, "longest_edge": 32 * 32}
    grid = {"patch_size": 4, "temporal_patch_size": 2, "merge_size": 2}
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=pixels, **grid),
        video_processor=Qwen2VLVideoProcessor(size=pixels, **grid),
        tokenizer=tokenizer, chat_template=tokenizer.chat_template,
    )
    return model, processor


def _tiny_clip_text_encoder(cls, hidden_size: int, projection_dim: int = 16):
    """A one-layer CLIP text tower ``cls`` (``CLIPTextModel`` or ``CLIPTextModelWithProjection``) over the byte-level
    vocabulary, and its tokenizer (32 tokens)."""
    from transformers import CLIPTextConfig, CLIPTokenizer

    tokenizer = CLIPTokenizer(vocab=byte_level_vocab(), merges=[], model_max_length=32)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                            num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32,
                            projection_dim=projection_dim, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return cls(config), tokenizer


def _tiny_t5_encoder(d_model: int = 32, umt5: bool = False):
    """A one-layer T5 encoder (``umt5``: UMT5, Wan's) and a T5 (Unigram) tokenizer with one piece per printable
    ASCII character, built offline."""
    from transformers import T5Config, T5EncoderModel, T5Tokenizer, UMT5Config, UMT5EncoderModel

    chars = [chr(c) for c in range(33, 127)]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + c, -3.0) for c in chars] + [(c, -4.0) for c in chars]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0)
    config_class, model_class = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = config_class(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1,
                          num_heads=2, relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0,
                          eos_token_id=1, decoder_start_token_id=0)
    return model_class(config).eval(), tokenizer


def _tiny_flow_vae(shift_factor: float, scaling_factor: float):
    """A random VAE with 16 latent channels (the SD3/Flux convention, with their shift and scale): 16 px images,
    8×8 latents."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=16, norm_num_groups=4, sample_size=16,
        shift_factor=shift_factor, scaling_factor=scaling_factor, use_quant_conv=False, use_post_quant_conv=False,
    )


def make_tiny_sd3_pipeline(seed: int = 0, t5: bool = True):
    """A random Stable Diffusion 3 pipeline for CPU tests: a one-layer MMDiT over 8×8×16 latents (16 px images), two
    CLIP text towers with projections and a T5 encoder (``t5=False``: dropped, as SD3 allows)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    text_encoder, tokenizer = _tiny_clip_text_encoder(CLIPTextModelWithProjection, 16)
    text_encoder_2, tokenizer_2 = _tiny_clip_text_encoder(CLIPTextModelWithProjection, 16)
    text_encoder_3, tokenizer_3 = _tiny_t5_encoder(32)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
        pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm",
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_tiny_flow_vae(shift_factor=0.0609, scaling_factor=1.5305), text_encoder=text_encoder,
        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3 if t5 else None, tokenizer_3=tokenizer_3 if t5 else None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True):
    """A random Flux pipeline for CPU tests: one double- and one single-stream block over 8×8×16 latents (16 px
    images, 16 packed tokens), a CLIP text tower (pooled) and a T5 encoder; ``guidance_embeds``: the guidance-distilled
    variant (Flux-dev) or not (true CFG, as Flux-schnell-like models take)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    text_encoder, tokenizer = _tiny_clip_text_encoder(CLIPTextModel, 16)
    text_encoder_2, tokenizer_2 = _tiny_t5_encoder(32)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096, shift=3.0)
    pipe = FluxPipeline(scheduler=scheduler, vae=_tiny_flow_vae(shift_factor=0.1159, scaling_factor=0.3611),
                        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                        tokenizer_2=tokenizer_2, transformer=transformer)
    pipe.default_sample_size = 8  # 16 px: latents 8×8, as pipe(...) makes them by default
    pipe.set_progress_bar_config(disable=True)
    return pipe


def attach_random_lora(adapter) -> None:
    """Rank-2 LoRA on the adapter's default targets with random B (a fresh adapter's B is zero, so its export
    would be indistinguishable from none)."""
    from mmalign.trainers.lora import LoRAConfig, attach_lora

    attach_lora(adapter.denoiser, LoRAConfig(rank=2, alpha=4), adapter.lora_targets)
    with torch.no_grad():
        for name, p in adapter.denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)


def assert_lora_export_reproduces(adapter, fresh, eta: float, folder) -> None:
    """``adapter`` (with a trained LoRA) exported to ``folder`` and loaded with the pipeline's own
    ``load_lora_weights`` into ``fresh`` (the same family, no LoRA) gives the trained outputs, which differ from
    the base's."""
    embeds = adapter.encode_prompts(["a red circle", "two blue squares"])
    x = torch.randn((2, *adapter.latent_shape), generator=torch.Generator().manual_seed(0))
    t = adapter.make_policy(3, eta).timesteps[1]
    with torch.no_grad():
        trained = adapter.model_output(adapter.denoiser, x, t, embeds)
    adapter.export_lora(adapter.denoiser, folder)
    with torch.no_grad():
        base = fresh.model_output(fresh.denoiser, x, t, embeds)
    fresh.pipeline.load_lora_weights(folder)
    with torch.no_grad():
        loaded = fresh.model_output(fresh.denoiser, x, t, embeds)
    assert (trained - base).abs().max() > 1e-3  # the adapters matter …
    torch.testing.assert_close(loaded, trained, rtol=1e-5, atol=1e-5)  # … and load back as trained


def train_and_check(trainer) -> dict:
    """``trainer.setup()`` and ``train()``; its loss and mean reward must be finite and its trained weights
    must have moved. Returns the metrics."""
    import math

    trainer.setup()
    before = {n: p.detach().clone() for n, p in trainer.loop.raw_denoiser.named_parameters() if p.requires_grad}
    metrics = trainer.train()
    after = dict(trainer.loop.raw_denoiser.named_parameters())
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["reward/mean"])
    assert any(not torch.equal(after[n], p) for n, p in before.items())  # the trained weights moved
    return metrics
