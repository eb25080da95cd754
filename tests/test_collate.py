"""Sample encoding (reasons for skipping) and batch collation (padding, roles, images)."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from llava_train.data.batch import IGNORE_INDEX, Example, TokenRole
from llava_train.data.collate import SampleEncoder, collate
from llava_train.data.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageProcessor
from llava_train.data.shards import BadSample, ShardStream, build_loader, expand_urls
from llava_train.data.templates import IMAGE_TOKEN, get_template

N_IMG = 4
PAD, IMG = 0, 9


def test_collate_pads_right_and_marks_roles():
    images = [torch.full((3, 8, 8), float(i)) for i in range(3)]
    examples = [
        Example([5, IMG, IMG, 6, 7], [-100, -100, -100, 6, 7], images=images[:1], key="a", meta={"q": 1}),
        Example(input_ids=[5, 6], labels=[-100, 6], key="b"),
        Example(input_ids=[IMG, IMG, 8, IMG, IMG], labels=[-100] * 4 + [IMG], images=images[1:], key="c"),
    ]
    batch = collate(examples, pad_token_id=PAD, image_token_id=IMG)
    assert batch.input_ids.tolist()[1] == [5, 6, PAD, PAD, PAD]
    assert batch.labels.tolist()[1] == [-100, 6, -100, -100, -100]
    assert batch.attention_mask.tolist() == [[1] * 5, [1, 1, 0, 0, 0], [1] * 5]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 1, 0, 0, 0], [0, 1, 2, 3, 4]]
    T, I, P = int(TokenRole.TEXT), int(TokenRole.IMAGE), int(TokenRole.PAD)
    assert batch.token_roles.dtype == torch.int8
    assert batch.token_roles.tolist() == [[T, I, I, T, T], [T, T, P, P, P], [I, I, T, I, I]]
    assert torch.equal(batch.pixel_values, torch.stack(images))
    assert batch.image_sample_index.tolist() == [0, 2, 2]
    assert batch.keys == ["a", "b", "c"] and batch.meta == [{"q": 1}, {}, {}]


def test_collate_text_only_and_pad_id_that_is_a_real_token():
    batch = collate([Example([3, 4, 5], [3, 4, 5]), Example([3], [3])], pad_token_id=5, image_token_id=IMG)
    assert batch.pixel_values is None and batch.image_sample_index.tolist() == []
    assert batch.token_roles.tolist()[1] == [int(TokenRole.TEXT)] + [int(TokenRole.PAD)] * 2
    assert batch.num_tokens == 4
    with pytest.raises(ValueError, match="pad token"):
        collate([Example([3], [3])], pad_token_id=None, image_token_id=IMG)


# ----------------------------------------------------------------------------- SampleEncoder


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture(scope="module")
def encoder(tokenizer):
    processor = ImageProcessor(16, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, mode="pad")
    return SampleEncoder(get_template("vicuna_v1", tokenizer), processor, N_IMG, max_length=128)


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 10), (200, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def raw_sample(conversations, images=("png",), members=None, **record) -> dict:
    members = {ext: png() for ext in images} if members is None else members
    json_record = {"id": "x1", "conversations": conversations, "images": list(images), **record}
    return {"__key__": "k", "__shard__": "s.tar", "json": json_record, **members}


QA = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]


def test_encoder_builds_an_example(encoder, tokenizer):
    example = encoder(raw_sample(QA, meta={"qtype": "colour", "answer": "red"}))
    assert example.key == "x1" and example.meta == {"qtype": "colour", "answer": "red"}
    assert len(example.images) == 1 and example.images[0].shape == (3, 16, 16)
    assert example.input_ids.count(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)) == N_IMG
    supervised = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(supervised) == " red</s>"


@pytest.mark.parametrize(
    "reason,raw",
    [
        ("missing image", raw_sample(QA, members={})),
        ("undecodable image", raw_sample(QA, members={"png": b"\x89PNG broken"})),
        ("image count mismatch", raw_sample(QA, images=())),
        ("image count mismatch", raw_sample([{"from": "human", "value": "hi"}, QA[1]])),
        ("missing field", {"__key__": "k", "json": {"id": "x"}}),
        ("bad conversation", raw_sample([{"from": "robot", "value": "<image>"}])),
        ("over-long", raw_sample([{"from": "human", "value": "<image>\n" + "long " * 200}, QA[1]])),
    ],
)
def test_encoder_reasons(encoder, reason, raw):
    with pytest.raises(BadSample) as caught:
        encoder(raw)
    assert caught.value.reason == reason


def test_images_cut_by_truncation_are_dropped(tokenizer):
    processor = ImageProcessor(16, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, mode="pad")
    template = get_template("vicuna_v1", tokenizer)
    conversation = [QA[0], QA[1], {"from": "human", "value": "<image>\nAnd this?"}, {"from": "gpt", "value": "blue"}]
    raw = raw_sample(conversation, images=("0.png", "1.png"))
    full = SampleEncoder(template, processor, N_IMG, max_length=1000)(raw)
    assert len(full.images) == 2
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    second = [i for i, t in enumerate(full.input_ids) if t == image_id][N_IMG]
    short = SampleEncoder(template, processor, N_IMG, max_length=second + 2)
    cut = short(raw)
    assert len(cut.images) == 1 and cut.input_ids.count(image_id) == N_IMG


def test_demo_shards_flow_into_batches(demo_data, tokenizer):
    processor = ImageProcessor(32, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, mode="resize")
    encoder = SampleEncoder(get_template("vicuna_v1", tokenizer), processor, N_IMG, max_length=96)
    stream = ShardStream(expand_urls([str(demo_data / "sft" / "shard-*.tar")]), encoder, seed=0)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    def collate_fn(examples):
        return collate(examples, tokenizer.pad_token_id, image_id)

    batch = next(iter(build_loader(stream, 6, collate_fn)))
    assert batch.input_ids.shape[0] == 6 and batch.pixel_values.shape == (6, 3, 32, 32)
    assert int((batch.token_roles == int(TokenRole.IMAGE)).sum()) == 6 * N_IMG
    assert batch.num_supervised_tokens > 0 and not stream.skipped
