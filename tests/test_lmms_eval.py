"""`lmms-eval --model llava_train`: the adapter, found through the entry point that pyproject.toml
declares, answers a local task (a YAML over a local JSON file and three images; nothing from a hub)
exactly as `llava-train eval`'s own path does. Its log-likelihoods (multiple-choice tasks) are
checked in this process: lmms-eval 0.7.3 turns every model's loglikelihood results into strings
before scoring (`unwrap_generation_output`), so its multiple_choice tasks fail for any model."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install -e '.[eval]', docs/evaluation.md)")

from llava_train.data.collate import collate  # noqa: E402
from llava_train.recipe import validate_recipe  # noqa: E402
from llava_train.train.trainer import Trainer  # noqa: E402
from tests.conftest import tiny_recipe_dict  # noqa: E402

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
COLOURS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 170, 60)}

UTILS = '''
from pathlib import Path
from PIL import Image

HERE = Path(__file__).resolve().parent

def doc_to_visual(doc):
    return [Image.open(HERE / doc["image"]).convert("RGB")]

def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]

def process_results(doc, results):
    return {"exact": float(results[0].strip().lower() == doc["answer"])}
'''

QA_TASK = """task: llava_train_local_qa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
  until: ["\\n"]
process_results: !function utils.process_results
metric_list:
  - metric: exact
    aggregation: mean
    higher_is_better: true
metadata:
  - version: 0.0
"""

@pytest.fixture(scope="module")
def checkpoint(demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("lmms_run")
    return Trainer(validate_recipe(tiny_recipe_dict(demo_data, out, max_steps=2))).train().checkpoint


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lmms_task")
    docs = []
    for i, (name, rgb) in enumerate(COLOURS.items()):
        Image.new("RGB", (32, 32), rgb).save(root / f"img{i}.png")
        docs.append({"id": i, "question": "What colour is the shape?", "answer": name, "label": i, "image": f"img{i}.png"})
    (root / "data.json").write_text("\n".join(json.dumps(doc) for doc in docs))
    (root / "utils.py").write_text(UTILS)
    (root / "local_qa.yaml").write_text(QA_TASK.format(data=root / "data.json"))
    return root


@pytest.fixture(scope="module")
def entry_point(tmp_path_factory) -> Path:
    """pyproject.toml's `lmms_eval.models` entry point, as an installed distribution would expose it
    (the editable install may predate it)."""
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["lmms_eval.models"]
    root = tmp_path_factory.mktemp("entry_point")
    info = root / "llava_train_eval_entry-0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: llava-train-eval-entry\nVersion: 0\n")
    (info / "entry_points.txt").write_text("[lmms_eval.models]\n" + "".join(f"{k} = {v}\n" for k, v in declared.items()))
    return root


def lmms_eval(args: list[str], entry_point: Path, tmp: Path) -> str:
    # A process group of its own: the training fixture left this process's rendezvous variables behind.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env = {**env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp / "cache"),
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), str(entry_point), os.environ.get("PYTHONPATH")]))
    cmd = [sys.executable, "-c", "import sys; from lmms_eval.cli.dispatch import main; sys.argv[0] = 'lmms-eval'; main()"]
    proc = subprocess.run(cmd + args, env=env, capture_output=True, text=True, timeout=600)
    return proc.stdout + proc.stderr  # lmms-eval logs errors and still exits 0: callers read the output


def test_adapter_answers_a_local_task(checkpoint, task_dir, entry_point, tmp_path):
    out = tmp_path / "out"
    log = lmms_eval(
        ["--model", "llava_train", "--model_args", f"pretrained={checkpoint}", "--batch_size", "2",
         "--tasks", "llava_train_local_qa", "--include_path", str(task_dir),
         "--output_path", str(out), "--log_samples"],
        entry_point, tmp_path,
    )
    samples = {p.name.split("_samples_")[1]: p for p in out.rglob("*_samples_*.jsonl")}
    assert set(samples) == {"llava_train_local_qa.jsonl"}, log[-3000:]
    qa = [json.loads(line) for line in samples["llava_train_local_qa.jsonl"].read_text().splitlines()]

    from llava_train.evaluate.lmms_eval_model import LlavaTrain, _cut

    ours = LlavaTrain(pretrained=str(checkpoint))  # the same prompts and decoding, in this process
    images = [Image.open(task_dir / f"img{i}.png").convert("RGB") for i in range(3)]
    prompts = [ours.encoder.from_text("What colour is the shape?", [image]) for image in images]
    answers = ours.evaluator.answer(prompts, ours.options.__class__(batch_size=1, max_new_tokens=4))
    by_doc = {row["doc_id"]: row for row in qa}
    assert [by_doc[i]["filtered_resps"] for i in range(3)] in ([_cut(a, ["\n"]) for a in answers],
                                                                [[_cut(a, ["\n"])] for a in answers])


def test_loglikelihood_scores_continuations(checkpoint, task_dir):
    from lmms_eval.api.instance import Instance

    from llava_train.evaluate.lmms_eval_model import LlavaTrain

    model = LlavaTrain(pretrained=str(checkpoint))
    docs = [{"image": f"img{i}.png"} for i in range(3)]
    model.task_dict = {"t": {"test": docs}}
    def visual(doc):
        return [Image.open(task_dir / doc["image"]).convert("RGB")]

    requests = [Instance("loglikelihood", ("What colour is the shape?", c, visual, 0, "t", "test"), idx=i,
                metadata={"task": "t", "doc_id": 0, "repeats": 1}) for i, c in enumerate(COLOURS)]
    scores = model.loglikelihood(requests)
    assert len(scores) == 3 and all(math.isfinite(ll) and ll < 0 and isinstance(greedy, bool) for ll, greedy in scores)
    # the same numbers from a plain forward over prompt + continuation, one token at a time
    prompt = model.encoder.from_text("What colour is the shape?", visual(docs[0]))
    for (ll, _), colour in zip(scores, COLOURS):
        ids = model.tokenizer(colour, add_special_tokens=False)["input_ids"]
        total = 0.0
        for k, token in enumerate(ids):
            seen = type(prompt)(prompt.input_ids + ids[:k], prompt.labels + ids[:k], prompt.images)
            batch = collate([seen], model.tokenizer.pad_token_id, model.model.image_token_id)
            with torch.no_grad():
                logits = model.model.lm(inputs_embeds=model.model.embed(batch)).logits[0, -1]
            total += float(logits.float().log_softmax(-1)[token])
        assert ll == pytest.approx(total, rel=1e-4)


def test_unknown_task_and_bad_checkpoint_are_named(task_dir, entry_point, tmp_path):
    log = lmms_eval(["--model", "llava_train", "--model_args", f"pretrained={tmp_path / 'nowhere'}",
                     "--tasks", "no_such_task", "--include_path", str(task_dir)], entry_point, tmp_path)
    assert "Tasks not found: no_such_task" in log
    assert "nowhere does not exist" not in log  # refused before the model (or its folder) was looked at
    log = lmms_eval(["--model", "llava_train", "--model_args", f"pretrained={tmp_path}",
                     "--tasks", "llava_train_local_qa", "--include_path", str(task_dir)], entry_point, tmp_path)
    assert f"{tmp_path} is not a checkpoint" in log
