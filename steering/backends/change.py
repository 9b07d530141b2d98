"""The size of a steering change, r = ||h' - h|| / ||h|| per token, from the norms the steering arithmetic computes
anyway, so measuring it costs a few per-token scalar ops instead of another pass over the hidden states.

Both backends steer a token as h' = (h + N) * b / a + R (b = ||h||, a = ||h + N||; N the sum of the normalising
applications' deltas, R the others'; without N, a = b). With c = b / a:

    ||c (h + N) - h||^2 = 2 b^2 - 2 c (b^2 + <h, N>) = (b / a) (||N||^2 - (a - b)^2)     (<h, N> from a^2)
    ||h' - h||^2        = that + 2 ((c - 1) <h, R> + c <N, R>) + ||R||^2

so only <h, R> needs the hidden states (when a token has both kinds); ||N||^2, ||R||^2 and <N, R> depend on the
deltas alone, which the backends keep across decode steps. All in float32.
"""

from __future__ import annotations

import torch

_TINY = torch.finfo(torch.float32).tiny


def relative_change(before: torch.Tensor, after: torch.Tensor | None = None, n2: torch.Tensor | None = None,
                    r2: torch.Tensor | None = None, hr: torch.Tensor | None = None,
                    nr: torch.Tensor | None = None) -> torch.Tensor:
    """r per token (shapes [..., 1], float32): ``before`` = ||h||, ``after`` = ||h + N|| and ``n2`` = ||N||^2 when
    normalising applications act; ``r2`` = ||R||^2 when others do, and with both ``hr`` = <h, R>, ``nr`` = <N, R>.
    A token nothing acts on (N = R = 0) gets 0."""
    if n2 is not None:
        assert after is not None
        c = before / after
        d2 = c * (n2 - (after - before).square())
        if r2 is not None:
            assert hr is not None and nr is not None
            d2 = d2 + 2 * ((c - 1) * hr + c * nr) + r2
    else:
        assert r2 is not None
        d2 = r2
    return d2.clamp_min(0).sqrt() / before.clamp_min(_TINY)
