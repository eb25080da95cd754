"""Every recipe shipped in recipes/ loads and validates (paths are not touched at load time)."""

from __future__ import annotations

from pathlib import Path

import pytest

from llava_train.recipe import load_recipe

RECIPES = sorted(p for p in (Path(__file__).resolve().parent.parent / "recipes").rglob("*.yaml") if p.name != "base.yaml")


@pytest.mark.parametrize("path", RECIPES, ids=[f"{p.parent.name}/{p.name}" for p in RECIPES])
def test_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.train.output_dir
