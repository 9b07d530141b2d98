"""Preference data for building and judging steering vectors: (prompt, preferred answer, dispreferred answer).

Two file formats: JSON Lines with exactly the fields ``prompt``, ``preferred`` and ``dispreferred`` per line,
and the TruthfulQA CSV (``Question``, ``Best Answer``, ``Correct Answers``, ``Incorrect Answers`` with answers
separated by ``; ``), whose triple is the question in a prompt template, the best answer and the first
incorrect answer (the binary form GrAInS uses). Row ranges select a split (``0-199``: rows 0 to 199).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from steering.errors import InvalidRequestError

DEFAULT_QA_TEMPLATE = "Q: {question}\nA:"


@dataclass(frozen=True)
class PreferenceExample:
    prompt: str
    preferred: str
    dispreferred: str


@dataclass(frozen=True)
class TruthfulQAItem:
    question: str
    best: str
    correct: tuple[str, ...]
    incorrect: tuple[str, ...]

    def preference(self, template: str = DEFAULT_QA_TEMPLATE) -> PreferenceExample:
        return PreferenceExample(template.format(question=self.question), self.best, self.incorrect[0])


def parse_rows(spec: str | None, total: int) -> list[int]:
    """``None``: all rows; ``"a-b"`` (inclusive), ``"a:b"`` (exclusive end) or ``"a,b,c"``."""
    if not spec:
        return list(range(total))
    out: list[int] = []
    try:
        for part in spec.split(","):
            part = part.strip()
            if "-" in part:
                a, b = (int(x) for x in part.split("-", 1))
                out.extend(range(a, b + 1))
            elif ":" in part:
                a, b = (int(x) for x in part.split(":", 1))
                out.extend(range(a, b))
            elif part:
                out.append(int(part))
    except ValueError:
        raise InvalidRequestError(f"bad row range {spec!r}; use e.g. '0-49' or '0:50' or '1,5,9'",
                                     param="rows") from None
    bad = [r for r in out if not 0 <= r < total]
    if bad:
        raise InvalidRequestError(f"rows {bad[:5]} are out of range; the file has {total} rows", param="rows")
    return out


def read_truthfulqa(path: str | os.PathLike) -> list[TruthfulQAItem]:
    items = []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = {"Question", "Best Answer", "Incorrect Answers"} - set(reader.fieldnames or [])
        if missing:
            raise InvalidRequestError(f"{path}: not a TruthfulQA CSV, missing columns {sorted(missing)}",
                                         param="data")
        for n, row in enumerate(reader):
            split = lambda s: tuple(a.strip() for a in (s or "").split(";") if a.strip())  # noqa: E731
            incorrect = split(row["Incorrect Answers"])
            if not row["Question"].strip() or not row["Best Answer"].strip() or not incorrect:
                raise InvalidRequestError(f"{path}: row {n} lacks a question, best answer or incorrect answer",
                                             param="data")
            items.append(TruthfulQAItem(row["Question"].strip(), row["Best Answer"].strip(),
                                        split(row.get("Correct Answers")), incorrect))
    return items


def read_jsonl(path: str | os.PathLike) -> list[PreferenceExample]:
    out = []
    fields = {"prompt", "preferred", "dispreferred"}
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidRequestError(f"{path}:{n}: not JSON: {exc.msg}", param="data") from None
            if not isinstance(obj, dict) or set(obj) != fields:
                got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                raise InvalidRequestError(f"{path}:{n}: each line needs exactly the fields {sorted(fields)}; "
                                             f"got {got}", param="data")
            if not all(isinstance(obj[f], str) and obj[f] for f in fields):
                raise InvalidRequestError(f"{path}:{n}: prompt, preferred and dispreferred must be non-empty "
                                             "strings", param="data")
            out.append(PreferenceExample(obj["prompt"], obj["preferred"], obj["dispreferred"]))
    return out


def load_examples(path: str | os.PathLike, rows: str | None = None,
                  template: str = DEFAULT_QA_TEMPLATE) -> list[PreferenceExample]:
    """Read a ``.jsonl`` preference file or a TruthfulQA ``.csv``, then keep ``rows``."""
    p = Path(path)
    if not p.is_file():
        raise InvalidRequestError(f"data file not found: {p}", param="data")
    if p.suffix.lower() == ".csv":
        examples = [item.preference(template) for item in read_truthfulqa(p)]
    else:
        examples = read_jsonl(p)
    if not examples:
        raise InvalidRequestError(f"{p}: no examples", param="data")
    return [examples[i] for i in parse_rows(rows, len(examples))]


def dataset_hash(examples: list[PreferenceExample]) -> str:
    """sha256 of the examples' canonical JSON: two builds from the same data carry the same hash."""
    blob = json.dumps([asdict(e) for e in examples], ensure_ascii=False, sort_keys=True).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()
