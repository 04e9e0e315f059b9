"""A test double of Databricks' `dbutils`: the documented widgets, job task values and library calls.

Only a Databricks workspace has the real one (no workspace was used for these tests). Task values
live in a JSON file so that the notebooks of a chain, each in its own kernel, share them as the
tasks of one job do. `in_job=False` behaves as a notebook run interactively: `get` returns
`debugValue` and `set` is ignored.
"""

from __future__ import annotations

import json
from pathlib import Path


class Widgets:
    def __init__(self, values: dict[str, str]) -> None:
        self.values, self.created = values, {}

    def text(self, name: str, defaultValue: str, label: str | None = None) -> None:
        self.created[name] = defaultValue

    def get(self, name: str) -> str:
        return self.values.get(name, self.created[name])


class TaskValues:
    def __init__(self, store: Path, task: str, in_job: bool) -> None:
        self.store, self.task, self.in_job = store, task, in_job

    def _load(self) -> dict:
        return json.loads(self.store.read_text()) if self.store.exists() else {}

    def set(self, key: str, value: object) -> None:
        if self.in_job:
            data = self._load()
            data.setdefault(self.task, {})[key] = value
            self.store.write_text(json.dumps(data))

    def get(self, taskKey: str, key: str, default: object = None, debugValue: object = None) -> object:
        if not self.in_job:
            return debugValue
        return self._load().get(taskKey, {}).get(key, default)


class Jobs:
    def __init__(self, task_values: TaskValues) -> None:
        self.taskValues = task_values


class Library:
    def __init__(self) -> None:
        self.restarts = 0

    def restartPython(self) -> None:
        self.restarts += 1


class DBUtils:
    def __init__(self, widgets: dict[str, str] | None = None, store: Path | None = None, task: str = "task",
                 in_job: bool = True) -> None:
        self.widgets = Widgets(widgets or {})
        self.jobs = Jobs(TaskValues(store or Path("task_values.json"), task, in_job))
        self.library = Library()
