"""The slot-filling literature's metrics for span tasks (`Task.spans_column`), over parsed frames.

A frame is the JSON object of one row (see `spans`): its label columns (such as ``intent``) and
its slots, a slot given twice holding a list.

- `<label>_accuracy`: the share of rows whose label column is right (intent accuracy);
- `slot_precision`, `slot_recall`, `slot_f1`: micro-averaged over (slot, value) pairs, every
  occurrence counted (a list value counts each element), values compared with case and spaces
  normalised (the literature's copy of SNIPS is lower-cased); the literature's span F1 whenever
  a value occurs once in its sentence;
- `frame_accuracy`: the share of rows with every label and every slot right;
- a per-slot precision/recall/F1/support table.

An output that is not one JSON object has no slots and gets every label wrong.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from databricks_llm.scoring import normal as _value, parse_json, precision_recall_f1 as _prf
from databricks_llm.task import Task

PER_SLOT_COLUMNS = ("slot", "precision", "recall", "f1", "support")


def slot_pairs(frame: dict | None, labels: list[str]) -> Counter:
    """The (slot, normalised value) pairs of a frame, each occurrence counted."""
    found: Counter = Counter()
    for key, value in (frame or {}).items():
        if key not in labels:
            found.update((key, _value(v)) for v in (value if isinstance(value, list) else [value]))
    return found


def frame_scores(predictions: list[dict | None], references: list[dict], labels: list[str]) -> dict[str, Any]:
    """Label accuracies, slot precision/recall/F1, frame accuracy and the per-slot table of
    `predictions` (parsed frames, None where an output did not parse) against `references`."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    n = len(references)
    right = Counter()
    counts: dict[str, Counter] = {}
    frames = 0
    for prediction, reference in zip(predictions, references):
        labels_right = True
        for label in labels:
            ok = prediction is not None and label in prediction and _value(prediction[label]) == _value(reference.get(label))
            right[label] += ok
            labels_right &= ok
        pred, ref = slot_pairs(prediction, labels), slot_pairs(reference, labels)
        for kind, counted in (("tp", pred & ref), ("fp", pred - ref), ("fn", ref - pred)):
            for (slot, _), count in counted.items():
                counts.setdefault(slot, Counter())[kind] += count
        frames += labels_right and pred == ref
    total = sum(counts.values(), Counter())
    precision, recall, f1 = _prf(total["tp"], total["fp"], total["fn"])
    per_slot = {slot: (*_prf(c["tp"], c["fp"], c["fn"]), c["tp"] + c["fn"]) for slot, c in sorted(counts.items())}
    return {"label_accuracy": {label: right[label] / n if n else 0.0 for label in labels},
            "slot_precision": precision, "slot_recall": recall, "slot_f1": f1,
            "frame_accuracy": frames / n if n else 0.0, "per_slot": per_slot}


def task_scores(task: Task, predictions: list[str], references: list[str]) -> dict[str, Any]:
    """`frame_scores` of output texts under `{"frame": ...}` for a span task; {} for other tasks."""
    if not task.spans_column:
        return {}
    labels = [c for c in (task.label_columns or "").split(",") if c]
    return {"frame": frame_scores([parse_json(p) for p in predictions], [parse_json(r) or {} for r in references], labels)}


def metric_dict(scores: dict[str, Any], prefix: str) -> dict[str, float]:
    """MLflow metrics of `task_scores`' result: `<label>_accuracy`, `slot_precision`, `slot_recall`,
    `slot_f1`, `frame_accuracy` (none when it holds no frame scores)."""
    frame = scores.get("frame")
    if not frame:
        return {}
    metrics = {f"{prefix}{label}_accuracy": v for label, v in frame["label_accuracy"].items()}
    metrics.update({f"{prefix}{k}": frame[k] for k in ("slot_precision", "slot_recall", "slot_f1", "frame_accuracy")})
    return metrics


def per_slot_table(scores: dict[str, Any]) -> dict[str, list]:
    """The per-slot table as columns, for `mlflow.log_table`."""
    rows = [(slot, *values) for slot, values in scores["frame"]["per_slot"].items()]
    return {name: [row[i] for row in rows] for i, name in enumerate(PER_SLOT_COLUMNS)}


def summary_lines(scores: dict[str, Any], worst: int = 8) -> list[str]:
    """The frame scores in a few lines, with the slots of lowest F1 (most frequent first on ties)."""
    frame = scores.get("frame")
    if not frame:
        return []
    labels = ", ".join(f"{label} accuracy {v:.3f}" for label, v in frame["label_accuracy"].items())
    lines = [f"frames: {labels + ', ' if labels else ''}slot F1 {frame['slot_f1']:.3f} "
             f"(P {frame['slot_precision']:.3f}, R {frame['slot_recall']:.3f}), frame accuracy {frame['frame_accuracy']:.3f}"]
    lowest = sorted(frame["per_slot"].items(), key=lambda item: (item[1][2], -item[1][3]))[:worst]
    if lowest:
        lines.append("lowest slot F1: " + "; ".join(f"{slot} {f1:.2f} (n={n})" for slot, (_, _, f1, n) in lowest))
    return lines
