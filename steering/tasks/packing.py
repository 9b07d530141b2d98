"""Packed rows: a prompt and several continuations of it in one sequence, each continuation seeing only the
prompt and itself (a tree of segments), so the prompt is computed once for all of its answers.

A row is a list of *segments*; a segment is token ids (or, for gradient work, their embeddings) plus the index
of its parent segment (``None`` for a root). Positions are absolute: a root starts at position 0 and a child
continues from its parent's last position, so a continuation packed after its siblings gets exactly the
positions, attention and therefore hidden states it would get alone after the prompt. Rows of a batch are
padded on the right; padding sees only itself and is never seen.

A packed batch carries a boolean "query may see key" tensor; the backend's runner turns it into the model's
additive masks (with its sliding windows).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from steering.multimodal import PromptImage


@dataclass
class Segment:
    ids: Sequence[int]
    parent: int | None = None
    images: tuple[PromptImage, ...] = ()
    """Images in this segment (a vision-language prompt), their positions counted from the segment's start."""


@dataclass
class PackedBatch:
    ids: torch.Tensor  # [n, L] (padding: pad id)
    positions: torch.Tensor  # [n, L]
    keep: torch.Tensor  # [n, L, L] bool
    lengths: list[int]  # real tokens per row
    prompt_lens: torch.Tensor  # [n]: the root segment's length (steering's "prompt" part)
    starts: list[list[int]]  # per row: each segment's first index in the row
    rows: Sequence[Sequence[Segment]] = ()  # the packed rows themselves
    roots: list[list[int]] = field(default_factory=list)  # per row: each segment's root segment

    @property
    def has_images(self) -> bool:
        return any(seg.images for segs in self.rows for seg in segs)

    def images(self) -> list[list[PromptImage]]:
        """Per row, every image at its index in the row."""
        return [[im.shifted(self.starts[r][j]) for j, seg in enumerate(segs) for im in seg.images]
                for r, segs in enumerate(self.rows)]

    def last_index(self, row: int, seg: int, rows_segments: list[list[Segment]]) -> int:
        return self.starts[row][seg] + len(rows_segments[row][seg].ids) - 1


def pack(rows: Sequence[Sequence[Segment]], pad_id: int, device: torch.device) -> PackedBatch:
    """Pack rows of segments (each parent listed before its children) into one padded batch."""
    n = len(rows)
    lengths = [sum(len(s.ids) for s in segs) for segs in rows]
    L = max(lengths)
    ids = torch.full((n, L), pad_id, dtype=torch.long)
    pos = torch.zeros(n, L, dtype=torch.long)
    seg_of = torch.full((n, L), -1, dtype=torch.long)
    keep = torch.zeros(n, L, L, dtype=torch.bool)
    starts: list[list[int]] = []
    roots: list[list[int]] = []
    prompt_lens = []
    for r, segs in enumerate(rows):
        at = 0
        row_starts: list[int] = []
        ends: list[int] = []
        ancestors: list[list[int]] = []
        row_roots: list[int] = []
        for j, seg in enumerate(segs):
            k = len(seg.ids)
            if seg.parent is not None and not 0 <= seg.parent < j:
                raise ValueError(f"segment {j} of row {r}: its parent must come before it")
            first = ends[seg.parent] if seg.parent is not None else 0
            ids[r, at:at + k] = torch.tensor(list(seg.ids), dtype=torch.long)
            pos[r, at:at + k] = torch.arange(first, first + k)
            seg_of[r, at:at + k] = j
            anc = ([seg.parent] + ancestors[seg.parent]) if seg.parent is not None else []
            ancestors.append(anc)
            row_roots.append(anc[-1] if anc else j)
            # Causal within the segment, and everything of every ancestor segment.
            keep[r, at:at + k, at:at + k] = torch.ones(k, k, dtype=torch.bool).tril_()
            for a in anc:
                a0 = row_starts[a]
                keep[r, at:at + k, a0:a0 + len(segs[a].ids)] = True
            row_starts.append(at)
            ends.append(first + k)
            at += k
        for t in range(at, L):  # padding sees itself only
            keep[r, t, t] = True
        starts.append(row_starts)
        roots.append(row_roots)
        prompt_lens.append(len(segs[0].ids))
    return PackedBatch(ids.to(device), pos.to(device), keep.to(device), lengths,
                       torch.tensor(prompt_lens, device=device), starts, rows, roots)


def answer_rows(prompt: Sequence[int], answers: Sequence[Sequence[int]],
                images: tuple[PromptImage, ...] = ()) -> list[Segment]:
    """One prompt (with its images) and each answer as a child continuation."""
    return [Segment(prompt, images=images)] + [Segment(a, 0) for a in answers]


def targets(batch: PackedBatch, rows: Sequence[Sequence[Segment]]):
    """Where each continuation's tokens are predicted: flat indices (row * L + position of the predicting
    token), the token ids, and the (row, segment) group of each, for every non-root segment.

    The first token of a child is predicted by its parent's last token; each later one by the token before it.
    Returns (pred_index [M], token [M], group [M], groups list[(row, seg)])."""
    L = batch.ids.shape[1]
    pred: list[int] = []
    tok: list[int] = []
    grp: list[int] = []
    groups: list[tuple[int, int]] = []
    for r, segs in enumerate(rows):
        for j, seg in enumerate(segs):
            if seg.parent is None:
                continue
            g = len(groups)
            groups.append((r, j))
            s0 = batch.starts[r][j]
            prev = batch.starts[r][seg.parent] + len(segs[seg.parent].ids) - 1
            for t, token in enumerate(seg.ids):
                pred.append(r * L + (prev if t == 0 else s0 + t - 1))
                tok.append(int(token))
                grp.append(g)
    dev = batch.ids.device
    return (torch.tensor(pred, device=dev, dtype=torch.long), torch.tensor(tok, device=dev, dtype=torch.long),
            torch.tensor(grp, device=dev, dtype=torch.long), groups)
