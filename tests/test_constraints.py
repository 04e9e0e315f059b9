"""Structured decoding: the format learned from the training targets, and outputs held to it."""

from __future__ import annotations

import json
import re

import pytest

from databricks_llm import constraints, data
from databricks_llm.constraints import E2E_SCHEMA, Schema, pattern, schema_of
from databricks_llm.scoring import E2E_SLOTS, parse_mr
from databricks_llm.task import E2E


@pytest.fixture(scope="module")
def tickets():
    return data.load("embedded:support-tickets")


def matches(output_format: str, schema: Schema, text: str) -> bool:
    return re.fullmatch(pattern(output_format, schema), text) is not None


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


def test_targets_in_two_orders_allow_any_order():
    schema = schema_of("slots", ["a[1], b[2]", "b[3], a[4]"])
    assert not schema.ordered and matches("slots", schema, "b[1], a[2]")
    assert not schema_of("slots", ["a[1], b[2]", "b[1], c[2]", "c[1], a[2]"]).ordered  # a cycle through three


def test_targets_that_never_disagree_keep_one_order():
    schema = schema_of("slots", ["a[1], b[2]", "b[1], c[2]", "a[3]"])
    assert schema.ordered and schema.fields == ("a", "b", "c")


def test_nested_json_targets_have_no_expression_but_still_a_json_constraint():
    schema = schema_of("json", ['{"a": {"b": 1}}', '{"a": {"b": 2}}'])
    assert dict(schema.kinds) == {"a": "nested"} and pattern("json", schema) is None


def test_models_saved_before_schemas_get_e2e_s_schema():
    assert constraints.task_schema(E2E) == E2E_SCHEMA


def test_text_tasks_have_nothing_to_enforce(tiny_tokenizer):
    from databricks_llm.task import Task

    assert constraints.for_task(tiny_tokenizer, Task(output_format="text", instruction="Summarise.")) is None


def test_the_format_reads_each_piece_of_an_output_as_the_tokenizer_decodes_it(tiny_tokenizer):
    decoder = constraints._tokenizer_data(tiny_tokenizer).decoder
    for text in ("name[The Punter], near[Café Sicilia]", "near[Café Sicilia], name[The Punter]"):
        ids = tiny_tokenizer.encode(text, add_special_tokens=False)  # the same pieces, read in another order
        for end in range(1, len(ids) + 1):
            expected = tiny_tokenizer.decode(ids[:end]).rstrip("\ufffd")  # a character cut in two reads as nothing yet
            assert decoder(ids[:end]) == expected
            assert decoder(ids[:end]) == expected  # kept: the second reading is the first's


def test_every_training_target_as_the_tokenizer_writes_it_is_a_path_through_the_format(tiny_tokenizer):
    splits, task = data.load("embedded:e2e-sample")
    walk = constraints.for_task(tiny_tokenizer, task).format.walk()
    closing = tiny_tokenizer.convert_tokens_to_ids("],")  # ends a name and starts the next field: one token
    walked_through_closing = 0
    for target in splits["train"][data.OUTPUT][:50]:
        ids = tiny_tokenizer.encode(target, add_special_tokens=False)
        for end, token in enumerate(ids):
            assert token in walk(tuple(ids[:end])), (target, tiny_tokenizer.decode(ids[:end + 1]))
        walked_through_closing += closing in ids
        assert tiny_tokenizer.eos_token_id in walk(tuple(ids))  # and it may end there
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
    pieces = constraints._token_bytes(tokenizer)
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
    schema = schema_of("slots", targets, inputs)
    assert schema.copied == ("name",)  # near: 1 of 2 values is not in its input
    assert Schema.from_json(schema.to_json()) == schema
    assert schema_of("slots", targets).copied == ()  # no inputs, nothing known
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
    import torch

    from databricks_llm.task import Task

    _, task = data.load("embedded:e2e-sample", Task(output_format="json"))
    assert Schema.from_json(task.schema).copied == ("name", "near")
    sentence = "Near Avalon is The Punter, a pub."
    prompt = data.encode_prompts(tiny_tokenizer, [sentence], task)[0]

    def next_texts(text: str) -> list[str]:  # the value so far and each allowed next token, as they read
        written = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
        processor = constraints.for_task(tiny_tokenizer, task).processor(len(prompt))
        for step in range(len(written) + 1):  # as generate calls it: one token more each time
            scores = processor(torch.tensor([prompt + written[:step]]), torch.zeros(1, len(tiny_tokenizer)))
        return [tiny_tokenizer.decode(written + [t])[len('{"name": '):] for t in torch.nonzero(scores[0] == 0).flatten()]

    allowed = next_texts('{"name": "The P')
    assert any(a.startswith('"The Pu') for a in allowed)  # the name goes on
    assert all(a[1:].split('"')[0] in sentence for a in allowed), allowed
    assert not any(a.startswith('"The P"') for a in allowed)  # not cut inside a word
    assert any(a.startswith('"The Punter"') for a in next_texts('{"name": "The Punter'))


def test_the_narrow_view_of_a_step_is_the_whole_vocabulary_mask_over_the_only_tokens_allowed(
        wild_model, tiny_tokenizer, monkeypatch):
    import torch

    from databricks_llm import constraints as module
    from databricks_llm.generation import generate

    _, task = data.load("embedded:e2e-sample")
    steps = []
    choices = module._FormatProcessor.choices

    def spy(self, ids, *args, **kwargs):
        steps.append((self, ids.clone()))
        return choices(self, ids, *args, **kwargs)

    monkeypatch.setattr(module._FormatProcessor, "choices", spy)
    inputs = [row["sentence"] for row in data.sample_data.generate(10, seed=3)]
    generate(wild_model, tiny_tokenizer, inputs, task=task, max_tokens=40, structured=True)
    vocabulary = wild_model.get_output_embeddings().weight.shape[0]
    narrowed = 0
    for processor, ids in steps:
        tokens, narrow = choices(processor, ids, vocabulary, at_most=vocabulary)
        none, dense = choices(processor, ids, vocabulary, at_most=0)
        assert none is None and dense.shape == (len(ids), vocabulary)
        if tokens is None:
            continue
        narrowed += 1
        assert torch.equal(narrow, dense[:, tokens])
        outside = torch.ones(vocabulary, dtype=torch.bool)
        outside[tokens] = False
        assert dense[:, outside].all()  # no row may take a token outside the narrow view
    assert narrowed == len(steps) > 10
