"""Evaluations as jobs: TruthfulQA (an engine job: scoring only) and the steering effect on generation (a
thread job: :mod:`.steer`). Both validate everything before any model work and return an
:class:`~steering.tasks.evaluation.report.EvaluationReport`."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from steering.datasets import TruthfulQAItem
from steering.engine.base import ModelFront
from steering.engine.jobs import JobContext
from steering.errors import InvalidRequestError
from steering.multimodal import ImageLimits
from steering.spec import uses_images
from steering.tasks.evaluation.conditions import Condition, with_baseline
from steering.tasks.evaluation.report import Column, ConditionResult, EvaluationReport, mean_se, paired
from steering.tasks.evaluation.truthfulqa import (
    METRICS,
    EncodedQuestion,
    QAFormat,
    encode_questions,
    items_hash,
    truthfulqa_work,
)

if TYPE_CHECKING:
    from steering.backends.hf.loading import LoadedModel


@dataclass
class TruthfulQARequest:
    items: list[TruthfulQAItem]
    conditions: list[Condition]
    """Steered conditions; the unsteered baseline is added first."""
    format: QAFormat = QAFormat()
    source: dict | None = None
    """Where the items came from (path, rows), recorded in the report."""
    per_question: bool = False
    """Keep every question's scores in the report."""


@dataclass
class PreparedTruthfulQA:
    request: TruthfulQARequest
    conditions: list[Condition]
    data: list[EncodedQuestion]
    identity: dict

    def work(self, ctx: JobContext):
        t0 = time.monotonic()
        per = yield from truthfulqa_work(ctx, self.data, self.conditions)
        return truthfulqa_report(self, per, time.monotonic() - t0)


def prepare_truthfulqa(model: ModelFront, req: TruthfulQARequest, max_rows: int = 200_000,
                       images: ImageLimits | None = None) -> PreparedTruthfulQA:
    if not req.items:
        raise InvalidRequestError("no questions", param="questions")
    conditions = with_baseline(model, req.conditions)
    if len(conditions) * len(req.items) > max_rows:
        raise InvalidRequestError(f"{len(conditions)} conditions x {len(req.items)} questions is more than this "
                                     f"server scores in one evaluation ({max_rows})", param="questions")
    data = encode_questions(model, req.items, req.format, images=images)
    if any(uses_images(c.resolved.applications) for c in conditions if c.resolved is not None):
        missing = [i for i, q in enumerate(data) if not q.images]
        if missing:
            raise InvalidRequestError(f"a condition steers 'image' positions, and {len(missing)} questions have no "
                                      f"image (first: questions[{missing[0]}])", param="conditions")
    return PreparedTruthfulQA(req, conditions, data, model.info.identity().as_dict())


def truthfulqa_report(prep: PreparedTruthfulQA, per: Sequence[Sequence[dict]], seconds: float) -> EvaluationReport:
    req = prep.request
    results = []
    base = per[0]
    for ci, (cond, scores) in enumerate(zip(prep.conditions, per)):
        metrics, stderr, versus = {}, {}, {}
        for m in (*METRICS, "margin"):
            metrics[m], stderr[m] = mean_se([s[m] for s in scores])
            if ci:
                if m in ("binary", "mc1"):
                    versus[m] = paired([s[m] for s in base], [s[m] for s in scores])
                else:
                    versus[m] = {"diff": metrics[m] - mean_se([s[m] for s in base])[0]}
        details = {"per_question": list(scores)} if req.per_question else {}
        results.append(ConditionResult(cond.label, cond.describe(), metrics, stderr, versus, details))
    fmt = req.format
    data = {"examples": len(req.items), "hash": items_hash(req.items), **(req.source or {}),
            "answers": sum(len(q.answers) for q in prep.data)}
    settings = {"template": fmt.template, "prompt_format": fmt.prompt_format, "system_prompt": fmt.system_prompt,
                "separator": fmt.separator, "scoring": "summed answer log-probability"}
    cols = [Column("binary", "binary", "diff"), Column("mc1", "MC1", "diff"), Column("mc2", "MC2", "diff"),
            Column("margin", "margin", "diff", 2)]
    return EvaluationReport("truthfulqa", prep.identity, data, settings, cols, results, seconds)


def evaluate_truthfulqa(lm: LoadedModel, req: TruthfulQARequest, *, chunk_tokens: int = 2048,
                        images: ImageLimits | None = None,
                        on_progress: Any = None) -> EvaluationReport:
    """Validate and run on this thread (no engine needed)."""
    from steering.backends.hf.jobs import run_job

    prep = prepare_truthfulqa(lm, req, images=images)
    return run_job(prep.work, lm, chunk_tokens=chunk_tokens, name="eval-truthfulqa", on_progress=on_progress)
