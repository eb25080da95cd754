"""Recipe mistakes are caught before any work starts, with messages that say what and where."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from llava_train.recipe import Recipe, RecipeError, load_recipe

BASE = Path(__file__).parent / "fixtures" / "recipe_base.yaml"


def error_of(path=BASE, overrides=()) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    return str(info.value)


def write(path: Path, data: dict | str) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_base_fixture_is_valid():
    recipe = load_recipe(BASE)
    assert isinstance(recipe, Recipe)
    assert recipe.train.max_steps == 10 and recipe.train.lr == 1e-3


# ----------------------------------------------------------------------------- schema mistakes


def test_unknown_key_names_full_path_and_suggests_the_nearest():
    message = error_of(overrides=["train.micro_batch_sise=4"])
    assert "unknown key `train.micro_batch_sise`" in message
    assert "did you mean `train.micro_batch_size`?" in message


def test_unknown_key_without_a_close_match_lists_the_valid_keys():
    message = error_of(overrides=["train.wandb.zzz=1"])
    assert "unknown key `train.wandb.zzz`" in message
    assert "valid keys here: mode, project, name" in message


def test_unknown_top_level_section(tmp_path):
    raw = yaml.safe_load(BASE.read_text())
    raw["trian"] = raw.pop("train")
    message = error_of(write(tmp_path / "r.yaml", raw))
    assert "unknown key `trian`; did you mean `train`?" in message
    assert "missing required key `train`" in message


def test_wrong_type_says_what_is_expected():
    message = error_of(overrides=["train.max_steps=abc"])
    assert "`train.max_steps` must be an integer, got 'abc'" in message


def test_section_given_where_a_number_is_expected():
    message = error_of(overrides=["train.weight_decay.x=1"])
    assert "`train.weight_decay` must be a number" in message


def test_bad_literal_lists_the_allowed_values():
    message = error_of(overrides=["train.precision=fp8"])
    assert "`train.precision`" in message and "'fp32' or 'bf16'" in message and "fp8" in message


def test_range_is_checked():
    assert "`train.max_steps`: Input should be greater than 0" in error_of(overrides=["train.max_steps=0"])


def test_missing_required_key(tmp_path):
    raw = yaml.safe_load(BASE.read_text())
    del raw["model"]["tokenizer"]
    assert "missing required key `model.tokenizer`" in error_of(write(tmp_path / "r.yaml", raw))


def test_every_mistake_is_reported_at_once():
    message = error_of(overrides=["train.max_steps=abc", "train.precision=fp8"])
    assert "train.max_steps" in message and "train.precision" in message


@pytest.mark.parametrize(
    "vision, problem",
    [
        ({"path": "clip", "config": {"model_type": "clip_vision_model"}}, "both"),
        ({"feature_layer": -2}, "neither"),
    ],
)
def test_vision_needs_exactly_one_of_path_and_config(tmp_path, vision, problem):
    raw = yaml.safe_load(BASE.read_text())
    raw["model"]["vision"] = vision
    message = error_of(write(tmp_path / "r.yaml", raw))
    assert "`model.vision`: set exactly one of `path`" in message, problem
    assert "Value error" not in message  # pydantic's prefix is noise to a user


# ----------------------------------------------------------------------------- files


def test_missing_recipe_file(tmp_path):
    assert f"recipe file not found: {tmp_path / 'nope.yaml'}" in error_of(tmp_path / "nope.yaml")


def test_invalid_yaml_names_the_file(tmp_path):
    message = error_of(write(tmp_path / "bad.yaml", "train: [unclosed\n"))
    assert "bad.yaml: not valid YAML" in message


def test_recipe_must_be_a_mapping(tmp_path):
    assert "must be a mapping of sections, got list" in error_of(write(tmp_path / "r.yaml", "- a\n- b\n"))


def test_scientific_notation_is_a_number_everywhere(tmp_path):
    # YAML 1.1 reads `1e-6` as a string; inside free-form HF config dicts nothing would fix it later.
    recipe = load_recipe(BASE)
    assert recipe.model.lm.config["rms_norm_eps"] == 1e-6


# ----------------------------------------------------------------------------- inherit


def test_inherit_merges_deeply_and_the_child_wins(tmp_path):
    child = write(
        tmp_path / "child.yaml",
        {"inherit": str(BASE), "train": {"max_steps": 99, "wandb": {"mode": "disabled"}}, "stage": {"name": "pretrain"}},
    )
    recipe = load_recipe(child)
    assert recipe.train.max_steps == 99  # overridden
    assert recipe.train.lr == 1e-3  # a sibling key kept from the base
    assert recipe.train.wandb.mode == "disabled" and recipe.train.wandb.project == "llava_train"
    assert recipe.model.lm.config["hidden_size"] == 64  # a whole untouched section kept
    assert recipe.stage.name == "pretrain"


def test_inherit_chain_is_relative_to_each_file(tmp_path):
    (tmp_path / "a").mkdir()
    write(tmp_path / "a" / "mid.yaml", {"inherit": str(BASE), "train": {"max_steps": 5, "seed": 3}})
    leaf = write(tmp_path / "leaf.yaml", {"inherit": "a/mid.yaml", "train": {"max_steps": 7}})
    recipe = load_recipe(leaf)
    assert (recipe.train.max_steps, recipe.train.seed, recipe.train.lr) == (7, 3, 1e-3)


def test_inherit_cycle_is_refused(tmp_path):
    write(tmp_path / "a.yaml", {"inherit": "b.yaml"})
    write(tmp_path / "b.yaml", {"inherit": "a.yaml"})
    message = error_of(tmp_path / "a.yaml")
    assert "`inherit:` cycle" in message and "a.yaml -> " in message and "b.yaml -> " in message


def test_missing_inherited_file_names_who_inherits_it(tmp_path):
    child = write(tmp_path / "child.yaml", {"inherit": "gone.yaml"})
    message = error_of(child)
    assert "recipe file not found" in message and "gone.yaml" in message and "child.yaml" in message


# ----------------------------------------------------------------------------- overrides


def test_override_values_are_parsed_as_yaml():
    recipe = load_recipe(BASE, ["train.lr=2e-5", "train.progress_bar=false", "data.train=[a,b]", "train.seed=7"])
    assert recipe.train.lr == 2e-5 and isinstance(recipe.train.lr, float)
    assert recipe.train.progress_bar is False
    assert recipe.data.train == ["a", "b"]
    assert recipe.train.seed == 7


def test_override_reaches_into_free_form_dicts_and_creates_sections():
    recipe = load_recipe(BASE, ["model.lm.config.rope_theta=1e6", "stage.lr.connector=1e-3"])
    assert recipe.model.lm.config["rope_theta"] == 1e6
    assert recipe.stage.lr.connector == 1e-3


def test_empty_override_value_means_null():
    assert load_recipe(BASE, ["stage.init_from="]).stage.init_from is None


def test_override_keeps_equals_signs_in_the_value():
    assert load_recipe(BASE, ["data.system_prompt=a=b"]).data.system_prompt == "a=b"


@pytest.mark.parametrize("item", ["train.lr", "train..lr=1", "=3"])
def test_malformed_override(item):
    message = error_of(overrides=[item])
    assert f"override `{item}`" in message and "train.lr=2e-5" in message


def test_override_into_a_value_that_is_not_a_section():
    message = error_of(overrides=["train.max_steps.x=1"])
    assert "override `train.max_steps.x`: `train.max_steps` is a value, not a section" in message


def test_override_unknown_key_is_caught_by_validation():
    assert "unknown key `data.shufle`; did you mean `data.shuffle`?" in error_of(overrides=["data.shufle=false"])
