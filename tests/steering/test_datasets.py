"""Preference data files (JSON Lines, TruthfulQA CSV) and row ranges."""

from __future__ import annotations

import json

import pytest

from steering.datasets import PreferenceExample, dataset_hash, load_examples, parse_rows
from steering.errors import InvalidRequestError
from tests.tiny import EXAMPLES


def test_data_files(tmp_path):
    good = tmp_path / "d.jsonl"
    good.write_text("\n".join(json.dumps(e.__dict__) for e in EXAMPLES) + "\n\n")
    assert load_examples(good) == EXAMPLES and load_examples(good, "1-2") == EXAMPLES[1:3]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "preferred": "b", "disprefered": "c"}) + "\n")
    with pytest.raises(InvalidRequestError, match="bad.jsonl:1: each line needs exactly"):
        load_examples(bad)
    csv_path = tmp_path / "tqa.csv"
    csv_path.write_text('Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source\n'
                        'Adversarial,Misc,Is the sky green?,No,"No; It is blue","Yes; Always",x\n')
    (ex,) = load_examples(csv_path)
    assert ex == PreferenceExample("Q: Is the sky green?\nA:", "No", "Yes")
    assert parse_rows("0-2,5", 10) == [0, 1, 2, 5] and parse_rows("3:5", 10) == [3, 4]
    with pytest.raises(InvalidRequestError, match="out of range"):
        parse_rows("0-20", 10)
    assert dataset_hash(EXAMPLES) == dataset_hash(list(EXAMPLES)) != dataset_hash(EXAMPLES[:2])
