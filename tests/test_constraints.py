"""Structured decoding: the format learned from the training targets, and outputs held to it."""

from __future__ import annotations

import json
import re

import pytest

from databricks_llm import constraints, data
from databricks_llm.constraints import E2E_SCHEMA, Schema, pattern, schema_of
from databricks_llm.formats import of
from databricks_llm.scoring import E2E_SLOTS, parse_mr
from databricks_llm.task import E2E

SLOTS, JSON = of("slots"), of("json")


@pytest.fixture(scope="module")
def tickets():
    return data.load("embedded:support-tickets")


def matches(output_format: str, schema: Schema, text: str) -> bool:
    return re.fullmatch(pattern(of(output_format), schema), text) is not None


def test_e2e_targets_give_the_e2e_order_and_six_closed_slots():
    _, task = data.load("embedded:e2e-sample")
    schema = Schema.from_json(task.schema)
    assert schema.fields == E2E_SLOTS and schema.ordered
    assert dict(schema.closed).keys() == dict(E2E_SCHEMA.closed).keys()  # name and near are open
    assert dict(schema.closed)["eatType"] == ("coffee shop", "pub", "restaurant")


def test_every_training_target_fits_its_own_format(tickets):
    splits, task = data.load("embedded:e2e-sample")
    schema = Schema.from_json(task.schema)
    assert all(matches("slots", schema, target) for target in splits["train"][data.OUTPUT])
    ticket_splits, ticket_task = tickets
    ticket_schema = Schema.from_json(ticket_task.schema)
    assert all(matches("json", ticket_schema, target) for target in ticket_splits["train"][data.OUTPUT])


@pytest.mark.parametrize("text", [
    "name[The Punter], name[The Punter]",              # a key twice
    "name[The Punter], eatType[bar]",                   # outside eatType's closed vocabulary
    "name[The Punter], colour[red]",                    # a key the task does not have
    "eatType[pub], name[The Punter]",                   # out of the targets' order
    "name[The Punter] eatType[pub]",                    # no separator
])
def test_slot_outputs_outside_the_format_do_not_match(text):
    assert not matches("slots", E2E_SCHEMA, text)


def test_json_format_is_one_object_with_known_keys_and_closed_values(tickets):
    schema = Schema.from_json(tickets[1].schema)
    good = tickets[0]["test"][data.OUTPUT][0]
    assert matches("json", schema, good)
    obj = json.loads(good)
    assert not matches("json", schema, json.dumps({**obj, "extra": "x"}))
    assert not matches("json", schema, json.dumps({**obj, "severity": "apocalyptic"}))
    assert not matches("json", schema, good[:-1])  # unclosed


def test_targets_in_two_orders_get_one_order_that_allows_each_field_once():
    schema = schema_of(SLOTS, ["a[1], b[2]", "a[5], b[6], c[7]", "b[3], a[4]"])
    assert not schema.ordered and schema.fields == ("a", "b", "c")  # by mean position: a first in 2 of 3
    assert matches("slots", schema, "a[1], c[2]") and not matches("slots", schema, "b[1], a[2]")
    assert not matches("slots", schema, "a[1], a[2]")
    assert not schema_of(SLOTS, ["a[1], b[2]", "b[1], c[2]", "c[1], a[2]"]).ordered  # a cycle through three


def test_data_loading_rewrites_targets_in_disagreeing_orders_into_the_one_order(tmp_path):
    import pandas as pd

    rows = [{"text": f"row {i}", "label": t} for i, t in
            enumerate(['{"b": "x", "a": "y"}', '{"a": "y", "b": "x"}', '{"a": "z", "c": "w", "b": "v"}'] * 4)]
    pd.DataFrame(rows).to_csv(tmp_path / "train.csv", index=False)
    splits, task = data.load(str(tmp_path))
    order = Schema.from_json(task.schema).fields
    for target in splits["train"][data.OUTPUT]:
        keys = list(json.loads(target))
        assert keys == sorted(keys, key=order.index)


def test_targets_that_never_disagree_keep_one_order():
    schema = schema_of(SLOTS, ["a[1], b[2]", "b[1], c[2]", "a[3]"])
    assert schema.ordered and schema.fields == ("a", "b", "c")


def test_nested_json_and_label_lists_have_an_expression_too():
    schema = schema_of(JSON, ['{"a": {"b": 1}, "t": ["x", "y"]}', '{"a": {"b": 2}, "t": ["z"]}'])
    assert dict(schema.kinds) == {"a": "nested", "t": "list"}
    assert matches("json", schema, '{"a": {"b": 3, "c": [1, 2]}, "t": ["q", "r"]}')
    assert not matches("json", schema, '{"a": {"b": 3}, "t": "q"}')


def test_models_saved_before_schemas_get_e2e_s_schema():
    assert constraints.task_schema(E2E) == E2E_SCHEMA


def test_text_tasks_have_nothing_to_enforce(tiny_tokenizer):
    from databricks_llm.task import Task

    assert constraints.for_task(tiny_tokenizer, Task(output_format="text", instruction="Summarise.")) is None


def test_the_format_reads_each_piece_of_an_output_as_the_tokenizer_decodes_it(tiny_tokenizer):
    pieces = constraints.token_bytes(tiny_tokenizer)
    for text in ("name[The Punter], near[Café Sicilia]", "near[Café Sicilia], name[The Punter]"):
        ids = tiny_tokenizer.encode(text, add_special_tokens=False)
        for end in range(1, len(ids) + 1):
            expected = tiny_tokenizer.decode(ids[:end]).rstrip("\ufffd")  # a character cut in two reads as nothing yet
            assert b"".join(pieces[t] for t in ids[:end]).decode("utf-8", "ignore") == expected


def test_every_training_target_as_the_tokenizer_writes_it_is_a_path_through_the_format(tiny_tokenizer):
    splits, task = data.load("embedded:e2e-sample")
    constraint = constraints.for_task(tiny_tokenizer, task)
    closing = tiny_tokenizer.convert_tokens_to_ids("],")  # ends a name and starts the next field: one token
    walked_through_closing = 0
    for source, target in list(zip(splits["train"][data.INPUT], splits["train"][data.OUTPUT]))[:50]:
        rows = constraint.rows([source])
        ids = tiny_tokenizer.encode(target, add_special_tokens=False)
        for end, token in enumerate(ids):
            assert token in rows.allowed()[0], (target, tiny_tokenizer.decode(ids[:end + 1]))
            rows.advance([token])
        walked_through_closing += closing in ids
        assert tiny_tokenizer.eos_token_id in rows.allowed()[0]  # and it may end there
    assert walked_through_closing > 10


def sentencepiece_style_tokenizer():
    """A Llama-2-style tokenizer: `▁` for a space, bytes it has no token for as `<0x..>` tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    bpe.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    bpe.train_from_iterator(["name[The Punter], near[Avalon]"] * 20, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "</s>", *bytes_]))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece-style"])
def test_each_tokens_bytes_are_what_it_adds_to_the_text(kind, tiny_tokenizer):
    tokenizer = tiny_tokenizer if kind == "byte-level" else sentencepiece_style_tokenizer()
    pieces = constraints.token_bytes(tokenizer)
    text = "name[The Punter], near[Café Sicilia £20]"  # é and £ are bytes the sentencepiece one has no token for
    ids = tokenizer.encode(text, add_special_tokens=False)
    written = b"".join(pieces[t] for t in ids)
    assert written == (text if kind == "byte-level" else " " + text).encode()  # Metaspace starts with a space


@pytest.fixture(scope="module")
def wild_model(tiny_model, tiny_tokenizer):
    """The tiny random Llama with large weights: left alone it writes anything."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for weight in model.parameters():
            weight.normal_(0, 0.3)
    return model


def test_structured_outputs_of_a_random_model_keep_the_format(wild_model, tiny_tokenizer):
    from databricks_llm.generation import generate

    inputs = [row["sentence"] for row in data.sample_data.generate(10, seed=3)]
    held = generate(wild_model, tiny_tokenizer, inputs, task=E2E, max_tokens=40, structured=True)
    vocabulary = dict(E2E_SCHEMA.closed)
    for text in held:
        pairs = parse_mr(text)
        assert pairs and text.startswith(f"{pairs[0][0]}[")
        keys = [k for k, _ in pairs]
        assert len(keys) == len(set(keys)) and keys == sorted(keys, key=E2E_SLOTS.index)
        assert all(value in vocabulary[key] for key, value in pairs if key in vocabulary)


def test_open_fields_whose_values_the_inputs_spell_out_are_copied():
    inputs = ["Aromi is near Avalon.", "Zizzi is by the river.", "Cotto is near Ranch."]
    targets = ["name[Aromi], near[Avalon]", "name[Zizzi], area[riverside]", "name[Cotto], near[The Ranch]"]
    schema = schema_of(SLOTS, targets, inputs)
    assert schema.copied == ("name",)  # near: 1 of 2 values is not in its input
    assert Schema.from_json(schema.to_json()) == schema
    assert schema_of(SLOTS, targets).copied == ()  # no inputs, nothing known
    assert Schema.from_json(schema.to_json().replace(', "copied": ["name"]', "")).copied == ()  # saved before


def test_e2e_copies_name_and_near():
    _, task = data.load("embedded:e2e-sample")
    assert Schema.from_json(task.schema).copied == ("name", "near")


def test_copied_values_of_a_random_model_are_pieces_of_their_prompt(wild_model, tiny_tokenizer):
    import dataclasses

    from databricks_llm.generation import generate

    _, task = data.load("embedded:e2e-sample")
    free = dataclasses.replace(task, schema=dataclasses.replace(Schema.from_json(task.schema), copied=()).to_json())
    inputs = [row["sentence"] for row in data.sample_data.generate(10, seed=3)]
    prompts = data.build_prompts(tiny_tokenizer, inputs, task)
    held = generate(wild_model, tiny_tokenizer, inputs, task=task, max_tokens=60, structured=True)
    unheld = generate(wild_model, tiny_tokenizer, inputs, task=free, max_tokens=60, structured=True)

    def copied(outputs):  # name and near values, closed or not
        return [(v, p) for text, p in zip(outputs, prompts) for v in re.findall(r"(?:name|near)\[([^\]]*)", text)]

    assert copied(held) and all(value in prompt for value, prompt in copied(held))
    assert not all(value in prompt for value, prompt in copied(unheld))  # the random model left alone misspells


def test_a_copied_json_value_may_only_continue_with_text_of_its_prompt_and_end_where_a_word_does(tiny_tokenizer):
    from databricks_llm.task import Task

    _, task = data.load("embedded:e2e-sample", Task(output_format="json"))
    assert Schema.from_json(task.schema).copied == ("name", "near")
    sentence = "Near Avalon is The Punter, a pub."

    def next_texts(text: str) -> list[str]:  # the value so far and each allowed next token, as they read
        written = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
        rows = constraints.for_task(tiny_tokenizer, task).rows([sentence])
        for token in written:  # one token a step, as the decoder moves a row
            rows.advance([token])
        return [tiny_tokenizer.decode(written + [t])[len('{"name": '):] for t in rows.allowed()[0].tolist()]

    allowed = next_texts('{"name": "The P')
    assert any(a.startswith('"The Pu') for a in allowed)  # the name goes on
    assert all(a[1:].split('"')[0] in sentence for a in allowed), allowed
    assert not any(a.startswith('"The P"') for a in allowed)  # not cut inside a word
    assert any(a.startswith('"The Punter"') for a in next_texts('{"name": "The Punter'))


def test_many_optional_fields_in_any_order_never_repeat_a_key_when_decoded(wild_model, tiny_tokenizer, tmp_path):
    """SNIPS-shaped targets: an intent and up to 39 optional slots in sentence order, so no one
    order; the targets are rewritten in one and the format allows each key once."""
    import random

    import pandas as pd

    from databricks_llm.generation import generate

    rng = random.Random(0)
    slots = [f"slot_{i}" for i in range(39)]
    rows = [{"text": f"query {i}", "label": json.dumps(
        {"intent": rng.choice(["Play", "Book"]), **{s: f"v{rng.randrange(99)}" for s in rng.sample(slots, 4)}})}
        for i in range(200)]
    pd.DataFrame(rows).to_json(tmp_path / "train.jsonl", orient="records", lines=True)
    splits, task = data.load(str(tmp_path))
    assert not Schema.from_json(task.schema).ordered
    for text in generate(wild_model, tiny_tokenizer, splits["test"][data.INPUT][:8], task=task, max_tokens=80):
        keys = re.findall(r'"([^"]+)": ', text)
        assert len(keys) == len(set(keys)), text
