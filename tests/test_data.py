"""Dataset loading in every supported layout, the prompt format and label masking."""

from __future__ import annotations

import json

import datasets
import pandas as pd
import pytest
import torch

from conftest import SHARED_E2E
from databricks_llm import data, sample_data
from databricks_llm.errors import InputError
from databricks_llm.task import E2E, E2E_INSTRUCTION, Task

ROWS = sample_data.generate(30, seed=7)
PAIRS = [{data.INPUT: r["sentence"], data.OUTPUT: r["mr"]} for r in ROWS]


def splits_of(*args, **kwargs) -> datasets.DatasetDict:
    return data.load(*args, **kwargs)[0]


def test_embedded_sample_has_three_nonempty_splits():
    ds = splits_of(data.EMBEDDED_DATASET)
    assert {k: len(v) for k, v in ds.items()} == {"train": 400, "validation": 50, "test": 50}
    assert ds["train"][0]["output"].startswith("name[")


def test_embedded_sample_is_seeded():
    assert sample_data.generate(5, seed=3) == sample_data.generate(5, seed=3)
    assert sample_data.generate(5, seed=3) != sample_data.generate(5, seed=4)


def test_single_csv_with_original_columns_gets_seeded_validation_holdout(tmp_path):
    pd.DataFrame(ROWS).to_csv(tmp_path / "rows.csv", index=False)
    ds = splits_of(str(tmp_path / "rows.csv"), validation_fraction=0.2, seed=1)
    assert (len(ds["train"]), len(ds["validation"])) == (24, 6)
    assert ds["test"]["output"] == ds["validation"]["output"]
    assert splits_of(str(tmp_path / "rows.csv"), validation_fraction=0.2, seed=1)["validation"]["output"] == ds["validation"]["output"]


def test_jsonl_with_hub_column_names(tmp_path):
    with open(tmp_path / "train.jsonl", "w") as f:
        for r in ROWS:
            f.write(json.dumps({"meaning_representation": r["mr"], "human_reference": r["sentence"]}) + "\n")
    ds = splits_of(str(tmp_path / "train.jsonl"))
    assert ds["train"].column_names == ["input", "output"]
    assert len(ds["train"]) + len(ds["validation"]) == 30


def test_folder_of_parquet_files_maps_split_names(tmp_path):
    for name, part in [("trainset", ROWS[:20]), ("devset", ROWS[20:25]), ("testset_w_refs", ROWS[25:])]:
        pd.DataFrame(part).to_parquet(tmp_path / f"{name}.parquet")
    ds = splits_of(str(tmp_path))
    assert {k: len(v) for k, v in ds.items()} == {"train": 20, "validation": 5, "test": 5}


def test_save_to_disk_folder(tmp_path):
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list([{"meaning_representation": r["mr"], "human_reference": r["sentence"]} for r in ROWS[:20]]),
        "validation": datasets.Dataset.from_list(ROWS[20:]),
    }).save_to_disk(str(tmp_path / "saved"))
    ds = splits_of(str(tmp_path / "saved"))
    assert (len(ds["train"]), len(ds["validation"]), len(ds["test"])) == (20, 10, 10)


@pytest.mark.skipif(not SHARED_E2E.exists(), reason="shared E2E data not present")
def test_real_cleaned_e2e_folder_reads_all_rows():
    ds = splits_of(str(SHARED_E2E / "cleaned"))
    assert {k: len(v) for k, v in ds.items()} == {"train": 33525, "validation": 4299, "test": 4693}


def test_missing_columns_are_named_in_the_error(tmp_path):
    pd.DataFrame({"body": ["a"], "fields": ["b"]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(InputError, match=r"found: body, fields\); name them with --input_column and --output_column"):
        splits_of(str(tmp_path / "bad.csv"))


def test_rows_with_empty_text_or_mr_are_skipped_and_counted(tmp_path, logged):
    rows = ROWS[:10] + [{"mr": "", "sentence": "x"}, {"mr": "name[A]", "sentence": None}]
    pd.DataFrame(rows).to_csv(tmp_path / "rows.csv", index=False)
    ds = splits_of(str(tmp_path / "rows.csv"), validation_fraction=0.2)
    assert len(ds["train"]) + len(ds["validation"]) == 10
    assert "skipped 2 rows" in logged.text


def test_empty_dataset_is_refused(tmp_path):
    (tmp_path / "empty.csv").write_text("mr,ref\n")
    with pytest.raises(InputError, match="empty"):
        splits_of(str(tmp_path / "empty.csv"))


def test_non_utf8_file_is_refused(tmp_path):
    (tmp_path / "latin.csv").write_bytes("mr,ref\nname[Café],Café\n".encode("latin-1"))
    with pytest.raises(InputError, match="not valid UTF-8"):
        splits_of(str(tmp_path / "latin.csv"))


def test_number_columns_are_read_as_text(tmp_path):
    pd.DataFrame({"mr": [1, 2, 3, 4], "ref": [10, 20, 30, 40]}).to_parquet(tmp_path / "train.parquet")
    splits = splits_of(str(tmp_path / "train.parquet"), validation_fraction=0.25)
    assert sorted([*splits["train"]["output"], *splits["validation"]["output"]]) == ["1", "2", "3", "4"]


def test_a_device_file_is_refused_before_it_is_read():
    with pytest.raises(InputError, match="not a regular file or folder"):
        data.check_source("/dev/zero")


def test_missing_path_is_refused():
    with pytest.raises(InputError, match="does not exist"):
        splits_of("./no/such/data.csv")


def test_prompt_uses_chat_template_and_contains_sentence(tiny_tokenizer):
    (prompt,) = data.build_prompts(tiny_tokenizer, ["  Aromi is a pub. "])
    assert prompt == (f"<|im_start|>system\n{E2E_INSTRUCTION}<|im_end|>\n"
                      "<|im_start|>user\nAromi is a pub.<|im_end|>\n<|im_start|>assistant\n")


def test_prompt_without_chat_template_uses_plain_format(tiny_tokenizer):
    plain = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    plain.chat_template = None
    (prompt,) = data.build_prompts(plain, ["Aromi is a pub."])  # E2E as saved before tasks were: v2
    assert prompt.startswith(plain.bos_token + "### Instruction:")
    assert prompt.endswith("### Meaning representation:\n")
    (prompt,) = data.build_prompts(plain, ["Aromi is a pub."], Task(instruction="Find the name."))
    assert prompt == f"{plain.bos_token}### Instruction:\nFind the name.\n\n### Input:\nAromi is a pub.\n\n### Output:\n"


def test_labels_mask_prompt_and_learn_eos(tiny_tokenizer):
    ds = datasets.DatasetDict({"train": datasets.Dataset.from_list(PAIRS[:3])})
    row = data.tokenize_splits(ds, tiny_tokenizer, max_seq_length=512, task=E2E)["train"][0]
    (prompt_ids,) = data.encode_prompts(tiny_tokenizer, [ROWS[0]["sentence"]])
    n = len(prompt_ids)
    assert row["input_ids"][:n] == prompt_ids
    assert row["labels"][:n] == [-100] * n
    assert row["labels"][n:] == row["input_ids"][n:]
    assert row["labels"][-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.decode(row["labels"][n:-1]) == ROWS[0]["mr"]


def test_max_seq_length_shorter_than_prompt_is_refused(tiny_tokenizer):
    ds = datasets.DatasetDict({"train": datasets.Dataset.from_list(PAIRS[:3])})
    with pytest.raises(InputError, match="max_seq_length=8 is too small"):
        data.tokenize_splits(ds, tiny_tokenizer, max_seq_length=8, task=E2E)


def test_pad_batch_pads_to_longest_row_only():
    batch = data.pad_batch([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                            {"input_ids": [5], "labels": [5]}], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]


def test_target_logits_only_left_pads_and_keeps_the_positions_that_predict_targets():
    batch = data.pad_batch([{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]},
                            {"input_ids": [5, 6, 7], "labels": [-100, -100, 7]}], pad_token_id=0, target_logits_only=True)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [0, 5, 6, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3], [0, 0, 1, 2]]
    assert batch["logits_to_keep"].tolist() == [1, 2, 3]  # position 1 predicts the first target token of row 0
    assert batch["labels"].tolist() == [[-100, 7, 8], [-100, -100, 7]]


def test_target_logits_only_gives_the_same_loss_and_gradients(tiny_model, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    ds = datasets.DatasetDict({"train": datasets.Dataset.from_list(PAIRS[:4])})
    rows = list(data.tokenize_splits(ds, tiny_tokenizer, max_seq_length=256, task=E2E)["train"])
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    results = []
    for target_logits_only in (False, True):
        model.zero_grad()
        batch = data.pad_batch(rows, tiny_tokenizer.pad_token_id, target_logits_only=target_logits_only)
        out = model(**batch)
        assert out.logits.shape[1] == len(batch.get("logits_to_keep", batch["input_ids"][0]))
        out.loss.backward()
        results.append((out.loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])))
    (plain_loss, plain_grads), (kept_loss, kept_grads) = results
    assert kept_loss == pytest.approx(plain_loss, rel=1e-5)
    torch.testing.assert_close(kept_grads, plain_grads, rtol=1e-4, atol=1e-6)


def test_collator_asks_for_target_logits_only_when_the_model_can_skip_the_rest(tiny_model, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    class NoLogitsToKeep(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, labels=None):
            raise AssertionError("not called")

    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5, 6], "labels": [-100, 6]}]
    llama = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert "logits_to_keep" in data.collator(llama, tiny_tokenizer)(rows)
    assert "logits_to_keep" not in data.collator(NoLogitsToKeep(), tiny_tokenizer)(rows)
