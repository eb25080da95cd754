"""`torchrun tests/nan_train.py train RECIPE [...]`: `llava-train` with NaN injected into the loss of
forward calls $NAN_CALLS (comma-separated, 1-based) on rank $NAN_RANK only (tests/test_faults.py)."""

import os
import sys

from faultlib import poisoned  # this script's folder is on sys.path

from llava_train.cli import main
from llava_train.objectives import OBJECTIVES

if int(os.environ["RANK"]) == int(os.environ["NAN_RANK"]):
    calls = {int(call) for call in os.environ["NAN_CALLS"].split(",")}
    OBJECTIVES["lm"] = poisoned(OBJECTIVES["lm"], calls)
sys.exit(main(sys.argv[1:]))
