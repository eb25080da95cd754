"""Objectives: the registry, and every objective shipped with llava_train (one file each)."""

from llava_train.objectives.base import (  # noqa: F401
    OBJECTIVES,
    BuildContext,
    Objective,
    ObjectiveOptions,
    ObjectiveOutput,
    build_objective,
    objective_class,
    register_objective,
)
from llava_train.objectives import lm  # noqa: F401,E402  (registers `lm`)
from llava_train.objectives import dpo  # noqa: F401,E402  (registers `dpo`)
