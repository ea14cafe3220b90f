"""The world's preference proxy: the OpenCLIP proxy fine-tuned on comparisons among the generator's samples.

Real preference rewards (PickScore, HPSv2, ImageReward) are CLIP models fine-tuned on people's choices between
generated images of one prompt. This is the world's analogue, with the gold verifier in the people's place: the
shipped generator samples train-split prompts with the PRDP training policy (DDIM η = 1, 10 steps, guidance 5),
gold labels each prompt's samples, and the proxy is fine-tuned with the Bradley–Terry loss on every pair of one
prompt whose gold differs. It sees only the base generator's samples of train prompts, for a short budget, so
it is still a proxy: what a trainer finds off that distribution, on held-out prompts, is measured by gold.

Why it exists: a reward that has seen only clean renders may rank generated images poorly, which caps what any
trainer can gain from it. On the first edition's blurry samples the fine-tuning raised within-prompt agreement
with gold from 0.59 to 0.72; on the second edition, whose samples the proxy already ranks (0.71), it does not
help (0.68): docs/world.md has both tables.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mmalign.rewards.bradley_terry import bradley_terry_loss
from mmalign.world.assets import generate, load_pipeline, load_proxy
from mmalign.world.captions import prompt_set
from mmalign.world.proxy import clip_step, paired_cosines, proxy_scores
from mmalign.world.verify import verify_batch

__all__ = ["Comparisons", "PreferenceRecipe", "sample_comparisons", "train_preference",
           "compare_on_heldout", "build_preference"]


@dataclass
class PreferenceRecipe:
    """Settings of the preference proxy; the defaults build the shipped model."""

    seed: int = 11
    prompts: int = 1024  # train-split prompts
    samples_per_prompt: int = 4
    num_inference_steps: int = 10  # the sampler of the PRDP recipe, so the labels cover what it will see
    eta: float = 1.0
    guidance_scale: float = 5.0
    steps: int = 600
    prompts_per_step: int = 32
    lr: float = 3e-4
    weight_decay: float = 0.1

    def __post_init__(self) -> None:
        for name in ("prompts", "steps", "prompts_per_step"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive int, got {getattr(self, name)!r}")
        if self.samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt: expected at least 2 to compare, got {self.samples_per_prompt!r}")


@dataclass
class Comparisons:
    """``samples_per_prompt`` consecutive samples per prompt: images ``(N, 3, H, W)``, their prompts and gold."""

    images: torch.Tensor
    texts: list[str]
    gold: torch.Tensor
    samples_per_prompt: int

    @property
    def num_prompts(self) -> int:
        return len(self.texts) // self.samples_per_prompt


def sample_comparisons(pipe, recipe: PreferenceRecipe, split: str = "train", batch: int = 128,
                       progress: bool = True) -> Comparisons:
    """The generator's samples of ``recipe.prompts`` prompts of ``split``, labelled by the gold verifier."""
    items = [p for p in prompt_set(split, recipe.prompts, recipe.seed) for _ in range(recipe.samples_per_prompt)]
    texts = [p.text for p in items]
    images = torch.cat([
        generate(pipe, texts[i : i + batch], seed=recipe.seed + i, num_inference_steps=recipe.num_inference_steps,
                 guidance_scale=recipe.guidance_scale, eta=recipe.eta)
        for i in tqdm(range(0, len(texts), batch), desc="preference samples", disable=not progress)
    ])
    gold = torch.tensor([v.score for v in verify_batch(images, [p.scene for p in items])])
    return Comparisons(images, texts, gold, recipe.samples_per_prompt)


def train_preference(model, tokenizer, data: Comparisons, recipe: PreferenceRecipe, progress: bool = True):
    """Fine-tune an OpenCLIP ``model`` in place on ``data`` with the Bradley–Terry loss on ``logit_scale·cos``."""
    torch.manual_seed(recipe.seed)
    model.train().requires_grad_(True)
    ids = tokenizer(data.texts)
    k = data.samples_per_prompt
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, recipe.lr, total_steps=recipe.steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(recipe.seed)
    bar = tqdm(range(recipe.steps), desc="preference", disable=not progress)
    for _ in bar:
        groups = torch.randint(data.num_prompts, (recipe.prompts_per_step,), generator=gen)
        index = (groups[:, None] * k + torch.arange(k)).flatten()
        scores = model.logit_scale.exp() * paired_cosines(model, data.images[index], ids[index]).view(-1, k)
        loss = bradley_terry_loss(scores, data.gold[index].view(-1, k))
        clip_step(model, opt, sched, loss)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval().requires_grad_(False)


def compare_on_heldout(proxy_dirs: dict[str, str | Path], pipe, recipe: PreferenceRecipe, prompts: int = 64,
                       samples_per_prompt: int = 8, seed: int = 2024, progress: bool = True) -> dict:
    """Best-of-k gold and within-prompt agreement of each proxy on held-out prompts, sampled as the recipe
    samples (see ``mmalign.eval.best_of_k``)."""
    from mmalign.eval.best_of_k import best_of_k_table

    heldout = replace(recipe, seed=seed, prompts=prompts, samples_per_prompt=samples_per_prompt)
    data = sample_comparisons(pipe, heldout, split="heldout", progress=progress)
    scores = {}
    for name, folder in proxy_dirs.items():
        model, _, tokenizer = load_proxy(path=str(folder))
        scores[name] = proxy_scores(model, tokenizer, data.images, data.texts).view(prompts, samples_per_prompt)
    return best_of_k_table(scores, data.gold.view(prompts, samples_per_prompt))


def build_preference(folder: str | Path, recipe: PreferenceRecipe | None = None, pipeline_dir: str | Path | None = None,
                     proxy_dir: str | Path | None = None, progress: bool = True, evaluate_prompts: int = 64) -> dict:
    """Sample and label comparisons with the (shipped or given) generator, fine-tune the (shipped or given) proxy
    on them and save it into ``folder`` in the proxy's OpenCLIP ``local-dir:`` layout, with a
    ``build_report.json`` comparing it with the proxy on held-out prompts (``evaluate_prompts``; 0 skips that).
    Returns that report."""
    from safetensors.torch import save_file

    from mmalign.world.assets import proxy_path

    recipe = recipe or PreferenceRecipe()
    start = time.perf_counter()
    pipe = load_pipeline(path=None if pipeline_dir is None else str(pipeline_dir))
    data = sample_comparisons(pipe, recipe, progress=progress)
    source = Path(proxy_dir or proxy_path())
    model, _, tokenizer = load_proxy(path=str(source))
    train_preference(model, tokenizer, data, recipe, progress)
    folder = Path(folder)
    shutil.copytree(source, folder, dirs_exist_ok=True)  # config and tokenizer are the proxy's
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
              str(folder / "open_clip_model.safetensors"))
    report: dict = {"recipe": asdict(recipe), "comparisons": len(data.texts),
                    "gold_mean_of_comparisons": round(float(data.gold.mean()), 4),
                    "train_seconds": round(time.perf_counter() - start, 1)}
    if evaluate_prompts:
        report["heldout"] = compare_on_heldout({"proxy": source, "preference": folder}, pipe, recipe, evaluate_prompts,
                                               progress=progress)
    (folder / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
