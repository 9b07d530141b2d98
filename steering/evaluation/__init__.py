"""Evaluation: TruthfulQA MC1/MC2/binary (:mod:`.truthfulqa`) and the steering effect on generation with a
pluggable behaviour scorer, fluency and diversity (:mod:`.steer`, :mod:`.scorers`), compared across named
conditions beside the unsteered model (:mod:`.conditions`), reported as JSON and Markdown (:mod:`.report`)."""

from steering.evaluation.api import PreparedTruthfulQA, TruthfulQARequest, evaluate_truthfulqa, prepare_truthfulqa
from steering.evaluation.conditions import UNSTEERED, Condition, label_for, relative_applications, sweep_choice
from steering.evaluation.report import EvaluationReport
from steering.evaluation.scorers import SCORERS, Scorer, distinct_n, get_scorer, register, scorer_names
from steering.evaluation.steer import PreparedSteer, SteerEvalRequest, prepare_steer, start_steer
from steering.evaluation.truthfulqa import QAFormat

__all__ = [
    "SCORERS", "UNSTEERED", "Condition", "EvaluationReport", "PreparedSteer", "PreparedTruthfulQA", "QAFormat",
    "Scorer", "SteerEvalRequest", "TruthfulQARequest", "distinct_n", "evaluate_truthfulqa", "get_scorer",
    "label_for", "prepare_steer", "prepare_truthfulqa", "register", "relative_applications", "scorer_names",
    "start_steer", "sweep_choice",
]
