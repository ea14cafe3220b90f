"""Typed recipes: YAML files validated by pydantic models, with ``key=value`` overrides.

A recipe names its ``task``; the task picks the schema and, for training tasks, the trainer (``TASKS``, the one
table both are read from). Every problem in a recipe is reported in
one message, and an unknown key comes with the nearest valid name. String values in a recipe file may use
``${recipe_dir}``, the folder of that file, so shipped recipes can point at shipped data wherever the package
is installed.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = [
    "TASKS",
    "Recipe",
    "RecipeError",
    "Task",
    "StrictModel",
    "VideoConfig",
    "apply_overrides",
    "check_device",
    "find_recipe",
    "import_object",
    "int_at_least",
    "list_recipes",
    "load_recipe",
    "validate_recipe",
    "parse_overrides",
    "positive_int",
    "recipes_dir",
]

class Task(NamedTuple):
    """Where a task's recipe schema lives, and its trainer's (None for tasks that do not train)."""

    config: str
    trainer: str | None = None


#: task name → its schema and trainer, as import paths: a module is imported only when its recipe is used.
TASKS: dict[str, Task] = {
    "score": Task("mmalign.eval.scoring:ScoreRecipe"),
    "reno": Task("mmalign.inference.run:ReNORecipe"),
    "overoptimization": Task("mmalign.eval.overoptimization_run:OverOptimizationRecipe"),
    "prdp": Task("mmalign.trainers.prdp:PRDPConfig", "mmalign.trainers.prdp:PRDPTrainer"),
    "backprop": Task("mmalign.trainers.backprop:BackpropConfig", "mmalign.trainers.backprop:BackpropTrainer"),
    "ddpo": Task("mmalign.trainers.ddpo:DDPOConfig", "mmalign.trainers.ddpo:DDPOTrainer"),
    "diffusion_grpo": Task("mmalign.trainers.diffusion_grpo:GRPOConfig", "mmalign.trainers.diffusion_grpo:GRPOTrainer"),
    "d2align": Task("mmalign.trainers.d2align:D2AlignConfig", "mmalign.trainers.d2align:D2AlignTrainer"),
    "diffusion_nft": Task("mmalign.trainers.diffusion_nft:NFTConfig", "mmalign.trainers.diffusion_nft:NFTTrainer"),
    "vlm_grpo": Task("mmalign.trainers.vlm_grpo.recipe:VLMGRPOConfig", "mmalign.trainers.vlm_grpo.recipe:VLMGRPORecipeTrainer"),
}


class RecipeError(ValueError):
    """A recipe that cannot be used; the message lists every problem found."""


class StrictModel(BaseModel):
    """Base of recipe sections: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class VideoConfig(StrictModel):
    """The size of a video pipeline's samples (each null: the pipeline's default) and the noise they start from."""

    num_frames: int | None = Field(None, ge=1, description="frames per video (Wan: 1 + a multiple of 4)")
    height: int | None = Field(None, ge=1, description="frame height in pixels")
    width: int | None = Field(None, ge=1, description="frame width in pixels")
    noise_speed: float | None = Field(
        None, ge=0, description="latent pixels per frame that the initial noise travels along each prompt's "
        "metadata motion.direction (world clip prompts state it); null: independent noise in every frame"
    )

    def options(self) -> dict[str, int | float]:
        """The adapter options that are set."""
        return self.model_dump(exclude_none=True)


class Recipe(StrictModel):
    """Fields every recipe has."""

    task: str
    description: str = ""


def import_object(path: str) -> Any:
    """The object ``"package.module:name"`` names, imported on first use: how generic code reaches the world
    (and other plug-ins) without importing it."""
    module, sep, name = path.partition(":")
    if not sep:
        raise ValueError(f"path: expected 'package.module:name', got {path!r}")
    return getattr(importlib.import_module(module), name)


def check_device(device: Any, name: str = "device") -> Any:
    """``device`` unchanged when torch can place tensors there; else a ``ValueError`` naming ``name``."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name}: expected a torch device such as 'cpu', 'cuda' or 'cuda:0', got {device!r}") from None
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"{name}: expected 'cpu' or one of the {torch.cuda.device_count()} CUDA device(s) of this "
                         f"machine, got {device!r}")
    return device


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type=`` for a count flag: the int ``text`` spells when it is at least ``minimum``, else an
    error argparse reports with the flag's name (``argument --steps: expected an int >= 1, got '0'``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an int >= {minimum}, got {text!r}")
        return value

    return parse


#: the ``type=`` of flags that count something there must be one of at least (steps, prompts, batch sizes)
positive_int = int_at_least(1)


def recipes_dir() -> Path:
    """The shipped recipes: ``configs/`` in a source checkout, ``mmalign/_data/configs`` in a wheel."""
    package = Path(__file__).resolve().parent
    installed = package / "_data" / "configs"
    return installed if installed.is_dir() else package.parent / "configs"


def list_recipes() -> dict[str, str]:
    """Shipped recipe names (file stems, recursively) with their one-line descriptions."""
    out = {}
    for path in sorted(recipes_dir().rglob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        if isinstance(data, Mapping) and "task" in data:  # accelerate configs etc. live there too
            out[path.stem] = str(data.get("description", "")).strip().splitlines()[0] if data.get("description") else ""
    return out


def find_recipe(name_or_path: str | Path) -> Path:
    """A recipe file from a path or a shipped recipe's name."""
    if not isinstance(name_or_path, (str, Path)):
        raise TypeError(f"recipe: expected a shipped recipe's name or a YAML file, got {type(name_or_path).__name__}")
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    shipped = {p.stem: p for p in recipes_dir().rglob("*.yaml")}
    if str(name_or_path) in shipped:
        return shipped[str(name_or_path)]
    close = difflib.get_close_matches(str(name_or_path), list(list_recipes()), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    raise RecipeError(
        f"recipe: {str(name_or_path)!r} is neither a YAML file nor a shipped recipe{hint} "
        f"(`mmalign recipes` lists them)"
    )


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["a.b=1", "c=[x, y]"]`` → ``{"a": {"b": 1}, "c": ["x", "y"]}``; values are parsed as YAML."""
    if isinstance(items, str):
        raise TypeError(f"overrides: expected a list of 'key=value' strings, got the string {items!r}")
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=") if isinstance(item, str) else ("", "", "")
        parts = key.strip().split(".")
        if not sep or not all(part.strip() for part in parts):
            raise RecipeError(f"override: expected key=value (e.g. batch_size=8), got {item!r}")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override: {key!r} sets inside a key that another override gives a value")
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise RecipeError(f"override {key.strip()}: expected a YAML value, got {raw!r} ({_yaml_problem(err)})") from None
    return out


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error in one line: the problem and where (PyYAML's own text spans several lines)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def apply_overrides(data: Any, overrides: Mapping[str, Any]) -> Any:
    """Merge nested overrides into recipe data; a numeric key indexes a list (``rewards.0.weight=2``)."""
    return _merge(data, overrides, ())


def _merge(data: Any, overrides: Mapping[str, Any], at: tuple[str, ...]) -> Any:
    if not overrides:
        return data
    if isinstance(data, list):
        data = list(data)
        for key, value in overrides.items():
            if not str(key).isdigit() or int(key) >= len(data):
                where = ".".join((*at, str(key)))
                raise RecipeError(f"override {where}: index {key!r} is not valid for a list of {len(data)} items "
                                  f"(give {'.'.join(at)}.0 … {'.'.join(at)}.{len(data) - 1}, or a whole list)")
            index = int(key)
            data[index] = _merge(data[index], value, (*at, str(key))) if isinstance(value, Mapping) else value
        return data
    data = dict(data) if isinstance(data, Mapping) else {}
    for key, value in overrides.items():
        current = data.get(key)
        merge = isinstance(value, Mapping) and current is not None
        data[key] = _merge(current, value, (*at, str(key))) if merge else value
    return data


def load_recipe(
    name_or_path: str | Path, overrides: Iterable[str] | Mapping[str, Any] = (), schema: type[Recipe] | None = None
) -> Recipe:
    """Load, override and validate a recipe; ``schema`` defaults to the one its ``task`` names."""
    path = find_recipe(name_or_path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {path}: not valid YAML: {_yaml_problem(err)}") from None
    if not isinstance(data, Mapping):
        raise RecipeError(f"recipe {path}: expected a mapping at the top level, got {type(data).__name__}")
    data = _substitute(data, "${recipe_dir}", str(path.resolve().parent))
    overrides = overrides if isinstance(overrides, Mapping) else parse_overrides(overrides)
    return validate_recipe(apply_overrides(data, overrides), schema, source=str(path))


def validate_recipe(data: Mapping[str, Any], schema: type[Recipe] | None = None, source: str = "recipe") -> Recipe:
    """Validate recipe data against ``schema`` (or the schema of its ``task``), reporting every error."""
    if schema is None:
        task = data.get("task")
        if task not in TASKS:
            close = difflib.get_close_matches(str(task), list(TASKS), n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RecipeError(f"{source}: task: expected one of {sorted(TASKS)}, got {task!r}{hint}")
        schema = import_object(TASKS[task].config)
    try:
        return schema.model_validate(dict(data))
    except ValidationError as err:
        lines = [_describe(schema, e) for e in err.errors()]
        if len(lines) == 1:
            raise RecipeError(f"{source}: {lines[0]}") from None
        raise RecipeError(f"{source}: {len(lines)} problem(s):\n" + "\n".join(f"  - {x}" for x in lines)) from None


def _describe(schema: type[BaseModel], error: Mapping[str, Any]) -> str:
    loc = [str(p) for p in error["loc"]]
    where = ".".join(loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        valid = _field_names_at(schema, error["loc"][:-1])
        close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(valid)}"
        return f"{where}: unknown key; {hint}"
    if error["type"] == "value_error":  # a validator's own message, which says what came (and may name the field)
        message = str(error["ctx"]["error"])
        return f"{where}: {message.removeprefix(f'{loc[-1]}: ') if loc else message}"
    return f"{where}: {error['msg']} (got {error.get('input')!r})"


def _field_names_at(schema: Any, loc: tuple) -> list[str]:
    """Field names of the model found by walking ``loc`` from ``schema`` (list indices are skipped)."""
    for part in loc:
        if isinstance(part, int):
            continue
        field = schema.model_fields.get(part) if _is_model(schema) else None
        if field is None:
            return []
        schema = _model_in(field.annotation)
    return list(schema.model_fields) if _is_model(schema) else []


def _model_in(annotation: Any) -> Any:
    if _is_model(annotation):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _is_model(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, BaseModel)


def _substitute(data: Any, token: str, value: str) -> Any:
    if isinstance(data, str):
        return data.replace(token, value)
    if isinstance(data, Mapping):
        return {k: _substitute(v, token, value) for k, v in data.items()}
    if isinstance(data, list):
        return [_substitute(v, token, value) for v in data]
    return data
