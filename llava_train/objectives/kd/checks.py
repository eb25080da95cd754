"""What `kd` refuses, with the fix: at recipe load from the teacher's files alone (no model built),
and again once both models exist (sizes the files do not state plainly)."""

from __future__ import annotations

import json
from pathlib import Path

from llava_train.model.build import load_tokenizer
from llava_train.model.hf_import import is_hf_llava_folder
from llava_train.model.io import model_files_dir, read_meta

VISUAL_OFF = "set stage.objective.visual_mdist_weight=0 and rdist_weight=0 (response-position MDist still works)"


# ----------------------------------------------------------------------------- at recipe load


def check_recipe(options, recipe) -> None:
    if options.on_policy and recipe.data.packing:
        raise ValueError("on_policy samples one completion per row; set data.packing=false (or on_policy=0)")
    if options.visual_terms and recipe.model.connector.type != "mlp":
        raise ValueError(
            f"the student's connector `{recipe.model.connector.type}` emits a varying number of visual tokens "
            f"(e.g. Matryoshka), but visual-position terms align the teacher's and student's visual tokens: {VISUAL_OFF}"
        )
    if not Path(options.teacher).exists():
        return  # an earlier stage of the same chain writes it (like stage.init_from); building the objective checks
    _check_teacher_files(options, recipe, _teacher_files(options.teacher))


def _check_teacher_files(options, recipe, teacher: dict) -> None:
    student_tok, teacher_tok = load_tokenizer(recipe.model.tokenizer), load_tokenizer(str(teacher["tokenizer"]))
    if student_tok.get_vocab() != teacher_tok.get_vocab():
        raise ValueError(
            f"the teacher's tokenizer ({teacher['tokenizer']}) differs from model.tokenizer ({recipe.model.tokenizer}): "
            "distillation compares next-token distributions token by token; use a teacher trained with this tokenizer"
        )
    if options.same_template and teacher["template"] not in (None, recipe.data.template):
        raise ValueError(
            f"the teacher was trained with data.template={teacher['template']}, this recipe uses {recipe.data.template}: "
            f"the teacher would read prompts laid out unlike its training; set data.template={teacher['template']} "
            "(or same_template=false where that is meant, e.g. distilling on captions)"
        )
    if options.visual_terms:
        student = _student_tokens(recipe)
        if None not in (teacher["tokens"], student) and teacher["tokens"] != student:
            raise ValueError(
                f"the teacher emits {teacher['tokens']} visual tokens per image, the student {student}: visual-position "
                f"terms need equal counts; {VISUAL_OFF}"
            )


def _teacher_files(path: str) -> dict:
    """The teacher's tokenizer folder, training template and static visual-token count (None: varies)."""
    if is_hf_llava_folder(path):
        config = json.loads((Path(path) / "config.json").read_text())
        cls = config.get("vision_feature_select_strategy") == "full"
        return {"tokenizer": Path(path), "template": None, "tokens": _fixed_tokens("mlp", config["vision_config"], cls)}
    try:
        folder = model_files_dir(path)
    except FileNotFoundError:
        raise ValueError(
            f"teacher {path} is neither a llava_train checkpoint (RUN/checkpoints/step-N) nor an exported "
            "transformers Llava folder; train or export the teacher first"
        ) from None
    meta = read_meta(folder)
    vision = json.loads((folder / "vision" / "config.json").read_text())
    tokens = _fixed_tokens(meta["connector"]["type"], vision, meta["use_cls"])
    return {"tokenizer": folder / "tokenizer", "template": meta.get("template"), "tokens": tokens}


def _student_tokens(recipe) -> int | None:
    """The student's fixed visual-token count, when its files say (else the built models are compared)."""
    source = recipe.model.vision
    file = Path(source.path or "") / "config.json"
    config = source.config or (json.loads(file.read_text()) if file.is_file() else {})
    return _fixed_tokens(recipe.model.connector.type, config.get("vision_config", config), source.use_cls)


def _fixed_tokens(connector: str, vision: dict, use_cls: bool) -> int | None:
    """Tokens per image of an `mlp` connector (one per patch, + CLS when kept); None for the others."""
    if connector != "mlp" or not {"image_size", "patch_size"} <= vision.keys():
        return None
    has_cls = str(vision.get("model_type", "")).startswith("clip")
    return (vision["image_size"] // vision["patch_size"]) ** 2 + int(use_cls and has_cls)


# ----------------------------------------------------------------------------- once built


def check_models(options, student, teacher) -> None:
    """Head sizes and visual-token counts, read from the built models."""
    v_s, v_t = _rows(student.output_embeddings.weight), _rows(teacher.output_embeddings.weight)
    n = options.vocab_slice
    if n is None and v_s != v_t:
        raise ValueError(
            f"the student's LM head has {v_s} rows, the teacher's {v_t}: set stage.objective.vocab_slice to the "
            f"shared vocabulary's size (at most {min(v_s, v_t)}) to distil over that slice"
        )
    if n is not None and n > min(v_s, v_t):
        raise ValueError(f"vocab_slice={n} exceeds a head's size (student {v_s}, teacher {v_t})")
    if options.visual_terms:
        s, t = student.connector.visual_tokens(), teacher.connector.visual_tokens()
        if s.varies or t.varies or s.full != t.full:
            raise ValueError(
                f"visual-position terms need the same fixed visual-token count; student {s.full}"
                f"{' (varies)' if s.varies else ''}, teacher {t.full}{' (varies)' if t.varies else ''}: {VISUAL_OFF}"
            )


def image_processors(build, teacher_path: str, teacher) -> tuple:
    """(student's, teacher's) image settings: what each tower was trained to read."""
    from llava_train.data import pipeline
    from llava_train.model.prompting import image_processor_of

    recipe = build.recipe
    student = pipeline.make_encoder(recipe.data, build.tokenizer, build.model, recipe.model.vision.path)
    return student.image_processor, image_processor_of(teacher_path, teacher.vision.config)


def _rows(weight) -> int:
    return int(getattr(weight, "ds_shape", weight.shape)[0])


# ----------------------------------------------------------------------------- for the composition test


def example_teacher(workdir: Path) -> tuple[Path, int]:
    """A tiny random teacher checkpoint with the tokenizer at `workdir/tokenizer` (the composition test
    links the run's tokenizer there), and its vocabulary size: a wider LM with a head sized to the
    tokenizer (the student's may be larger: distil over the shared slice), the tests' tower."""
    from llava_train.model.build import assemble, build_language_model
    from llava_train.model.io import save_model_files
    from llava_train.model.vision import VisionTower, build_vision_encoder

    out = Path(workdir) / "teacher"
    tokenizer = load_tokenizer(str(Path(workdir) / "tokenizer"))
    if (out / "llava_train_model.json").is_file():
        return out, len(tokenizer)
    vision = {"model_type": "clip_vision_model", "image_size": 32, "patch_size": 8, "hidden_size": 32,
              "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    lm = {"model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": 96, "intermediate_size": 192,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
          "tie_word_embeddings": False}
    tower = VisionTower(build_vision_encoder(None, vision, "sdpa"), feature_layer=-2)
    model = assemble(tower, build_language_model(None, lm, "sdpa"), tokenizer, "mlp", {})
    save_model_files(model, tokenizer, out, 0, None, {"type": "mlp", "options": {}}, "vicuna_v1")
    return out, len(tokenizer)
