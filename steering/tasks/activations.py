"""Collecting decoder-layer outputs (the residual stream the steering hooks act on) at chosen tokens, for every
requested layer in one forward pass.

The backend's runner hands each layer's output to a capture function; nothing is registered per call. Rows are
packed (:mod:`steering.tasks.packing`) and chunked to the job's token budget, longest first. A *group* is a list
of token indices in its row; its activation is the mean over those tokens (one index: that token's state).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from steering.engine.jobs import JobContext, Progress
from steering.tasks.packing import Segment, pack
from steering.tasks.scoring import chunks, packed_embeddings, packed_forward


def collect(ctx: JobContext, rows: Sequence[Sequence[Segment]], groups: Sequence[Sequence[Sequence[int]]],
            layers: Sequence[int] | None = None, stage: str = "activations",
            replace: tuple[Sequence[Sequence[int]], torch.Tensor] | None = None):
    """Job generator: returns {layer: [G, hidden] float32 on CPU}, G = all groups of all rows in order.

    ``groups[r]`` lists row ``r``'s groups (token indices into the row). ``replace`` = (token indices per row, an
    embedding [hidden]): those tokens' input embeddings are replaced by it (e.g. an attribution baseline)."""
    lm = ctx.lm
    layers = list(range(lm.num_layers)) if layers is None else list(layers)
    wanted = set(layers)
    offsets = [0]
    for row_groups in groups:
        offsets.append(offsets[-1] + len(row_groups))
    out = {layer: torch.zeros(offsets[-1], lm.hidden_size) for layer in layers}
    lengths = [sum(len(s.ids) for s in r) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: (-lengths[i], i))  # similar lengths share a chunk: little padding
    done = 0
    for part in chunks([lengths[i] for i in order], ctx.chunk_tokens):
        idx = [order[j] for j in part]
        batch = pack([rows[i] for i in idx], lm.pad_id, lm.device)
        L = batch.ids.shape[1]
        flat: list[int] = []  # token index in the batch
        local: list[int] = []  # its group's index within this chunk
        gids: list[int] = []  # each of this chunk's groups' index in the output
        for r, i in enumerate(idx):
            for g, tokens in enumerate(groups[i]):
                flat.extend(r * L + t for t in tokens)
                local.extend([len(gids)] * len(tokens))
                gids.append(offsets[i] + g)
        flat_t = torch.tensor(flat, device=lm.device, dtype=torch.long)
        local_t = torch.tensor(local, dtype=torch.long)
        gid_t = torch.tensor(gids, dtype=torch.long)
        counts = torch.zeros(len(gids)).index_add_(0, local_t, torch.ones(len(local))).clamp_min_(1).unsqueeze(-1)

        def capture(layer: int, h: torch.Tensor, flat_t: torch.Tensor = flat_t, local_t: torch.Tensor = local_t,
                    gid_t: torch.Tensor = gid_t, counts: torch.Tensor = counts) -> None:
            if layer in wanted:
                sel = h.flatten(0, 1)[flat_t].to("cpu", torch.float32)
                acc = torch.zeros(len(gid_t), h.shape[-1]).index_add_(0, local_t, sel)
                out[layer].index_copy_(0, gid_t, acc / counts)

        embeds = None
        if replace is not None and any(replace[0][i] for i in idx):
            embeds = packed_embeddings(ctx, batch).clone()
            for r, i in enumerate(idx):
                if replace[0][i]:
                    embeds[r, torch.tensor(list(replace[0][i]), device=lm.device)] = replace[1].to(embeds.dtype)
        packed_forward(ctx, batch, embeds=embeds, capture=capture)
        done += len(idx)
        yield Progress(done, len(rows), stage)
    return out
