"""The effect of steering on generation: generate with each condition and with none, then measure

* behaviour: a scorer's mean over the texts (:mod:`.scorers`; ``sentiment`` is VADER) and its shift from the
  unsteered texts, with the standard error of the paired differences;
* fluency: the perplexity of each condition's generated tokens under the *unsteered* model, given the prompt
  (corpus level: exp of minus the mean token log-probability), and its ratio to the unsteered texts' own;
* diversity: distinct-1/2/3 over the condition's texts, and the mean number of generated tokens.

Generation goes through the engine like any request (batched with other traffic); perplexity is an engine job.
Waiting on both cannot happen on the engine's thread, so the evaluation runs on a thread of its own
(:func:`start_steer`), reporting progress and honouring cancellation through its :class:`JobHandle`.
Prompts of all conditions use the same per-prompt seeds, so sampled generations differ only by the steering.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

from steering.engine import GenerationRequest, GenerationResult, RequestHandle
from steering.engine.base import AnalysisBackend, GenerationBackend, ModelFront
from steering.engine.jobs import JobCancelledError, JobHandle, Progress, start_thread_job
from steering.errors import InvalidRequestError, QueueFullError
from steering.sampling import SamplingParams
from steering.tasks.evaluation.conditions import Condition, with_baseline
from steering.tasks.evaluation.report import Column, ConditionResult, EvaluationReport, mean_se
from steering.tasks.evaluation.scorers import Scorer, distinct_n, get_scorer
from steering.tasks.scoring import score_answers

GENERATION_SHARE = 0.85
"""Of the progress bar: generation, then perplexity scoring."""


@dataclass
class SteerEvalRequest:
    prompts: list[str]
    conditions: list[Condition] = field(default_factory=list)
    """Steered conditions; the unsteered baseline is added first."""
    scorer: str | None = "sentiment"
    scorer_params: dict | None = None
    chat: bool = False
    """Prompts as user messages in the chat template (default: raw text, as TruthfulQA's prompts, the CLI and
    completions take them)."""
    system_prompt: str | None = None
    max_tokens: int = 48
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    """Prompt i samples with seed + i under every condition (ignored when greedy)."""
    samples: int = 3
    """Generations per condition kept in the report."""


@dataclass
class PreparedSteer:
    request: SteerEvalRequest
    conditions: list[Condition]
    prompt_ids: list[list[int]]
    scorer: Scorer | None
    identity: dict


def prepare_steer(model: ModelFront, req: SteerEvalRequest, max_prompts: int = 1024) -> PreparedSteer:
    """Check everything (prompts, conditions, scorer, sampling, lengths) before any model work."""
    if not req.prompts:
        raise InvalidRequestError("no prompts", param="prompts")
    if len(req.prompts) > max_prompts:
        raise InvalidRequestError(f"{len(req.prompts)} prompts; this server allows {max_prompts}", param="prompts")
    if any(not isinstance(p, str) or not p.strip() for p in req.prompts):
        raise InvalidRequestError("prompts must be non-empty strings", param="prompts")
    if not 0 <= req.samples <= 1000:
        raise InvalidRequestError("samples must be in [0, 1000]", param="samples")
    conditions = with_baseline(model, req.conditions)
    scorer = get_scorer(req.scorer, req.scorer_params) if req.scorer else None
    info = model.info
    sampling(req, 0).validate(info.vocab_size)
    fmt = "chat" if req.chat else "raw"
    ids = [model.inputs.encode_prompt(p, fmt, req.system_prompt) for p in req.prompts]
    for i, x in enumerate(ids):
        if len(x) + req.max_tokens > info.max_model_len:
            raise InvalidRequestError(f"prompts[{i}] plus max_tokens is longer than the model allows "
                                      f"({info.max_model_len} tokens)", param=f"prompts[{i}]")
    return PreparedSteer(req, conditions, ids, scorer, info.identity().as_dict())


def sampling(req: SteerEvalRequest, i: int) -> SamplingParams:
    return SamplingParams(max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
                          seed=None if req.temperature == 0 else req.seed + i)


class _Runner:
    def __init__(self, backend: GenerationBackend, prep: PreparedSteer) -> None:
        if not isinstance(backend, AnalysisBackend):
            raise TypeError("the steering-effect evaluation needs a backend that runs jobs (perplexity)")
        self.backend, self.prep = backend, prep
        self._active: set = set()
        self._lock = threading.Lock()

    def cancel_active(self) -> None:
        with self._lock:
            for h in list(self._active):
                h.cancel()

    def _track(self, h) -> None:
        with self._lock:
            self._active.add(h)

    def _untrack(self, h) -> None:
        with self._lock:
            self._active.discard(h)

    def _check(self, handle: JobHandle) -> None:
        if handle.cancelled:
            raise JobCancelledError(f"job {handle.job_id} was cancelled")

    def _submit(self, handle: JobHandle, req: GenerationRequest) -> RequestHandle:
        while True:
            self._check(handle)
            try:
                h = self.backend.submit(req)
            except QueueFullError:
                time.sleep(0.2)  # other traffic fills the queue: wait for room
                continue
            self._track(h)
            return h

    def generate(self, handle: JobHandle) -> list[list[GenerationResult]]:
        prep, req = self.prep, self.prep.request
        n, total = len(prep.prompt_ids), len(prep.prompt_ids) * len(prep.conditions)
        window = max(1, 2 * self.backend.stats().max_running)
        out: list[list[GenerationResult]] = []
        done = 0
        for cond in prep.conditions:
            results: list[GenerationResult | None] = [None] * n
            inflight: list[tuple[int, RequestHandle]] = []
            nxt = 0
            while nxt < n or inflight:
                while nxt < n and len(inflight) < window:
                    gr = GenerationRequest(list(prep.prompt_ids[nxt]), sampling(req, nxt), cond.spec,
                                           priority=1)  # background: interactive requests keep their share
                    inflight.append((nxt, self._submit(handle, gr)))
                    nxt += 1
                i, h = inflight.pop(0)
                try:
                    res = h.result()
                finally:
                    self._untrack(h)
                self._check(handle)
                results[i] = res
                done += 1
                handle.progress = Progress(done, total, "generating", GENERATION_SHARE * done / total)
            out.append(results)  # type: ignore[arg-type]
        return out

    def perplexity(self, handle: JobHandle, gens: list[list[GenerationResult]]) -> list[tuple[float, int]]:
        """(summed log-prob, tokens) of each condition's generated tokens under the unsteered model."""
        items, owner = [], []
        for ci, results in enumerate(gens):
            for r, p in zip(results, self.prep.prompt_ids):
                if r.token_ids:
                    items.append((p, [r.token_ids]))
                    owner.append(ci)
        sums = [(0.0, 0)] * len(gens)
        if not items:
            return sums
        assert isinstance(self.backend, AnalysisBackend)
        job = self.backend.submit_job(lambda ctx: score_answers(ctx, items, None, stage="perplexity"),
                                      "eval-perplexity")
        self._track(job)
        try:
            while True:
                try:
                    scored = job.result(timeout=0.2)
                    break
                except TimeoutError:
                    self._check(handle)
                    f = job.progress.overall() or 0.0
                    handle.progress = Progress(job.progress.done, job.progress.total, "perplexity",
                                               GENERATION_SHARE + (1 - GENERATION_SHARE) * f)
        finally:
            self._untrack(job)
        logprob = [0.0] * len(gens)
        tokens = [0] * len(gens)
        for ci, s in zip(owner, scored):
            logprob[ci] += s.logprobs[0]
            tokens[ci] += s.lengths[0]
        return list(zip(logprob, tokens))

    def run(self, handle: JobHandle) -> EvaluationReport:
        t0 = time.monotonic()
        prep, req = self.prep, self.prep.request
        handle.progress = Progress(0, None, "generating", 0.0)
        gens = self.generate(handle)
        ppl = self.perplexity(handle, gens)
        texts = [[r.text for r in results] for results in gens]
        scores = [prep.scorer.score(t) for t in texts] if prep.scorer else None
        conditions = []
        for ci, cond in enumerate(prep.conditions):
            lp, ntok = ppl[ci]
            metrics: dict[str, float] = {}
            stderr: dict[str, float] = {}
            versus: dict[str, dict[str, float]] = {}
            if scores is not None:
                metrics["score"], stderr["score"] = mean_se(scores[ci])
                if ci:
                    diff, se = mean_se([b - a for a, b in zip(scores[0], scores[ci])])
                    versus["score"] = {"diff": diff, "stderr": se}
            metrics["perplexity"] = math.exp(-lp / ntok) if ntok else float("nan")
            if ci and ppl[0][1] and ntok:
                versus["perplexity"] = {"ratio": metrics["perplexity"] / math.exp(-ppl[0][0] / ppl[0][1])}
            for k in (1, 2, 3):
                metrics[f"distinct_{k}"] = distinct_n(texts[ci], k)
            metrics["tokens"] = sum(len(r.token_ids) for r in gens[ci]) / len(gens[ci])
            samples = [{"prompt": p, "text": t} for p, t in zip(req.prompts, texts[ci])][: req.samples]
            conditions.append(ConditionResult(cond.label, cond.describe(), metrics, stderr, versus,
                                              {"samples": samples}))
        cols = ([Column("score", f"{req.scorer}", "diff")] if req.scorer else []) + [
            Column("perplexity", "perplexity", "ratio", 2), Column("distinct_1", "distinct-1"),
            Column("distinct_2", "distinct-2"), Column("distinct_3", "distinct-3"), Column("tokens", "tokens", None, 1)]
        settings = {"scorer": req.scorer, "scorer_params": req.scorer_params or {},
                    "scorer_higher": prep.scorer.higher if prep.scorer else None, "chat": req.chat,
                    "system_prompt": req.system_prompt, "max_tokens": req.max_tokens,
                    "temperature": req.temperature, "top_p": req.top_p, "seed": req.seed,
                    "perplexity": "of each condition's generated tokens under the unsteered model, given the prompt"}
        data = {"examples": len(req.prompts)}
        return EvaluationReport("steer", prep.identity, data, settings, cols, conditions, time.monotonic() - t0)


def start_steer(backend: GenerationBackend, prep: PreparedSteer, loop=None) -> JobHandle[EvaluationReport]:
    """Run the evaluation on its own thread against a running backend (which must also run jobs); returns its
    handle at once."""
    runner = _Runner(backend, prep)
    return start_thread_job("eval-steer", runner.run, loop, on_cancel=runner.cancel_active)
