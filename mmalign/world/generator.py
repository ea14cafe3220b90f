"""The world's text-to-image generator: a tiny Stable-Diffusion-format pipeline trained from scratch.

Second edition. Three stages, each from a fixed seed: a VAE (32 px images to 16×16×12 latents, enough to hold a
render: reconstructions of clean renders pass ≥ 0.97 of gold's checks) trained on renders; then a CLIP text
encoder and a UNet trained together with the epsilon-prediction DDPM loss on train-split scenes until they draw
clean objects, captions dropped 10% of the time so that classifier-free guidance works; then the parts are saved
with ``StableDiffusionPipeline.save_pretrained`` so diffusers loads the folder with no mmalign code. What is
left for alignment is what real text-to-image models get wrong: binding, counting, position and held-out
(colour, shape) pairs, not noise.

Each stage checkpoints into a work folder every ``checkpoint_every`` steps (atomically), so an interrupted
build resumes where it stopped and ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mmalign.world.captions import prompt_set, vocabulary
from mmalign.world.render import render_batch
from mmalign.world.tokenizer import load_tokenizer, save_tokenizer

__all__ = [
    "IMAGE_SIZE",
    "MAX_TOKENS",
    "GeneratorRecipe",
    "world_pairs",
    "make_scheduler",
    "train_vae",
    "train_denoiser",
    "save_pipeline",
    "build_generator",
]

IMAGE_SIZE = 32
#: Longest tokenized prompt (BOS + words + EOS); grammar captions have at most 15 words.
MAX_TOKENS = 20
INITIAL_LOGVAR = -8.0


@dataclass
class GeneratorRecipe:
    """Training settings of the generator; the defaults build the shipped model."""

    seed: int = 0
    scenes: int = 65536  # train-split scenes rendered once with jitter, shared by both stages
    latent_channels: int = 12
    vae_steps: int = 2000
    vae_batch: int = 32
    vae_lr: float = 2e-3
    kl_weight: float = 1e-6
    unet_steps: int = 8000
    unet_batch: int = 64
    unet_lr: float = 1e-3
    warmup: int = 100
    caption_dropout: float = 0.1  # empty prompt, for classifier-free guidance
    ema_decay: float = 0.999
    checkpoint_every: int = 250  # steps between resumable checkpoints of a stage

    def __post_init__(self) -> None:
        for name in ("scenes", "latent_channels", "vae_steps", "vae_batch", "unet_steps", "unet_batch",
                     "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive int, got {getattr(self, name)!r}")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption_dropout: expected a fraction in [0, 1), got {self.caption_dropout!r}")


def world_pairs(n: int, split: str = "train", seed: int = 0, jitter: float = 1.0):
    """``(images (n, 3, 32, 32) in [0, 1], captions, scenes)`` of one split, rendered with jitter."""
    prompts = prompt_set(split, n, seed)
    scenes = [p.scene for p in prompts]
    return render_batch(scenes, IMAGE_SIZE, jitter, seed), [p.text for p in prompts], scenes


def make_scheduler():
    """SD's noise schedule with DDIM sampling (the pipeline's scheduler; DDPM/Euler load from its config)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def _vae(latent_channels: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        mid_block_add_attention=False,
    )


def _text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=64,
    )
    return CLIPTextModel(config)


def _unet(latent_channels: int, cross_attention_dim: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,  # diffusers reads this as the number of heads
        norm_num_groups=16,
    )


def _lr_lambda(warmup: int, total: int):
    def scale(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return scale


class _Resumable:
    """One stage's training state in ``path``, rewritten atomically every ``every`` steps.

    ``objects`` maps names to what must come back for the resumed run to match an uninterrupted one: modules,
    optimisers and schedulers (their state dicts), generators (their states) and dicts of tensors (EMA weights).
    With ``path`` None nothing is saved.
    """

    def __init__(self, path: Path | None, every: int, objects: dict) -> None:
        self.path, self.every, self.objects = path, every, objects

    def load(self) -> int:
        """Restore the saved state, if any; returns the step to continue from."""
        if self.path is None or not self.path.is_file():
            return 0
        state = torch.load(self.path, weights_only=True)
        for name, obj in self.objects.items():
            if isinstance(obj, torch.Generator):
                obj.set_state(state[name])
            elif isinstance(obj, dict):
                for key, value in state[name].items():
                    obj[key].copy_(value)
            else:
                obj.load_state_dict(state[name])
        return int(state["step"])

    def maybe_save(self, step: int, total: int) -> None:
        """Save after ``step`` steps when it is a checkpoint step (the last one is saved by the stage itself)."""
        if self.path is None or step % self.every or step >= total:
            return
        state: dict = {"step": step}
        for name, obj in self.objects.items():
            state[name] = obj.get_state() if isinstance(obj, torch.Generator) else (
                obj if isinstance(obj, dict) else obj.state_dict())
        tmp = self.path.with_name(self.path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)


def _train(desc: str, total: int, step_fn, state: _Resumable, progress: bool) -> None:
    """Run ``step_fn`` (one optimiser step, returns the loss) from the saved step to ``total``."""
    start = state.load()
    if start and progress:
        print(f"{desc}: resuming at step {start} of {total} from {state.path}")
    bar = tqdm(range(start, total), desc=desc, initial=start, total=total, disable=not progress)
    for step in bar:
        bar.set_postfix(loss=f"{step_fn():.4f}")
        state.maybe_save(step + 1, total)


def train_vae(images: torch.Tensor, recipe: GeneratorRecipe, progress: bool = True, checkpoint: Path | None = None):
    """An ``AutoencoderKL`` trained with L1 + a small KL on ``images`` ``(N, 3, 32, 32)`` in [0, 1].

    Its ``scaling_factor`` is set to 1 / std of the latents, as diffusers' pipelines expect. ``checkpoint``, a
    file, holds the resumable state while it trains.
    """
    torch.manual_seed(recipe.seed)
    vae = _vae(recipe.latent_channels).train()
    with torch.no_grad():  # start with a narrow posterior: the decoder then need not learn to denoise
        vae.quant_conv.bias[vae.config.latent_channels :] = INITIAL_LOGVAR
    data = images * 2 - 1
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(min(50, recipe.vae_steps), recipe.vae_steps))
    gen = torch.Generator().manual_seed(recipe.seed)

    def step() -> float:
        x = data[torch.randint(len(data), (recipe.vae_batch,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(gen)).sample
        loss = F.l1_loss(recon, x) + recipe.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        return loss.item()

    state = _Resumable(checkpoint, recipe.checkpoint_every, {"vae": vae, "opt": opt, "sched": sched, "gen": gen})
    _train("vae", recipe.vae_steps, step, state, progress)
    vae.eval().requires_grad_(False)
    latents = _encode(vae, images[:2048], sample=True, gen=gen)
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return vae


@torch.no_grad()
def _encode(vae, images: torch.Tensor, sample: bool, gen: torch.Generator | None = None, chunk: int = 256):
    """Unscaled latents (posterior mean, or one sample) of ``images`` in [0, 1]."""
    out = []
    for start in range(0, len(images), chunk):
        dist = vae.encode(images[start : start + chunk] * 2 - 1).latent_dist
        out.append(dist.sample(gen) if sample else dist.mean)
    return torch.cat(out)


def train_denoiser(vae, tokenizer, images: torch.Tensor, captions: list[str], recipe: GeneratorRecipe,
                   progress: bool = True, checkpoint: Path | None = None):
    """A text encoder and a UNet trained jointly from scratch on ``(images, captions)``; returns both.

    Latents are encoded once (posterior mean and std), then sampled per step. The returned UNet holds the
    exponential moving average of the trained weights. ``checkpoint``, a file, holds the resumable state.
    """
    torch.manual_seed(recipe.seed + 1)
    text_encoder = _text_encoder(tokenizer).train()
    unet = _unet(recipe.latent_channels, text_encoder.config.hidden_size).train()
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    scheduler = make_scheduler()
    with torch.no_grad():
        mean, std = [], []
        for start in range(0, len(images), 256):
            dist = vae.encode(images[start : start + 256] * 2 - 1).latent_dist
            mean.append(dist.mean)
            std.append(dist.std)
        mean, std = torch.cat(mean), torch.cat(std)
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                      return_tensors="pt").input_ids
    params = [*unet.parameters(), *text_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=recipe.unet_lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(recipe.warmup, recipe.unet_steps))
    gen = torch.Generator().manual_seed(recipe.seed + 1)
    scale = vae.config.scaling_factor

    def step() -> float:
        idx = torch.randint(len(images), (recipe.unet_batch,), generator=gen)
        latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scale
        drop = torch.rand(len(idx), generator=gen) < recipe.caption_dropout
        tokens = torch.where(drop[:, None], empty, ids[idx])
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(scheduler.config.num_train_timesteps, (len(idx),), generator=gen)
        noisy = scheduler.add_noise(latents, noise, t)
        context = text_encoder(tokens).last_hidden_state
        loss = F.mse_loss(unet(noisy, t, encoder_hidden_states=context).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for k, v in unet.state_dict().items():
                ema[k].lerp_(v, 1 - recipe.ema_decay) if v.is_floating_point() else ema[k].copy_(v)
        return loss.item()

    objects = {"unet": unet, "text_encoder": text_encoder, "ema": ema, "opt": opt, "sched": sched, "gen": gen}
    _train("unet", recipe.unet_steps, step, _Resumable(checkpoint, recipe.checkpoint_every, objects), progress)
    unet.load_state_dict(ema)
    return text_encoder.eval().requires_grad_(False), unet.eval().requires_grad_(False)


def save_pipeline(folder: str | Path, vae, text_encoder, tokenizer, unet) -> Path:
    """Save the parts as a ``StableDiffusionPipeline`` folder (safetensors, no safety checker).

    The UNet's weights, two thirds of the bytes, are stored in half precision, which keeps the world's shipped
    models within their 15 MB; diffusers loads them back as fp32 (the reported figures are of the stored weights).
    """
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file, save_file

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=make_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    weights = Path(folder) / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({k: v.half() for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
    return Path(folder)


def work_folder(work: str | Path | None, recipe, what: str, progress: bool) -> Path | None:
    """``work`` ready to resume a build of ``recipe`` (a dataclass): kept when it holds this recipe's checkpoints,
    cleared when another recipe's (a checkpoint of other settings must not be resumed); None stays None."""
    if work is None:
        return None
    work = Path(work)
    signature = json.dumps(asdict(recipe), sort_keys=True)
    if (work / "recipe.json").is_file() and (work / "recipe.json").read_text() != signature:
        if progress:
            print(f"{work}: left by another recipe; starting {what} afresh")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "recipe.json").write_text(signature)
    return work


def build_generator(folder: str | Path, recipe: GeneratorRecipe | None = None, progress: bool = True,
                    work: str | Path | None = None) -> Path:
    """Train every part from the fixed seeds and save the pipeline into ``folder``.

    ``work`` (a folder) keeps each stage's resumable checkpoint and the finished VAE, so a build killed at any
    point continues from there when called again with the same recipe; it is removed once the pipeline is saved.
    A work folder left by another recipe is cleared rather than resumed.
    """
    recipe = recipe or GeneratorRecipe()
    folder = Path(folder)
    work = work_folder(work, recipe, "the generator", progress)
    save_tokenizer(folder / "tokenizer", vocabulary(), MAX_TOKENS)
    tokenizer = load_tokenizer(folder / "tokenizer")
    images, captions, _ = world_pairs(recipe.scenes, "train", recipe.seed)
    vae = _finished_vae(images, recipe, progress, work)
    text_encoder, unet = train_denoiser(vae, tokenizer, images, captions, recipe, progress,
                                        work / "unet.pt" if work is not None else None)
    save_pipeline(folder, vae, text_encoder, tokenizer, unet)
    if work is not None:
        shutil.rmtree(work)
    return folder


def _finished_vae(images: torch.Tensor, recipe: GeneratorRecipe, progress: bool, work: Path | None):
    """The VAE of this recipe: loaded from ``work`` when an earlier, interrupted build finished it."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    if work is not None and (work / "vae" / "config.json").is_file():
        # rebuilt rather than from_pretrained, which would write the work folder's path into the shipped config
        vae = _vae(recipe.latent_channels)
        vae.load_state_dict(load_file(work / "vae" / "diffusion_pytorch_model.safetensors"))
        vae.register_to_config(scaling_factor=AutoencoderKL.load_config(str(work / "vae"))["scaling_factor"])
        return vae.eval().requires_grad_(False)
    vae = train_vae(images, recipe, progress, work / "vae.pt" if work is not None else None)
    if work is not None:
        vae.save_pretrained(str(work / ".vae.tmp"))
        os.replace(work / ".vae.tmp", work / "vae")
    return vae
