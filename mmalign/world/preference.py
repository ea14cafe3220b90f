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
from mmalign.seeds import derived_seed
from mmalign.world.assets import generate, load_pipeline, load_proxy
from mmalign.world.captions import prompt_set
from mmalign.world.proxy import clip_step, paired_cosines, proxy_scores
from mmalign.world.verify import verify_batch

#: the two data sets of the preference ensembles: the gold labels, and the same with a quarter of them flipped
ENSEMBLE_LABELS: dict[str, float] = {"clean": 0.0, "noisy": 0.25}
_FLIP_STREAM = 1  # derived_seed(seed, _FLIP_STREAM): the label flips, apart from the seed's other draws

__all__ = ["Comparisons", "PreferenceRecipe", "sample_comparisons", "label_flips", "train_preference",
           "compare_on_heldout", "build_preference", "build_preference_ensemble", "ENSEMBLE_LABELS"]


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
    train_seed: int | None = None  # seed of the fine-tuning's batches (None: ``seed``); the data stay ``seed``'s
    label_noise: float = 0.0  # fraction of comparisons whose label is flipped, drawn once from ``seed``

    def __post_init__(self) -> None:
        for name in ("prompts", "steps", "prompts_per_step"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive int, got {getattr(self, name)!r}")
        if self.samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt: expected at least 2 to compare, got {self.samples_per_prompt!r}")
        if not 0 <= self.label_noise < 1:
            raise ValueError(f"label_noise: expected a fraction in [0, 1), got {self.label_noise!r}")


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


def label_flips(data: Comparisons, recipe: PreferenceRecipe) -> torch.Tensor | None:
    """Which same-prompt pairs (``(prompts, k(k−1)/2)``, ``triu_indices`` order) have their label flipped:
    each with probability ``label_noise``, drawn from ``seed`` alone, so every member trained on one noisy data
    set sees the same wrong labels (as Coste et al.'s ensembles do). None without label noise."""
    if not recipe.label_noise:
        return None
    k = data.samples_per_prompt
    gen = torch.Generator().manual_seed(derived_seed(recipe.seed, _FLIP_STREAM))
    return torch.rand(data.num_prompts, k * (k - 1) // 2, generator=gen) < recipe.label_noise


def train_preference(model, tokenizer, data: Comparisons, recipe: PreferenceRecipe, progress: bool = True):
    """Fine-tune an OpenCLIP ``model`` in place on ``data`` with the Bradley–Terry loss on ``logit_scale·cos``
    (``recipe.label_noise`` of the pairs with their label flipped, ``label_flips``)."""
    seed = recipe.seed if recipe.train_seed is None else recipe.train_seed
    torch.manual_seed(seed)
    model.train().requires_grad_(True)
    ids = tokenizer(data.texts)
    k = data.samples_per_prompt
    flips = label_flips(data, recipe)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, recipe.lr, total_steps=recipe.steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(range(recipe.steps), desc="preference", disable=not progress)
    for _ in bar:
        groups = torch.randint(data.num_prompts, (recipe.prompts_per_step,), generator=gen)
        index = (groups[:, None] * k + torch.arange(k)).flatten()
        scores = model.logit_scale.exp() * paired_cosines(model, data.images[index], ids[index]).view(-1, k)
        loss = bradley_terry_loss(scores, data.gold[index].view(-1, k), None if flips is None else flips[groups])
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
    from mmalign.world.assets import proxy_path

    recipe = recipe or PreferenceRecipe()
    start = time.perf_counter()
    pipe = load_pipeline(path=None if pipeline_dir is None else str(pipeline_dir))
    data = sample_comparisons(pipe, recipe, progress=progress)
    source = Path(proxy_dir or proxy_path())
    model, _, tokenizer = load_proxy(path=str(source))
    train_preference(model, tokenizer, data, recipe, progress)
    folder = Path(folder)
    _save_fine_tuned(model, source, folder)
    report: dict = {"recipe": asdict(recipe), "comparisons": len(data.texts),
                    "gold_mean_of_comparisons": round(float(data.gold.mean()), 4),
                    "train_seconds": round(time.perf_counter() - start, 1)}
    if evaluate_prompts:
        report["heldout"] = compare_on_heldout({"proxy": source, "preference": folder}, pipe, recipe, evaluate_prompts,
                                               progress=progress)
    (folder / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _save_fine_tuned(model, source: Path, folder: Path) -> None:
    """``model`` in ``source``'s OpenCLIP ``local-dir:`` layout (its config and tokenizer) at ``folder``."""
    from safetensors.torch import save_file

    shutil.copytree(source, folder, dirs_exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
              str(folder / "open_clip_model.safetensors"))


def build_preference_ensemble(folder: str | Path, recipe: PreferenceRecipe | None = None, members: int = 3,
                              pipeline_dir: str | Path | None = None, proxy_dir: str | Path | None = None,
                              progress: bool = True) -> dict:
    """Reward-model ensembles as Coste et al. train them: ``members`` preference proxies fine-tuned on the same
    comparisons (the shipped preference proxy's, ``recipe``) from training seeds ``seed``, ``seed + 1``, …, once
    on the gold labels (``clean-0`` … : ``clean-0`` is the shipped recipe itself) and once with a quarter of the
    labels flipped (``noisy-0`` …; ``ENSEMBLE_LABELS``). Each member is saved in the proxy's layout under
    ``folder``; ``build_report.json`` gives the flipped share, seconds per member and sizes. Returns the report."""
    from mmalign.world.assets import proxy_path

    if not isinstance(members, int) or members < 1:
        raise ValueError(f"members: expected a positive int, got {members!r}")
    recipe = recipe or PreferenceRecipe()
    start = time.perf_counter()
    pipe = load_pipeline(path=None if pipeline_dir is None else str(pipeline_dir))
    data = sample_comparisons(pipe, recipe, progress=progress)
    source, folder = Path(proxy_dir or proxy_path()), Path(folder)
    report: dict = {"recipe": asdict(recipe), "members": members, "comparisons": len(data.texts),
                    "sampling_seconds": round(time.perf_counter() - start, 1), "member_seconds": {}, "labels": {}}
    k = data.samples_per_prompt
    i, j = torch.triu_indices(k, k, 1)
    decided = data.gold.view(-1, k)[:, i] != data.gold.view(-1, k)[:, j]
    for labels, noise in ENSEMBLE_LABELS.items():
        member_recipe = replace(recipe, label_noise=noise)
        flips = label_flips(data, member_recipe)
        report["labels"][labels] = {"label_noise": noise, "decided_pairs": int(decided.sum()),
                                    "flipped_pairs": 0 if flips is None else int(flips[decided].sum())}
        for m in range(members):
            member_start = time.perf_counter()
            model, _, tokenizer = load_proxy(path=str(source))
            train_preference(model, tokenizer, data, replace(member_recipe, train_seed=recipe.seed + m), progress)
            _save_fine_tuned(model, source, folder / f"{labels}-{m}")
            report["member_seconds"][f"{labels}-{m}"] = round(time.perf_counter() - member_start, 1)
    report["seconds"] = round(time.perf_counter() - start, 1)
    report["size_bytes"] = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    (folder / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
