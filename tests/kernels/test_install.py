"""Tiny diffusers and transformers models with the Triton kernel installed match their stock SDPA twins, in
outputs and in every parameter gradient; masked calls fall back to SDPA; the install report says what changed."""

import copy
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

from mmalign.kernels import AttentionProcessor, install

TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


@pytest.fixture
def kernel_calls(flash):
    """Counts calls that reach the Triton kernel."""
    with mock.patch.object(flash, "flash_attention", wraps=flash.flash_attention) as spy:
        yield spy


def on(device, inputs: dict) -> dict:
    return {name: value.to(device) for name, value in inputs.items()}


def run_with_grads(model, inputs: dict, output) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward, then backward of a fixed random projection of the output; returns output and parameter grads."""
    model.zero_grad(set_to_none=True)
    out = output(model(**inputs))
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.device)
    (out * weights).sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


def assert_twins_match(stock, ours, inputs: dict, output=lambda o: o.sample) -> None:
    expected_out, expected_grads = run_with_grads(stock, inputs, output)
    out, grads = run_with_grads(ours, inputs, output)
    torch.testing.assert_close(out, expected_out, **TOLERANCE)
    assert grads.keys() == expected_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], **TOLERANCE, msg=lambda m, n=name: f"grad {n}: {m}")


def tiny_unet():
    """SD-style UNet: 2 heads (head dims 16 and 32), 64 latent tokens, cross-attention to 77 text tokens.

    Few heads and a batch of one keep the interpreter (about 40 ms per Triton program) to seconds.
    """
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2,
    )


def unet_inputs(batch: int = 1) -> dict:
    return {"sample": torch.randn(batch, 4, 8, 8), "timestep": torch.tensor([10, 500][:batch]),
            "encoder_hidden_states": torch.randn(batch, 77, 32)}


def test_unet_matches_sdpa(kernel_calls, device):
    stock = tiny_unet().to(device)
    ours = copy.deepcopy(stock)
    report = install(ours, backend="triton")
    assert report.processors == {"AttentionProcessor": 8} and report.skipped == {} and report.installed == 8
    assert all(isinstance(p, AttentionProcessor) for p in ours.attn_processors.values())
    assert_twins_match(stock, ours, on(device, unet_inputs()))
    assert kernel_calls.call_count == 8  # 4 transformer blocks x (self, cross); the backward reuses the context


def test_unet_masked_cross_attention_falls_back(kernel_calls, device):
    stock = tiny_unet().to(device)
    ours = copy.deepcopy(stock)
    install(ours, backend="triton")
    mask = torch.ones(2, 77)
    mask[1, 40:] = 0
    inputs = on(device, {**unet_inputs(batch=2), "encoder_attention_mask": mask})
    with torch.no_grad():
        expected, got = stock(**inputs).sample, ours(**inputs).sample
    assert kernel_calls.call_count == 4  # self-attention only; masked cross-attention went to SDPA
    torch.testing.assert_close(got, expected, **TOLERANCE)


def test_sd3_joint_attention_matches_sdpa(kernel_calls, device):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    stock = SD3Transformer2DModel(
        sample_size=4, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=4, dual_attention_layers=(0,), qk_norm="rms_norm",
    ).to(device)
    ours = copy.deepcopy(stock)
    assert install(ours, backend="triton").processors == {"JointAttentionProcessor": 3}
    inputs = {"hidden_states": torch.randn(2, 4, 4, 4), "encoder_hidden_states": torch.randn(2, 7, 32),
              "pooled_projections": torch.randn(2, 16), "timestep": torch.tensor([3, 700])}
    assert_twins_match(stock, ours, on(device, inputs))
    assert kernel_calls.call_count == 3


def test_flux_attention_matches_sdpa(kernel_calls, device):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    stock = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
    ).to(device)
    ours = copy.deepcopy(stock)
    assert install(ours, backend="triton").processors == {"FluxAttentionProcessor": 2}
    inputs = {"hidden_states": torch.randn(2, 16, 4), "encoder_hidden_states": torch.randn(2, 7, 32),
              "pooled_projections": torch.randn(2, 32), "timestep": torch.tensor([0.2, 0.9]),
              "img_ids": torch.randn(16, 3), "txt_ids": torch.zeros(7, 3)}
    assert_twins_match(stock, ours, on(device, inputs))
    assert kernel_calls.call_count == 2


def tiny_qwen2_vl():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig(
        text_config={
            "vocab_size": 96, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "bos_token_id": 1, "eos_token_id": 2,
            "pad_token_id": 0, "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3]},
        },
        # head dim 80, as in the real Qwen2-VL vision tower
        vision_config={"depth": 2, "embed_dim": 160, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2},
        image_token_id=90, video_token_id=91, vision_start_token_id=92, vision_end_token_id=93,
    )
    torch.manual_seed(0)
    return Qwen2VLForConditionalGeneration(config).eval()


def test_qwen2_vl_matches_sdpa(kernel_calls, device):
    stock = tiny_qwen2_vl().to(device)
    ours = copy.deepcopy(stock)
    report = install(ours, backend="triton")
    assert report.attn_implementation == "mmalign_triton" and report.installed == 1
    assert ours.config.vision_config._attn_implementation == "mmalign_triton"
    assert ours.config.text_config._attn_implementation == "mmalign_triton"
    input_ids = torch.tensor([[5, 6, 92] + [90] * 6 + [93, 7, 8, 9, 10, 11]])
    inputs = {"input_ids": input_ids, "mm_token_type_ids": (input_ids == 90).long(),
              "pixel_values": torch.randn(24, 3 * 2 * 14 * 14), "image_grid_thw": torch.tensor([[1, 4, 6]])}
    assert_twins_match(stock, ours, on(device, inputs), output=lambda o: o.logits)
    assert kernel_calls.call_count == 4  # 2 vision blocks (bidirectional) + 2 text layers (causal, GQA)


def test_qwen2_vl_padding_mask_falls_back(kernel_calls, device):
    stock = tiny_qwen2_vl().to(device)
    ours = copy.deepcopy(stock)
    install(ours, backend="triton")
    input_ids = torch.tensor([[0, 0, 0, 5, 6, 7, 8, 9], [3, 4, 5, 6, 7, 8, 9, 10]], device=device)
    attention_mask = (input_ids != 0).long()
    with torch.no_grad():
        expected = stock(input_ids=input_ids, attention_mask=attention_mask).logits
        got = ours(input_ids=input_ids, attention_mask=attention_mask).logits
    assert kernel_calls.call_count == 0
    torch.testing.assert_close(got, expected, **TOLERANCE)


def test_pipeline_installs_into_denoiser_only():
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4)
    vae_processors = set(map(type, vae.attn_processors.values()))
    pipeline = SimpleNamespace(components={"unet": tiny_unet(), "vae": vae, "tokenizer": None})
    report = install(pipeline, backend="sdpa")
    assert report.processors == {"AttentionProcessor": 8}
    assert set(map(type, vae.attn_processors.values())) == vae_processors
    install(pipeline, backend="auto")  # reinstalling switches the backend
    assert {p.backend for p in pipeline.components["unet"].attn_processors.values()} == {"auto"}


def test_install_rejects_bad_arguments():
    with pytest.raises(ValueError, match="backend must be one of"):
        install(tiny_unet(), backend="cuda")
    with pytest.raises(TypeError, match="model_or_pipeline must be a diffusers pipeline.*got Linear"):
        install(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="has no unet/transformer component"):
        install(SimpleNamespace(components={"vae": None}))
