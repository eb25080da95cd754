"""`torchrun tests/pair_runner.py OUT_DIR RECIPE.yaml ...`: train each recipe in turn in one process
group (one launch for many technique pairs) and write each rank's result to its own file,
OUT_DIR/<recipe stem>.rank<R>.json (tests/test_composition.py)."""

import json
import math
import os
import sys
from pathlib import Path

from llava_train.recipe import load_recipe
from llava_train.train.trainer import Trainer

out_dir, recipes = Path(sys.argv[1]), sys.argv[2:]
rank = int(os.environ["RANK"])
for path in recipes:
    result = Trainer(load_recipe(path)).train()
    report = {"step": result.step, "last_loss": result.last_loss, "finite": math.isfinite(result.last_loss)}
    (out_dir / f"{Path(path).stem}.rank{rank}.json").write_text(json.dumps(report))
