"""The world's text-to-video generator: AnimateDiff on the shipped image pipeline.

The image pipeline's VAE, UNet and scheduler stay as they are: each frame of a clip is a world render, which the
VAE already encodes and the UNet already draws. What is trained here, on train-split clips of moving shapes
(``mmalign.world.video``) by the same ε-prediction loss, is new:

- a small AnimateDiff ``MotionAdapter`` (temporal attention over the frames at every UNet block), whose output
  projections start at zero so that training starts from the image model drawing each frame alone;
- the embedding rows of the words the image grammar lacks (``moving``, ``up``, ``down``): the video tokenizer
  holds them as single tokens (as bytes, captions would overflow the text encoder's 20 positions), and every
  other row and weight of the text encoder is the image pipeline's, frozen.

The folder it saves holds only these (``motion_adapter/``, ``text_encoder/``, ``tokenizer/``) and names the image
pipeline's components it reuses (``video_pipeline.json``); ``load_video_pipeline`` joins them into a diffusers
``AnimateDiffPipeline``. Training renders fresh jittered clips every step from one seeded generator and checkpoints
through the image generator's ``_Resumable``, so an interrupted build resumes and ends where an uninterrupted one
would.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from mmalign.files import write_text_atomic
from mmalign.world.captions import vocabulary
from mmalign.world.generator import IMAGE_SIZE, MAX_TOKENS, _lr_lambda, _Resumable, _train, work_folder
from mmalign.world.tokenizer import load_tokenizer, save_tokenizer
from mmalign.world.video import DIRECTIONS, render_videos, video_prompt_set

__all__ = [
    "VIDEO_WORDS",
    "POINTER",
    "VideoGeneratorRecipe",
    "video_tokenizer_words",
    "extend_text_encoder",
    "make_motion_adapter",
    "train_motion",
    "save_video_pipeline",
    "assemble_video_pipeline",
    "build_video_generator",
]

#: words of the video captions that the image grammar lacks
VIDEO_WORDS: tuple[str, ...] = ("moving", *DIRECTIONS)
#: the file of a video-pipeline folder that names what it reuses from the image pipeline
POINTER = "video_pipeline.json"
#: components of the image pipeline the video pipeline uses unchanged
REUSED = ("vae", "unet", "scheduler")


@dataclass
class VideoGeneratorRecipe:
    """Training settings of the video generator; the defaults build the shipped one."""

    seed: int = 0
    clips: int = 8192  # train-split clips (scene + motion); rendered afresh with jitter in every step
    frames: int = 8
    steps: int = 2000
    batch: int = 8  # clips per step
    lr: float = 1e-3
    warmup: int = 100
    caption_dropout: float = 0.1  # empty prompt, for classifier-free guidance
    ema_decay: float = 0.995
    motion_layers_per_block: int = 1
    motion_heads: int = 4
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        for name in ("clips", "steps", "batch", "motion_layers_per_block", "motion_heads", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if not isinstance(self.frames, int) or self.frames < 2:
            raise ValueError(f"frames: expected an int of at least 2 (a clip moves), got {self.frames!r}")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption_dropout: expected a fraction in [0, 1), got {self.caption_dropout!r}")
        if not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay: expected a fraction in (0, 1), got {self.ema_decay!r}")


def video_tokenizer_words() -> list[str]:
    """The image grammar's words and the video captions' own, each one token of the video tokenizer."""
    words = vocabulary()
    return words + [w for w in VIDEO_WORDS if w not in words]


def extend_text_encoder(text_encoder, old_tokenizer, new_tokenizer, seed: int = 0):
    """``(text encoder for new_tokenizer, mask of its new rows)``: the image text encoder's weights, its token
    embedding rows copied by token string; rows of tokens it lacked are drawn with the old rows' std."""
    from transformers import CLIPTextModel

    old_vocab, new_vocab = old_tokenizer.get_vocab(), new_tokenizer.get_vocab()
    config = text_encoder.config.to_dict()
    config.update(vocab_size=len(new_vocab), bos_token_id=new_tokenizer.bos_token_id,
                  eos_token_id=new_tokenizer.eos_token_id, pad_token_id=new_tokenizer.pad_token_id)
    model = CLIPTextModel(type(text_encoder.config).from_dict(config))
    state = {k: v for k, v in text_encoder.state_dict().items() if "token_embedding" not in k}
    model.load_state_dict(state, strict=False)
    old_rows = text_encoder.get_input_embeddings().weight.detach()
    rows = torch.randn((len(new_vocab), old_rows.shape[1]), generator=torch.Generator().manual_seed(seed))
    rows *= old_rows.std()
    new = torch.ones(len(new_vocab), dtype=torch.bool)
    for token, i in new_vocab.items():
        if token in old_vocab:
            rows[i], new[i] = old_rows[old_vocab[token]], False
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(rows)
    return model.eval(), new


def make_motion_adapter(unet, recipe: VideoGeneratorRecipe):
    """A ``MotionAdapter`` matching ``unet``'s blocks (its output projections zero, as diffusers initialises)."""
    from diffusers import MotionAdapter

    torch.manual_seed(recipe.seed + 2)
    return MotionAdapter(block_out_channels=tuple(unet.config.block_out_channels),
                         motion_layers_per_block=recipe.motion_layers_per_block,
                         motion_num_attention_heads=recipe.motion_heads,
                         motion_norm_num_groups=unet.config.norm_num_groups,
                         motion_max_seq_length=max(32, recipe.frames))


def train_motion(image_pipe, recipe: VideoGeneratorRecipe, progress: bool = True, checkpoint: Path | None = None,
                 monitor=None, monitor_every: int = 250):
    """Train a motion adapter and the new word embeddings on train clips; returns the ``AnimateDiffPipeline``.

    ``image_pipe`` is the world's ``StableDiffusionPipeline`` (frozen). ``checkpoint``, a file, holds the
    resumable state; ``monitor(step, pipe)`` (optional) is called every ``monitor_every`` steps with the
    pipeline holding the EMA weights, to watch the gold score as it trains.
    """
    from diffusers import AnimateDiffPipeline, UNetMotionModel

    words_dir = Path(checkpoint).parent / "tokenizer" if checkpoint is not None else None
    tokenizer = _video_tokenizer(words_dir)
    text_encoder, new_rows = extend_text_encoder(image_pipe.text_encoder, image_pipe.tokenizer, tokenizer, recipe.seed)
    adapter = make_motion_adapter(image_pipe.unet, recipe)
    unet = UNetMotionModel.from_unet2d(image_pipe.unet, adapter)
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    motion = {n: p for n, p in unet.named_parameters() if "motion_modules" in n}
    embedding = text_encoder.get_input_embeddings().weight
    for p in (*motion.values(), embedding):
        p.requires_grad_(True)
    embedding.register_hook(lambda grad: grad * new_rows[:, None].to(grad))  # only the new words' rows learn
    trained = {**{f"unet.{n}": p for n, p in motion.items()}, "text_encoder.embedding": embedding}
    ema = {k: v.detach().clone() for k, v in trained.items()}
    vae, scheduler = image_pipe.vae, image_pipe.scheduler
    clips = video_prompt_set("train", recipe.clips, recipe.seed)
    ids = tokenizer([c.text for c in clips], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    opt = torch.optim.AdamW([{"params": list(motion.values()), "weight_decay": 1e-2},
                             {"params": [embedding], "weight_decay": 0.0}], lr=recipe.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(recipe.warmup, recipe.steps))
    gen = torch.Generator().manual_seed(recipe.seed + 3)
    scale = vae.config.scaling_factor
    pipe = AnimateDiffPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                               motion_adapter=None, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)

    def step() -> float:
        unet.train()
        idx = torch.randint(len(clips), (recipe.batch,), generator=gen)
        render_seed = int(torch.randint(2**31 - 1, (1,), generator=gen))
        videos = render_videos([clips[i] for i in idx.tolist()], recipe.frames, IMAGE_SIZE, 1.0, render_seed)
        with torch.no_grad():
            dist = vae.encode(videos.flatten(0, 1) * 2 - 1).latent_dist
            latents = dist.sample(gen) * scale  # (B·F, C, h, w)
        latents = latents.unflatten(0, (recipe.batch, recipe.frames)).transpose(1, 2)  # (B, C, F, h, w)
        drop = torch.rand(recipe.batch, generator=gen) < recipe.caption_dropout
        tokens = torch.where(drop[:, None], empty, ids[idx])
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(scheduler.config.num_train_timesteps, (recipe.batch,), generator=gen)
        noisy = scheduler.add_noise(latents, noise, t)
        context = text_encoder(tokens).last_hidden_state.repeat_interleave(recipe.frames, 0)
        loss = F.mse_loss(unet(noisy, t, encoder_hidden_states=context).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*motion.values(), embedding], 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for k, v in trained.items():
                ema[k].lerp_(v, 1 - recipe.ema_decay)
        return loss.item()

    objects = {"unet": unet, "text_encoder": text_encoder, "ema": ema, "opt": opt, "sched": sched, "gen": gen}
    state = _Resumable(checkpoint, recipe.checkpoint_every, objects)
    if monitor is not None:
        save = state.maybe_save

        def maybe_save(done: int, total: int) -> None:  # after each step: checkpoint, then watch
            save(done, total)
            if done % monitor_every == 0 and done < total:
                with _swapped(trained, ema):
                    unet.eval()
                    monitor(done, pipe)

        state.maybe_save = maybe_save
    _train("motion", recipe.steps, step, state, progress)
    with torch.no_grad():
        for k, v in trained.items():
            v.copy_(ema[k])
    unet.eval().requires_grad_(False)
    text_encoder.requires_grad_(False)
    return pipe


class _swapped:
    """The EMA weights in the trained tensors for the duration, the live ones back after."""

    def __init__(self, live: dict, ema: dict) -> None:
        self.live, self.ema = live, ema

    def __enter__(self):
        self.saved = {k: v.detach().clone() for k, v in self.live.items()}
        with torch.no_grad():
            for k, v in self.live.items():
                v.copy_(self.ema[k])

    def __exit__(self, *exc) -> None:
        with torch.no_grad():
            for k, v in self.live.items():
                v.copy_(self.saved[k])


def _video_tokenizer(folder: Path | None):
    """The video tokenizer (``video_tokenizer_words``, the image pipeline's length), saved in ``folder``."""
    import tempfile

    if folder is None:
        with tempfile.TemporaryDirectory() as tmp:
            return load_tokenizer(save_tokenizer(tmp, video_tokenizer_words(), MAX_TOKENS))
    return load_tokenizer(save_tokenizer(folder, video_tokenizer_words(), MAX_TOKENS))


def save_video_pipeline(folder: str | Path, pipe, base: str) -> Path:
    """Save what the video pipeline adds to the image one (motion adapter in half precision, text encoder,
    tokenizer) into ``folder``, with ``video_pipeline.json`` naming the reused components of ``base``."""
    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pipe.unet.save_motion_modules(str(folder / "motion_adapter"))
    weights = folder / "motion_adapter" / "diffusion_pytorch_model.safetensors"
    save_file({k: v.half() for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
    pipe.text_encoder.save_pretrained(str(folder / "text_encoder"))
    pipe.tokenizer.save_pretrained(str(folder / "tokenizer"))
    pointer = {"pipeline_class": "AnimateDiffPipeline", "base": base, "reused": list(REUSED),
               "own": ["motion_adapter", "text_encoder", "tokenizer"]}
    write_text_atomic(folder / POINTER, json.dumps(pointer, indent=2) + "\n")
    return folder


def assemble_video_pipeline(folder: str | Path, base_folder: str | Path, dtype: torch.dtype = torch.float32):
    """The ``AnimateDiffPipeline`` of a saved video folder on the image pipeline in ``base_folder`` (the
    folder's own text encoder, tokenizer and motion adapter; the base's VAE, UNet and scheduler)."""
    from diffusers import AnimateDiffPipeline, MotionAdapter
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    if not (folder / POINTER).is_file():
        raise ValueError(f"folder: expected a world video-pipeline folder ({POINTER}), got {str(folder)!r}")
    adapter = MotionAdapter.from_pretrained(str(folder / "motion_adapter"), dtype=dtype)
    pipe = AnimateDiffPipeline.from_pretrained(
        str(base_folder), motion_adapter=adapter, dtype=dtype,
        text_encoder=CLIPTextModel.from_pretrained(str(folder / "text_encoder"), dtype=dtype),
        tokenizer=CLIPTokenizer.from_pretrained(str(folder / "tokenizer")),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_video_generator(folder: str | Path, image_pipe, base: str, recipe: VideoGeneratorRecipe | None = None,
                          progress: bool = True, work: str | Path | None = None, monitor=None,
                          monitor_every: int = 250) -> Path:
    """Train the video generator on ``image_pipe`` (named ``base`` in the saved pointer) and save it in ``folder``.

    ``work`` (a folder) keeps the resumable checkpoint, so a build killed at any point continues from there with
    the same recipe; a work folder left by another recipe is cleared. It is removed once the folder is saved.
    """
    recipe = recipe or VideoGeneratorRecipe()
    work = work_folder(work, recipe, "the video generator", progress)
    checkpoint = work / "motion.pt" if work is not None else None
    pipe = train_motion(image_pipe, recipe, progress, checkpoint, monitor, monitor_every)
    save_video_pipeline(folder, pipe, base)
    if work is not None:
        shutil.rmtree(work)
    return Path(folder)
