"""Steering hooks: installed once on every decoder layer at load; each forward reads its batch's steering.

The runner builds a :class:`SteeringBatch` for the rows of a forward pass (one list of
:class:`DeviceApplication` per row, empty for an unsteered row), sets it with :meth:`SteeringHooks.active` for the
duration of that forward, and the hooks clear it in ``finally``. No hook is registered per request.

Per forward the batch turns into, for each layer, a matrix of the vectors acting there ([V, hidden]) and,
per token, a gate matrix ([B, T, V]) holding each application's scale where it is active and 0 elsewhere,
so steering a whole mixed batch costs a few elementwise ops per steered layer (the per-layer deltas, one small
matmul, are cached while the batch is unchanged). Rows and tokens with no active application are left
bit-for-bit unchanged.

The engine's forwards also pass a :class:`StepTelemetry`: each steered layer adds, per row, the relative change
r = ||h' - h|| / ||h|| of its steered tokens and their count, from the norms the arithmetic computes anyway
(:mod:`steering.backends.change`), so measuring costs a few per-token scalar ops (and one dot product per layer
where normalising and other applications meet on a token). Job forwards (gradients) measure nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from steering.backends.change import relative_change
from steering.errors import SteeringOverflowError
from steering.spec import Positions, ResolvedApplication


@dataclass(frozen=True)
class DeviceApplication:
    """A resolved application with its per-layer values on the model's device and dtype."""

    values: dict[int, torch.Tensor]
    scale: float
    positions: Positions
    normalize: bool


def to_device(apps: Sequence[ResolvedApplication], device: torch.device,
              dtype: torch.dtype) -> list[DeviceApplication]:
    """The applications that act (scale 0 is exactly unsteered), their values moved to ``device``. A scaled vector
    that is not finite in the model's dtype (a scale of 1e38 in bfloat16) is refused here, before it runs."""
    out = []
    for i, a in enumerate(apps):
        if a.scale == 0:
            continue
        values = {layer: v.to(device=device, dtype=dtype) for layer, v in a.values.items()}
        scale = torch.tensor(a.scale, dtype=dtype, device=device)
        if not bool(torch.isfinite(scale)) or any(not bool(torch.isfinite(v * scale).all()) for v in values.values()):
            raise SteeringOverflowError(f"steering.vectors[{i}]: scale x vector overflows {str(dtype)[6:]}; use a "
                                        "smaller scale", param=f"steering.vectors[{i}].scale")
        out.append(DeviceApplication(values, a.scale, a.positions, a.normalize))
    return out


@dataclass
class _LayerTable:
    norm_vectors: torch.Tensor | None  # [Vn, d]
    raw_vectors: torch.Tensor | None  # [Vr, d]
    norm_has: torch.Tensor | None = None  # [Vn] bool: the application has a value at this layer
    raw_has: torch.Tensor | None = None  # [Vr]


class StepTelemetry:
    """Per-row sums of one forward's steering: r over the steered (token, layer) pairs and their number per layer,
    on the model's device; the engine reads them once after the forward (:meth:`rows`). ``valid`` [B, T]: the
    tokens that are real (a batched prefill pads shorter rows)."""

    def __init__(self, rows: int, num_layers: int, device: torch.device, valid: torch.Tensor | None = None) -> None:
        self.change = torch.zeros(rows, dtype=torch.float32, device=device)
        self.tokens = torch.zeros(rows, num_layers, dtype=torch.int64, device=device)
        self.valid = valid

    def rows(self) -> list[tuple[float, list[int]]]:
        """Each row's (sum of r, steered tokens per layer)."""
        return list(zip(self.change.tolist(), self.tokens.tolist(), strict=True))


class SteeringBatch:
    """The steering of one batch composition: per-layer vector tables and per-application position rules."""

    def __init__(
        self, rows: Sequence[Sequence[DeviceApplication]], hidden_size: int, device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.device = device
        self.dtype = dtype
        norm_apps: list[tuple[int, DeviceApplication]] = []
        raw_apps: list[tuple[int, DeviceApplication]] = []
        for r, apps in enumerate(rows):
            for app in apps:
                (norm_apps if app.normalize else raw_apps).append((r, app))
        self._norm_apps = norm_apps
        self._raw_apps = raw_apps
        self.empty = not norm_apps and not raw_apps
        layers = sorted({layer for _, a in norm_apps + raw_apps for layer in a.values})
        zero = torch.zeros(hidden_size, device=device, dtype=dtype)
        self.tables: dict[int, _LayerTable] = {}
        for layer in layers:
            nv = rv = nh = rh = None
            if norm_apps and any(layer in a.values for _, a in norm_apps):
                nv = torch.stack([a.values.get(layer, zero) for _, a in norm_apps])
                nh = torch.tensor([layer in a.values for _, a in norm_apps], device=device)
            if raw_apps and any(layer in a.values for _, a in raw_apps):
                rv = torch.stack([a.values.get(layer, zero) for _, a in raw_apps])
                rh = torch.tensor([layer in a.values for _, a in raw_apps], device=device)
            self.tables[layer] = _LayerTable(nv, rv, nh, rh)
        # Per-application rules, vectorised: the row, the scale, and the position kind.
        self._norm_rule = self._rules(norm_apps)
        self._raw_rule = self._rules(raw_apps)
        # True when gates depend only on the phase (prompt/generated), not on explicit positions.
        self.position_free = all(
            isinstance(a.positions, str) for _, a in norm_apps + raw_apps
        )

    def _rules(self, apps: list[tuple[int, DeviceApplication]]):
        if not apps:
            return None
        dev = self.device
        rows = torch.tensor([r for r, _ in apps], device=dev)
        scales = torch.tensor([a.scale for _, a in apps], device=dev, dtype=self.dtype)
        kind = torch.tensor([{"all": 0, "prompt": 1, "generated": 2}.get(a.positions, 3)
                             if isinstance(a.positions, str) else 3 for _, a in apps], device=dev)
        explicit = [(i, torch.tensor(a.positions, device=dev)) for i, (_, a) in enumerate(apps)
                    if not isinstance(a.positions, str)]
        return rows, scales, kind, explicit

    def _gates(self, rule, positions: torch.Tensor, prompt_lens: torch.Tensor) -> torch.Tensor | None:
        if rule is None:
            return None
        rows, scales, kind, explicit = rule
        B, T = positions.shape
        V = rows.shape[0]
        pos = positions[rows]  # [V, T] positions of each application's row
        plen = prompt_lens[rows].unsqueeze(1)  # [V, 1]
        active = torch.where(
            kind.unsqueeze(1) == 0, torch.ones_like(pos, dtype=torch.bool),
            torch.where(kind.unsqueeze(1) == 1, pos < plen, pos >= plen),
        )
        for i, allowed in explicit:
            active[i] = torch.isin(pos[i], allowed)
        gate_vt = active.to(self.dtype) * scales.unsqueeze(1)  # [V, T]
        gates = torch.zeros(B, T, V, device=self.device, dtype=self.dtype)
        gates[rows, :, torch.arange(V, device=self.device)] = gate_vt
        return gates

    def gates(self, positions: torch.Tensor, prompt_lens: torch.Tensor) -> StepSteering:
        """Gates for one forward: ``positions`` [B, T] absolute positions, ``prompt_lens`` [B]."""
        return StepSteering(self, self._gates(self._norm_rule, positions, prompt_lens),
                            self._gates(self._raw_rule, positions, prompt_lens))


class StepSteering:
    """What the hooks apply during one forward pass (reused across decode steps while the batch is unchanged)."""

    def __init__(self, batch: SteeringBatch, norm_gates: torch.Tensor | None, raw_gates: torch.Tensor | None):
        self.batch = batch
        self.norm_gates = norm_gates  # [B, T, Vn]
        self.raw_gates = raw_gates  # [B, T, Vr]
        self._deltas: dict[int, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
        self._measures: dict[int, _Measure] = {}

    def _layer_deltas(self, layer: int, table: _LayerTable):
        cached = self._deltas.get(layer)
        if cached is None:
            norm = raw = None
            if table.norm_vectors is not None:
                assert self.norm_gates is not None
                norm = torch.matmul(self.norm_gates, table.norm_vectors)
            if table.raw_vectors is not None:
                assert self.raw_gates is not None
                raw = torch.matmul(self.raw_gates, table.raw_vectors)
            cached = self._deltas[layer] = (norm, raw)  # [B, T, d] each
        return cached

    def _measure(self, layer: int, table: _LayerTable, norm: torch.Tensor | None,
                 raw: torch.Tensor | None) -> _Measure:
        """What r needs from the deltas alone (cached with them): the steered tokens, ||N||^2, ||R||^2, <N, R>."""
        cached = self._measures.get(layer)
        if cached is None:
            acts = None
            if norm is not None:
                assert self.norm_gates is not None and table.norm_has is not None
                acts = ((self.norm_gates != 0) & table.norm_has).any(-1)
            if raw is not None:
                assert self.raw_gates is not None and table.raw_has is not None
                r_acts = ((self.raw_gates != 0) & table.raw_has).any(-1)
                acts = r_acts if acts is None else acts | r_acts
            assert acts is not None
            nf = None if norm is None else norm.float()
            rf = None if raw is None else raw.float()
            cached = self._measures[layer] = _Measure(
                acts, None if nf is None else nf.square().sum(-1, keepdim=True),
                None if rf is None else rf.square().sum(-1, keepdim=True),
                None if nf is None or rf is None else (nf * rf).sum(-1, keepdim=True))
        return cached

    def apply(self, layer: int, h: torch.Tensor, telemetry: StepTelemetry | None = None) -> torch.Tensor:
        """h' = (h + N) ||h|| / ||h + N|| + R per token. A token with nothing to add keeps its exact bits:
        its delta is 0 and both norms are computed identically, so its ratio is exactly 1. With ``telemetry``,
        each row's r and steered tokens at this layer are added to it."""
        table = self.batch.tables.get(layer)
        if table is None:
            return h
        norm_delta, raw_delta = self._layer_deltas(layer, table)
        inplace = not torch.is_grad_enabled()  # inference: rewrite the layer output in place
        before = after = hr = None
        if telemetry is not None and raw_delta is not None:
            if norm_delta is None:
                before = torch.linalg.vector_norm(h, dim=-1, keepdim=True)
            else:
                hr = (h.float() * raw_delta.float()).sum(-1, keepdim=True)
        if norm_delta is not None:
            before = torch.linalg.vector_norm(h, dim=-1, keepdim=True)
            h = h.add_(norm_delta) if inplace else h + norm_delta
            after = torch.linalg.vector_norm(h, dim=-1, keepdim=True).clamp_min_(torch.finfo(h.dtype).tiny)
            ratio = before / after
            h = h.mul_(ratio) if inplace else h * ratio
        if raw_delta is not None:
            h = h.add_(raw_delta) if inplace else h + raw_delta
        if telemetry is not None:
            assert before is not None
            m = self._measure(layer, table, norm_delta, raw_delta)
            r = relative_change(before.float(), None if after is None else after.float(), m.n2, m.r2, hr, m.nr)
            acts = m.acts if telemetry.valid is None else m.acts & telemetry.valid
            telemetry.change += torch.where(acts, r.squeeze(-1), 0.0).sum(1)
            telemetry.tokens[:, layer] += acts.sum(1)
        return h


@dataclass
class _Measure:
    acts: torch.Tensor  # [B, T] bool: some application with a value at this layer acts on the token
    n2: torch.Tensor | None  # [B, T, 1] ||N||^2
    r2: torch.Tensor | None  # [B, T, 1] ||R||^2
    nr: torch.Tensor | None  # [B, T, 1] <N, R>


class SteeringHooks:
    """Forward hooks on every decoder layer, installed once; they act only while a step is active, and hand each
    layer's output (after steering) to a capture function while one is set (activation collection)."""

    def __init__(self, layers: nn.ModuleList) -> None:
        self._step: StepSteering | None = None
        self._telemetry: StepTelemetry | None = None
        self._capture: Callable[[int, torch.Tensor], None] | None = None
        self._handles = [layer.register_forward_hook(self._make_hook(i)) for i, layer in enumerate(layers)]

    def _make_hook(self, index: int):
        def hook(module: nn.Module, args, output):
            step, capture = self._step, self._capture
            steer = step is not None and index in step.batch.tables
            if not steer and capture is None:
                return None
            h = output[0] if isinstance(output, tuple) else output
            if step is not None and steer:
                h = step.apply(index, h, self._telemetry)
            if capture is not None:
                capture(index, h)
            if not steer:
                return None
            return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h

        return hook

    @contextlib.contextmanager
    def capturing(self, fn: Callable[[int, torch.Tensor], None]) -> Iterator[None]:
        """Call ``fn(layer_index, hidden)`` with every decoder layer's output during the enclosed forwards."""
        self._capture = fn
        try:
            yield
        finally:
            self._capture = None

    @contextlib.contextmanager
    def active(self, step: StepSteering | None, telemetry: StepTelemetry | None = None) -> Iterator[None]:
        """Apply ``step`` during the enclosed forward pass (measuring into ``telemetry``); always cleared
        afterwards."""
        self._step = step if step is not None and not step.batch.empty else None
        self._telemetry = telemetry
        try:
            yield
        finally:
            self._step = None
            self._telemetry = None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._step = None
        self._telemetry = None
        self._capture = None
