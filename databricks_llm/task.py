"""The extraction task: which columns hold input and target, the instruction, the output format.

The user gives it (`--input_column`, `--output_column`, `--instruction`, `--output_format`, or
nothing: detected from the data); the job resolves it once the data is read, saves it as
`extraction_task.json` next to every checkpoint and the final model, and the pyfunc model and
`evaluate` read it from there. A model without the file is the E2E task it was trained on.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from databricks_llm.errors import InputError
from databricks_llm.formats import FORMATS

TASK_FILE = "extraction_task.json"
# v2: the E2E prompt of models logged before tasks were saved; v3: the same chat-template prompt,
# with generic section names (`### Input:`/`### Output:`) for tokenizers without a template.
LEGACY_PROMPT_VERSION, PROMPT_VERSION = "v2", "v3"
E2E_INSTRUCTION = ("Extract the meaning representation of the restaurant description as comma-separated "
                   "slot[value] pairs.")
E2E_JSON_INSTRUCTION = ("Extract the meaning representation of the restaurant description as one JSON object "
                        "mapping each slot to its value.")
E2E_INSTRUCTIONS = {"slots": E2E_INSTRUCTION, "json": E2E_JSON_INSTRUCTION}
MAX_INSTRUCTION_CHARS = 4000


@dataclass(frozen=True)
class Task:
    """One extraction task. As flags, None means: detect from the data (see `data.load`)."""

    input_column: str | None = field(default=None, metadata={"help": "Column with the model's input text (default: detected: sentence/ref, prompt, input, text; or a chat `messages` column)."})
    output_column: str | None = field(default=None, metadata={"help": "Column with the target output (default: detected: mr, completion, output, label)."})
    instruction: str | None = field(default=None, metadata={"help": "The instruction given with every input, or @path to a UTF-8 file holding it (default: the dataset's, else one per output format)."})
    output_format: str | None = field(default=None, metadata={"help": "slots (key[value], ...), json (one JSON object) or text (default: detected from the training targets); see databricks_llm.formats."})
    prompt_version: str = field(default=PROMPT_VERSION, metadata={"help": "Prompt layout version (set by the job; v2 reproduces models logged before tasks were saved)."})
    spans_column: str | None = field(default=None, metadata={"help": "Column with each row's labelled spans of the input text ({start, end, label}, {slot, value} or [start, end, label]); the target becomes a JSON object of them (default: detected; see docs/spans.md)."})
    label_columns: str | None = field(default=None, metadata={"help": "With spans: comma-separated sentence-level label columns (e.g. intent) put first in the target; empty for none (default: detected, columns of few distinct short texts)."})
    schema: str | None = field(default=None, metadata={"help": "The targets' fields, their order and closed values, as JSON (set by the job from the training targets; structured decoding follows it)."})

    def checked(self) -> Task:
        """This task with an `@path` instruction read, and the format and instruction checked."""
        instruction = self.instruction
        if instruction is not None and instruction.startswith("@"):
            path = Path(instruction[1:])
            if not path.is_file():
                raise InputError(f"--instruction {instruction}: no such file")
            try:
                instruction = path.read_text(encoding="utf-8").strip()
            except UnicodeDecodeError:
                raise InputError(f"--instruction {instruction}: the file is not UTF-8 text") from None
        if instruction is not None and not instruction.strip():
            raise InputError("--instruction is empty")
        if instruction is not None and len(instruction) > MAX_INSTRUCTION_CHARS:
            raise InputError(f"--instruction has {len(instruction)} characters; at most {MAX_INSTRUCTION_CHARS}")
        if self.output_format is not None and self.output_format not in FORMATS:
            raise InputError(f"--output_format must be one of {', '.join(FORMATS)} (got {self.output_format})")
        if self.prompt_version not in (LEGACY_PROMPT_VERSION, PROMPT_VERSION):
            raise InputError(f"--prompt_version must be {LEGACY_PROMPT_VERSION} or {PROMPT_VERSION}")
        return dataclasses.replace(self, instruction=instruction)

    def overridden_by(self, other: Task) -> Task:
        """This task with the fields `other` sets (flags given on top of a saved task)."""
        given = {f.name: getattr(other, f.name) for f in dataclasses.fields(other)
                 if f.name != "prompt_version" and getattr(other, f.name) is not None}
        return dataclasses.replace(self, **given)

    def to_dict(self) -> dict[str, str | None]:
        return dataclasses.asdict(self)

    def params(self) -> dict[str, str | None]:
        """The task as MLflow params: all but the schema (it can outgrow a param's size; it is in
        the model's files and metadata)."""
        return {k: v for k, v in self.to_dict().items() if k != "schema"}

    def save(self, folder: str | Path) -> None:
        """Write the task next to a model's files (`TASK_FILE`)."""
        (Path(folder) / TASK_FILE).write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def from_dict(cls, saved: dict) -> Task:
        """A saved task (keys this version does not know are ignored), checked."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in known}).checked()

    @classmethod
    def of_model(cls, folder: str | Path | None) -> Task:
        """The task saved with a model, or E2E's for models saved before tasks were (and base models)."""
        path = Path(folder) / TASK_FILE if folder else None
        if path is None or not path.is_file():
            return E2E
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, TypeError, AttributeError, InputError) as err:
            raise InputError(f"{path} is not a valid task file: {err}") from None


E2E = Task(input_column="sentence", output_column="mr", instruction=E2E_INSTRUCTION, output_format="slots",
           prompt_version=LEGACY_PROMPT_VERSION)
