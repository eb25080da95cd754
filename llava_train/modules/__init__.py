"""Attachable technique modules: the registry, and every technique shipped with llava_train.

A recipe lists them under `modules: [{type: NAME, ...options}]`; user code registers more
through `plugins: [python.module]` in the recipe (imported before validation).
"""

from llava_train.modules.base import (  # noqa: F401
    MODULES,
    ModuleOptions,
    TechniqueModule,
    build_module,
    module_class,
    register_module,
)

from llava_train.modules import moe_lora  # noqa: F401,E402  (registers `moe_lora`)
from llava_train.modules import moe_upcycle  # noqa: F401,E402  (registers `moe_upcycle`)
from llava_train.modules import matryoshka  # noqa: F401,E402  (registers the Matryoshka connectors)
