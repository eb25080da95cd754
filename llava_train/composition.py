"""Every cross-section rule of a recipe, checked before any model is built; the support matrix.

Modules and objectives declare what they conflict with and require, and may check the rest of
the recipe (stage, packing, ZeRO stage) themselves. This file runs all of those declarations
on one recipe, and renders them for every registered pair as docs/support-matrix.md
(`python -m llava_train.composition > docs/support-matrix.md`; a test keeps the file current).
"""

from __future__ import annotations

import importlib
import itertools
import sys

from pydantic import ValidationError

from llava_train.model.connectors import CONNECTORS
from llava_train.modules import MODULES, module_class
from llava_train.objectives import OBJECTIVES, objective_class
from llava_train.recipe import Recipe, RecipeError, describe_errors


def import_plugins(names: list[str], source: str = "<recipe>") -> None:
    """Import the recipe's `plugins` (python modules that register modules or objectives)."""
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise RecipeError(f"{source}: `plugins` must be a list of importable python module names")
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise RecipeError(
                f"{source}: plugins: cannot import `{name}` ({exc}); put the folder that holds it on PYTHONPATH"
            ) from None


def check_composition(recipe: Recipe, source: str = "<recipe>") -> None:
    """Validate module and objective options and every cross-section rule; RecipeError on the first problem."""
    _check_connector(recipe, source)
    chosen: list[tuple[str, type, object]] = []  # (recipe path, class, validated options)
    for index, spec in enumerate(recipe.modules):
        chosen.append(_validated(f"modules[{index}]", spec, module_class, source))
    chosen.append(_validated("stage.objective", recipe.stage.objective, objective_class, source))

    names = [cls.name for _, cls, _ in chosen]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise RecipeError(f"{source}: modules: `{repeated[0]}` is listed twice; give it once with all its options")
    for (path_a, a, _), (path_b, b, _) in itertools.combinations(chosen, 2):
        reason = conflict(a, b)
        if reason:
            raise RecipeError(f"{source}: {path_a} and {path_b} do not combine: {reason}")
    for path, cls, options in chosen:
        missing = [need for need in cls.requires if need not in names]
        if missing:
            raise RecipeError(f"{source}: {path} (`{cls.name}`) needs {', '.join(missing)} in the same recipe")
        try:
            cls.check_recipe(options, recipe)
        except ValueError as exc:
            raise RecipeError(f"{source}: {path} (`{cls.name}`): {exc}") from None


def _check_connector(recipe: Recipe, source: str) -> None:
    """The connector's type and options (its own `check_options`, given the tower's patch grid when the recipe
    builds the tower from a config dict)."""
    connector = recipe.model.connector
    if connector.type not in CONNECTORS:
        raise RecipeError(
            f"{source}: `model.connector.type`: unknown connector `{connector.type}`; registered: {', '.join(sorted(CONNECTORS))}"
        )
    check = getattr(CONNECTORS[connector.type], "check_options", None)
    if check is None:
        return
    vision = recipe.model.vision.config or {}
    grid = vision["image_size"] // vision["patch_size"] if {"image_size", "patch_size"} <= vision.keys() else None
    try:
        check(connector.options, grid)
    except (ValueError, ValidationError) as exc:
        raise RecipeError(f"{source}: `model.connector.options` ({connector.type}): {exc}") from None


def _validated(path: str, spec: dict, lookup, source: str):
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
        raise RecipeError(f"{source}: `{path}` must be a mapping with a `type` (e.g. {{type: NAME, ...options}})")
    options = {k: v for k, v in spec.items() if k != "type"}
    try:
        cls = lookup(spec["type"])
    except ValueError as exc:
        raise RecipeError(f"{source}: `{path}.type`: {exc}") from None
    try:
        return path, cls, cls.Options.model_validate(options)
    except ValidationError as exc:
        raise RecipeError(f"{source}: " + describe_errors(exc, prefix=path, root=cls.Options)) from None


def conflict(a: type, b: type) -> str | None:
    """Why two techniques cannot run together (either side's declaration), or None."""
    if b.name in a.conflicts:
        return f"`{a.name}` declares a conflict with `{b.name}`"
    if a.name in b.conflicts:
        return f"`{b.name}` declares a conflict with `{a.name}`"
    return None


# ----------------------------------------------------------------------------- support matrix


def support_matrix() -> str:
    """Markdown: what each registered module and objective declares, and every pair's status."""
    shipped = lambda cls: cls.__module__.startswith("llava_train.")  # noqa: E731  (not plugins, not test fixtures)
    modules = [MODULES[name] for name in sorted(MODULES) if shipped(MODULES[name])]
    objectives = [OBJECTIVES[name] for name in sorted(OBJECTIVES) if shipped(OBJECTIVES[name])]
    lines = [
        "# Support matrix",
        "",
        "Generated from the modules' and objectives' own declarations by `python -m llava_train.composition`",
        "(a test fails when this file is out of date). Recipe-specific rules (stage, packing, ZeRO stage) are",
        "checked at recipe load by each technique's `check_recipe`; see its docs.",
        "",
        "## Techniques",
        "",
        "| name | kind | export | ZeRO-3 leaves | requires | conflicts | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for cls in modules:
        leaves = ", ".join(leaf.__name__ for leaf in cls.zero3_leaf_classes) or "-"
        lines.append(
            f"| `{cls.name}` | module | {cls.export} | {leaves} | {_names(cls.requires)} | {_names(cls.conflicts)} "
            f"| {cls.notes or '-'} |"
        )
    for cls in objectives:
        lines.append(
            f"| `{cls.name}` | objective (normaliser: {cls.normaliser}) | - | - | {_names(cls.requires)} "
            f"| {_names(cls.conflicts)} | {getattr(cls, 'notes', '') or '-'} |"
        )
    connectors = [name for name in sorted(CONNECTORS) if CONNECTORS[name].__module__.startswith("llava_train.")]
    lines += ["", "## Connectors", "", "`model.connector.type`; each combines with every module and objective unless a technique's `check_recipe` refuses it.", ""]
    lines += [
        f"- `{name}` ({CONNECTORS[name].__module__.rsplit('.', 1)[-1]}.py): {CONNECTORS[name].__doc__.strip().splitlines()[0]}"
        for name in connectors
    ]
    lines += ["", "## Pairs", "", "Every module with every other module and every objective (an objective is always one per recipe).", ""]
    allowed, refused = allowed_pairs(modules, objectives)
    pairs = allowed + refused
    if not pairs:
        lines.append("No modules are registered yet: every objective runs alone.")
    else:
        lines += ["| a | b | status |", "|---|---|---|"]
        for a, b in pairs:
            reason = conflict(a, b)
            lines.append(f"| `{a.name}` | `{b.name}` | {'refused: ' + reason if reason else 'allowed'} |")
    lines += [
        "",
        "Shared code, not techniques: `modules/attach.py` (attach order, parameter release), `modules/routing.py`",
        "(the fp32 router, balance and z-losses of moe_lora and moe_upcycle).",
    ]
    return "\n".join(lines) + "\n"


def allowed_pairs(modules: list[type], objectives: list[type]) -> tuple[list[tuple], list[tuple]]:
    """(allowed, refused) pairs: module x module and module x objective."""
    pairs = list(itertools.combinations(modules, 2)) + [(m, o) for m in modules for o in objectives]
    allowed = [pair for pair in pairs if conflict(*pair) is None]
    return allowed, [pair for pair in pairs if conflict(*pair) is not None]


def _names(names: tuple[str, ...]) -> str:
    return ", ".join(f"`{name}`" for name in names) or "-"


if __name__ == "__main__":
    sys.stdout.write(support_matrix())
