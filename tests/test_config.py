from typing import Literal

import pytest
import yaml
from pydantic import Field

from mmalign.config import (
    Recipe,
    RecipeError,
    StrictModel,
    apply_overrides,
    find_recipe,
    list_recipes,
    load_recipe,
    parse_overrides,
    recipes_dir,
    validate_recipe,
)


class Optim(StrictModel):
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)


class Member(StrictModel):
    name: str
    weight: float = 1.0


class ToyRecipe(Recipe):
    task: Literal["toy"] = "toy"
    steps: int = Field(10, ge=1)
    optim: Optim = Optim()
    members: list[Member] = []


def test_every_shipped_recipe_validates():
    """Every YAML with a task under configs/, recursively, loads against its schema."""
    paths = [p for p in recipes_dir().rglob("*.yaml") if "task" in (yaml.safe_load(p.read_text()) or {})]
    assert paths, f"no recipes found under {recipes_dir()}"
    for path in paths:
        recipe = load_recipe(path)
        assert recipe.description, f"{path.name} has no description"
        assert path.read_text().startswith("# mmalign "), f"{path.name} must start with the command that runs it"
    assert set(list_recipes()) == {p.stem for p in paths}


def test_overrides_parse_and_merge():
    assert parse_overrides(["a.b=1", "a.c=[x, y]", "d=true", "e="]) == {"a": {"b": 1, "c": ["x", "y"]}, "d": True, "e": ""}
    data = {"a": {"b": 0, "keep": 1}, "members": [{"name": "x"}, {"name": "y"}]}
    merged = apply_overrides(data, parse_overrides(["a.b=2", "members.1.weight=0.5"]))
    assert merged == {"a": {"b": 2, "keep": 1}, "members": [{"name": "x"}, {"name": "y", "weight": 0.5}]}
    assert data["a"]["b"] == 0  # the input is not modified
    with pytest.raises(RecipeError, match="override: expected key=value"):
        parse_overrides(["steps"])
    with pytest.raises(RecipeError, match="index '5' is not valid for a list of 2"):
        apply_overrides(data, {"members": {"5": {"weight": 1}}})


def test_unknown_keys_suggest_nearest_and_all_errors_reported(tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text("task: toy\nstepz: 3\noptim: {lrr: 0.1}\nmembers: [{name: a, wieght: 2}]\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path, ["steps=0"], schema=ToyRecipe)
    message = str(err.value)
    assert "4 problem(s)" in message
    assert "stepz: unknown key; did you mean 'steps'?" in message
    assert "optim.lrr: unknown key; did you mean 'lr'?" in message
    assert "members.0.wieght: unknown key; did you mean 'weight'?" in message
    assert "steps: Input should be greater than or equal to 1 (got 0)" in message


def test_load_with_overrides_and_recipe_dir(tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text("task: toy\ndescription: ${recipe_dir}/data\nmembers: [{name: a}]\n")
    recipe = load_recipe(path, ["optim.lr=0.5", "members.0.weight=3"], schema=ToyRecipe)
    assert recipe.optim.lr == 0.5 and recipe.members[0].weight == 3.0
    assert recipe.description == f"{tmp_path.resolve()}/data"
    with pytest.raises(Exception, match="validation error"):
        recipe.steps = 0  # assignments are validated too


def test_bad_recipe_files_and_names(tmp_path):
    with pytest.raises(RecipeError, match="did you mean 'score-example'"):
        find_recipe("score-exampel")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(RecipeError, match="expected a mapping"):
        load_recipe(bad)
    bad.write_text("task: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match=r"task: expected one of .*, got 'scor' \(did you mean 'score'\?\)"):
        validate_recipe({"task": "scor"})


def test_score_recipe_rules():
    with pytest.raises(RecipeError, match="expected a .csv or .json file"):
        validate_recipe({"task": "score", "images": "x", "rewards": ["clip"], "out": "x.txt"})
    with pytest.raises(RecipeError, match="rewards: List should have at least 1 item"):
        validate_recipe({"task": "score", "images": "x", "rewards": []})
