"""Attaching modules to a built model, and releasing their parameters after a stage freezes parts.

Order (trainer, `load_model_files`, `init_from`): build the base -> attach modules -> load weights
-> apply the stage (freezes parts) -> release the modules' own parameters, so a module can train
while the part it sits in stays frozen.
"""

from __future__ import annotations

import logging

from llava_train.modules.base import TechniqueModule, build_module

log = logging.getLogger(__name__)


def attach_modules(model, specs: list[dict]) -> list[TechniqueModule]:
    attached = []
    for spec in specs:
        module = build_module(spec)
        module.attach_to(model)
        attached.append(module)
    return attached


def release_module_parameters(model) -> None:
    """Give each attached module's parameters the `trainable` its options say (after the stage froze parts)."""
    for module in model.attachments:
        for param in module.own_parameters.values():
            param.requires_grad_(module.options.trainable)
        for param in module.frozen_parameters:
            param.requires_grad_(False)


def merge_module(model, module: TechniqueModule) -> None:
    """Fold a module into plain weights and detach it (export policy `merge`)."""
    module.merge(model)
    model.attachments.remove(module)


def module_specs(model) -> list[dict]:
    return [module.spec() for module in model.attachments]


def describe(model) -> list[str]:
    """One line per module for the log: its trainable parameter count and export policy."""
    lines = []
    for module in model.attachments:
        count = sum(getattr(p, "ds_numel", p.numel()) for p in module.own_parameters.values())
        state = "TRAINABLE" if module.options.trainable else "frozen"
        lines.append(f"[{state}] module {module.name}: {count:,} parameters, export {module.export}")
    return lines
