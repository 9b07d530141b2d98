"""Token log-probabilities in the two OpenAI shapes: chat's ``content`` entries and completions' parallel
lists."""

from __future__ import annotations

from collections.abc import Sequence

from server.protocol.generation import ChoiceLogprobs, CompletionLogprobs, TokenLogprobEntry, TopLogprob
from steering.inputs import Inputs
from steering.sampling import TokenLogprob


def chat_logprobs(inputs: Inputs, lps: Sequence[TokenLogprob]) -> ChoiceLogprobs:
    entries = []
    for lp in lps:
        s = inputs.token_text(lp.token_id)
        top = []
        for i, v in lp.top:
            t = inputs.token_text(i)
            top.append(TopLogprob(token=t, logprob=v, bytes=list(t.encode())))
        entries.append(TokenLogprobEntry(token=s, logprob=lp.logprob, bytes=list(s.encode()), top_logprobs=top))
    return ChoiceLogprobs(content=entries)


def completion_logprobs(inputs: Inputs, lps: Sequence[TokenLogprob], offset: int) -> CompletionLogprobs:
    """``offset``: where the first token's text starts in the choice's text."""
    out = CompletionLogprobs()
    for lp in lps:
        s = inputs.token_text(lp.token_id)
        out.tokens.append(s)
        out.token_logprobs.append(lp.logprob)
        out.top_logprobs.append({inputs.token_text(i): v for i, v in lp.top})
        out.text_offset.append(offset)
        offset += len(s)
    return out


def prompt_logprobs(inputs: Inputs, ids: Sequence[int], lps: Sequence[TokenLogprob | None]) -> CompletionLogprobs:
    """An echoed prompt's tokens: the first has no log-probability (nothing precedes it), nor any position the
    backend did not score."""
    out = CompletionLogprobs()
    offset = 0
    for k, tok in enumerate(ids):
        s = inputs.token_text(tok)
        lp = lps[k] if k < len(lps) else None
        out.tokens.append(s)
        out.token_logprobs.append(None if lp is None else lp.logprob)
        top = None if lp is None else {inputs.token_text(i): v for i, v in lp.top}
        if top is not None and lp is not None:
            top.setdefault(s, lp.logprob)
        out.top_logprobs.append(top)
        out.text_offset.append(offset)
        offset += len(s)
    return out
