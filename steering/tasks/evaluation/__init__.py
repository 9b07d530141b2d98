"""Evaluation: TruthfulQA MC1/MC2/binary (:mod:`.truthfulqa`) and the steering effect on generation with a
pluggable behaviour scorer, fluency and diversity (:mod:`.steer`, :mod:`.scorers`), compared across named
conditions beside the unsteered model (:mod:`.conditions`), reported as JSON and Markdown (:mod:`.report`)."""

from steering.tasks.evaluation.api import PreparedTruthfulQA, TruthfulQARequest, evaluate_truthfulqa, prepare_truthfulqa
from steering.tasks.evaluation.conditions import (
    UNSTEERED,
    Condition,
    condition,
    label_for,
    relative_applications,
    sweep_choice,
)
from steering.tasks.evaluation.report import EvaluationReport
from steering.tasks.evaluation.scorers import SCORERS, Scorer, distinct_n, get_scorer, register, scorer_names
from steering.tasks.evaluation.steer import PreparedSteer, SteerEvalRequest, prepare_steer, start_steer
from steering.tasks.evaluation.truthfulqa import QAFormat, check_format

__all__ = [
    "SCORERS", "UNSTEERED", "Condition", "condition", "EvaluationReport", "PreparedSteer", "PreparedTruthfulQA",
    "QAFormat", "check_format",
    "Scorer", "SteerEvalRequest", "TruthfulQARequest", "distinct_n", "evaluate_truthfulqa", "get_scorer",
    "label_for", "prepare_steer", "prepare_truthfulqa", "register", "relative_applications", "scorer_names",
    "start_steer", "sweep_choice",
]
