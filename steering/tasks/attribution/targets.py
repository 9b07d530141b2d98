"""What an attribution explains: a continuation's log-probability, each of its tokens, or a contrast.

Every method works from per-token log-probabilities log P(y_t | x, y_<t) of one or two continuations given
the prompt x, combined linearly into K *objectives* by a weight tensor W [K, C, T]:

- ``continuation``: one objective, the summed log-probability of the continuation (W = 1);
- ``per_token``: one objective per continuation token (W = identity), giving a [T x prompt] matrix;
- ``contrastive``: one objective, log P(preferred | x) - log P(dispreferred | x) (W = +1 / -1), the
  GrAInS objective.

Attributions are over the prompt tokens; continuation tokens are held at their real embeddings. Because the
objectives are linear in the token log-probabilities, the continuation row equals the sum of the per-token
rows, and the contrastive row equals the difference of the two continuation rows, exactly, for every method
that is linear in its target (gradients, integrated gradients, occlusion) and by definition for the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

TargetKind = Literal["continuation", "per_token", "contrastive"]
TARGET_KINDS = ("continuation", "per_token", "contrastive")


@dataclass(frozen=True)
class AttributionTarget:
    kind: TargetKind
    continuations: tuple[tuple[int, ...], ...]
    """One continuation (``continuation``, ``per_token``) or two (preferred, dispreferred)."""

    @classmethod
    def continuation(cls, ids: list[int]) -> AttributionTarget:
        return cls("continuation", (tuple(ids),))

    @classmethod
    def per_token(cls, ids: list[int]) -> AttributionTarget:
        return cls("per_token", (tuple(ids),))

    @classmethod
    def contrastive(cls, preferred: list[int], dispreferred: list[int]) -> AttributionTarget:
        return cls("contrastive", (tuple(preferred), tuple(dispreferred)))

    @property
    def max_len(self) -> int:
        return max(len(c) for c in self.continuations)

    @property
    def num_objectives(self) -> int:
        return len(self.continuations[0]) if self.kind == "per_token" else 1

    def weights(self) -> torch.Tensor:
        """W [K, C, T]: objective k = sum over (c, t) of W[k, c, t] * log P(y_c,t | x, y_c,<t)."""
        C, T = len(self.continuations), self.max_len
        w = torch.zeros(self.num_objectives, C, T)
        if self.kind == "per_token":
            n = len(self.continuations[0])
            w[torch.arange(n), 0, torch.arange(n)] = 1.0
        else:
            for c, ids in enumerate(self.continuations):
                w[0, c, : len(ids)] = 1.0 if c == 0 else -1.0
        return w
