"""The part of TRL that ``VLMGRPOTrainer`` builds on still has the shape it expects.

The trainer overrides private ``GRPOTrainer`` methods, and TRL changes those between minor releases (1.14's
``_get_per_token_logps_and_entropies(self, model, *args, batch_size=None, ...)`` became positional again in
1.15). A changed signature would otherwise show up as a wrong call deep inside a training step, or, for a
method TRL renamed or dropped, as an override that is silently never called. Run this when raising the
``trl`` range in pyproject.toml.
"""

import inspect

import pytest
from tiny_models import make_tiny_vlm
from trl import GRPOConfig, GRPOTrainer

from mmalign.trainers.vlm_grpo.trainer import VLMGRPOTrainer

#: GRPOTrainer methods VLMGRPOTrainer overrides; each calls TRL's own through ``super()`` with its arguments.
OVERRIDES = {
    "_generate_and_score_completions", "_generate", "_calculate_rewards", "_tokenize_prompts", "_compute_loss",
    "_get_per_token_logps_and_entropies", "_load_from_checkpoint",
}
#: methods of VLMGRPOTrainer's own, which must not shadow a TRL method of the same name.
OWN = {"_reference", "_prepare_reference", "_check_dynamic_sampling", "_prepared_prompts", "_refill_rows",
       "_dynamic_sample"}
#: the positional parameters ``__init__`` passes on, in TRL's order, and the keywords it passes or reads.
INIT_POSITIONAL = ["model", "reward_funcs", "args", "train_dataset", "eval_dataset", "processing_class",
                   "reward_processing_classes", "callbacks", "optimizers"]
INIT_KEYWORDS = {"peft_config", "tools", "rollout_func", "environment_factory"}
#: GRPOConfig fields the trainer and the recipe read.
CONFIG_FIELDS = {"beta", "sync_ref_model", "cast_lm_head_to_fp32", "disable_dropout", "model_init_kwargs",
                 "per_device_train_batch_size", "steps_per_generation", "num_generations", "seed",
                 "multi_objective_aggregation", "reward_weights", "chat_template_kwargs"}
#: trainer attributes the overrides read after ``GRPOTrainer.__init__``.
ATTRIBUTES = {"num_generations", "reward_funcs", "reward_weights", "multi_objective_aggregation", "beta",
              "ref_model", "temperature", "tools", "environment_factories", "chat_template_kwargs",
              "_video_pad_token_id", "_metrics", "_logs", "is_deepspeed_enabled", "is_fsdp_enabled"}


def _parameters(function) -> list[inspect.Parameter]:
    return list(inspect.signature(function).parameters.values())[1:]  # without self


def test_every_method_of_the_subclass_is_an_override_or_its_own():
    defined = {name for name, value in vars(VLMGRPOTrainer).items() if inspect.isfunction(value) or
               isinstance(value, staticmethod)} - {"__init__"}
    assert defined == OVERRIDES | OWN, "list a new method of VLMGRPOTrainer in OVERRIDES or OWN"
    assert not [name for name in OWN if hasattr(GRPOTrainer, name)], "TRL now has a method of this name"


@pytest.mark.parametrize("name", sorted(OVERRIDES))
def test_an_override_takes_the_parameters_of_trls_method(name):
    assert hasattr(GRPOTrainer, name), f"GRPOTrainer.{name} is gone: VLMGRPOTrainer's override is never called"
    ours, theirs = _parameters(getattr(VLMGRPOTrainer, name)), _parameters(getattr(GRPOTrainer, name))
    named = [p for p in ours if p.kind is p.POSITIONAL_OR_KEYWORD]
    # positional in the same order, with the same defaults, so ``super().name(...)`` passes each where it belongs
    assert [(p.name, p.kind, p.default) for p in theirs[: len(named)]] == [(p.name, p.kind, p.default) for p in named]
    rest = theirs[len(named):]
    if any(p.kind is p.VAR_KEYWORD for p in ours):  # forwarded as keywords
        assert all(p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is not p.empty for p in rest), rest
    else:
        assert not rest, f"GRPOTrainer.{name} now takes {[p.name for p in rest]}, which the override drops"


def test_init_passes_its_arguments_where_trl_expects_them():
    theirs = _parameters(GRPOTrainer.__init__)
    assert [p.name for p in theirs[: len(INIT_POSITIONAL)]] == INIT_POSITIONAL
    names = {p.name for p in theirs}
    assert not INIT_KEYWORDS - names, f"GRPOTrainer.__init__ no longer takes {INIT_KEYWORDS - names}"
    ours = {p.name for p in _parameters(VLMGRPOTrainer.__init__) if p.kind is p.POSITIONAL_OR_KEYWORD}
    assert not ours - {"ref_model", "dynamic_sampling_rounds"} - names


def test_the_helpers_mmalign_calls_take_its_arguments():
    from trl.data_utils import prepare_multimodal_messages
    from trl.models import prepare_deepspeed, prepare_fsdp
    from trl.trainer.callbacks import SyncRefModelCallback
    from trl.trainer.utils import (
        add_fused_lm_head,
        create_model_from_path,
        disable_dropout_in_model,
        get_config_model_id,
    )

    model, accelerator = object(), object()
    calls = [
        (prepare_multimodal_messages, ([],), {"images": []}),
        (prepare_deepspeed, (model, accelerator), {}),
        (prepare_fsdp, (model, accelerator), {}),
        (SyncRefModelCallback, (), {"ref_model": model, "accelerator": accelerator}),
        (add_fused_lm_head, (model,), {"temperature": 1.0}),
        (create_model_from_path, ("id",), {"dtype": "float32"}),
        (disable_dropout_in_model, (model,), {}),
        (get_config_model_id, (object(),), {}),
    ]
    for function, args, kwargs in calls:
        inspect.signature(function).bind(*args, **kwargs)  # a TypeError names the call that no longer fits


def test_the_config_and_the_trainer_have_the_fields_mmalign_reads(tmp_path):
    from datasets import Dataset

    from mmalign.trainers.vlm_grpo.rewards import reward_functions
    from mmalign.world.vqa import world_vqa_rows

    assert not CONFIG_FIELDS - set(GRPOConfig.__dataclass_fields__)
    model, processor = make_tiny_vlm(seed=0)
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, num_generations=2, max_steps=1,
                      report_to="none", use_cpu=True, bf16=False, beta=0.1)
    trainer = VLMGRPOTrainer(model, reward_functions(["world_accuracy"])[0], args, processing_class=processor,
                             train_dataset=Dataset.from_list(world_vqa_rows(2)))
    assert not [name for name in ATTRIBUTES if not hasattr(trainer, name)]
