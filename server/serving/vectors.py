"""The vector store over HTTP: list, read, upload, rename, delete, export for llama.cpp; building vectors from
preference examples and sweeping them (jobs, when the backend can run them)."""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from server.auth import Principal
from server.protocol.vectors import (
    BuilderInfo,
    BuilderList,
    JobInfo,
    RefusedVector,
    VectorBuildRequest,
    VectorInfo,
    VectorList,
    VectorReload,
    VectorRename,
    VectorSweepRequest,
    examples,
)
from server.serving.jobs import JobService
from server.serving.threads import prepare
from steering.datasets import dataset_hash
from steering.engine.base import ModelFront
from steering.errors import ConflictError, UnsupportedError
from steering.gguf_vectors import export_for_llama_cpp
from steering.store import Refused, VectorExistsError, VectorStore, check_name
from steering.tasks import builders
from steering.tasks.builders.sweep import stored_setting
from steering.vectors import SteeringVector


def vector_info(store: VectorStore, vec: SteeringVector, norms: dict[int, float] | None = None) -> VectorInfo:
    name = vec.name or ""
    return VectorInfo(name=name, layers=vec.layers, hidden_size=vec.hidden_size,
                      norms=store.norms(name) if norms is None else norms, metadata=vec.metadata)


def refused_info(items: list[Refused]) -> list[RefusedVector]:
    return [RefusedVector(file=r.file, name=r.name, reason=r.reason) for r in items]


class VectorService:
    def __init__(self, store: VectorStore, model: ModelFront, jobs: JobService | None,
                 limits: builders.BuildLimits) -> None:
        self.store = store
        self.model = model
        self.jobs = jobs
        """None: the backend cannot run jobs, so vectors cannot be built or swept here."""
        self.limits = limits

    def listing(self) -> VectorList:
        """The directory as it is now (a scan: vectors other processes wrote are listed, deleted ones not)."""
        entries = self.store.entries()
        return VectorList(data=[vector_info(self.store, vec, norms) for vec, norms in entries],
                          refused=refused_info(self.store.refused()))

    def get(self, name: str) -> VectorInfo:
        vec, norms = self.store.entry(name)
        return vector_info(self.store, vec, norms)

    def reload(self) -> VectorReload:
        """Re-scan the directory now; backends hear of every change (as of uploads)."""
        r = self.store.reload()
        return VectorReload(added=r.added, removed=r.removed, changed=r.changed, refused=refused_info(r.refused),
                            total=r.total)

    def put(self, name: str, vec: SteeringVector, overwrite: bool, description: str | None) -> VectorInfo:
        meta = {"source": "upload", **vec.metadata}
        if description:
            meta["description"] = description
        return vector_info(self.store, self.store.put(name, replace(vec, metadata=meta), overwrite=overwrite))

    def delete(self, name: str) -> None:
        self.store.delete(name)

    def rename(self, name: str, req: VectorRename) -> VectorInfo:
        return vector_info(self.store, self.store.rename(name, req.new_name, req.overwrite))

    def export_gguf(self, name: str, scale: float) -> tuple[bytes, list[int]]:
        """The vector as a llama.cpp control vector, and the layers left out."""
        vec = self.store.get(name)
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / f"{name}.gguf"
            dropped = export_for_llama_cpp(vec, path, scale)
            return path.read_bytes(), dropped

    @staticmethod
    def methods() -> BuilderList:
        return BuilderList(data=[BuilderInfo(name=b.name, summary=b.summary, params=b.Params.model_json_schema())
                                 for b in builders.BUILDERS])

    def _jobs(self) -> JobService:
        if self.jobs is None:
            raise UnsupportedError("this server's backend cannot build or sweep vectors (it runs no analysis jobs)")
        return self.jobs

    async def build(self, req: VectorBuildRequest, owner: Principal) -> JobInfo:
        jobs = self._jobs()
        check_name(req.name)
        if self.store.exists(req.name) and not req.overwrite:  # checked again when the result is saved
            raise VectorExistsError(f"steering vector {req.name!r} already exists (set overwrite to replace it)",
                                    param="name")
        prep = await prepare(builders.prepare_build, self.model, req.to_core(), self.limits)

        def finish(result: builders.BuildResult) -> dict[str, Any]:
            meta = {**result.vector.metadata, "source": "build"}
            if req.description:
                meta["description"] = req.description
            saved = self.store.put(req.name, replace(result.vector, metadata=meta), overwrite=req.overwrite)
            return {"vector": vector_info(self.store, saved).model_dump(),
                    "sweep": result.sweep.as_dict() if result.sweep else None,
                    "seconds": round(result.seconds, 3)}

        return jobs.submit("vector_build", prep.work, finish, owner)

    async def sweep(self, name: str, req: VectorSweepRequest, owner: Principal) -> JobInfo:
        jobs = self._jobs()
        vec = self.store.get(name)
        cfg = req.sweep.to_core()
        data = examples(req.examples)
        work = await prepare(builders.prepare_sweep, self.model, vec, data, cfg, req.params, self.limits)

        def finish(result: builders.SweepResult) -> dict[str, Any]:
            out = result.as_dict()
            if req.save:
                out["saved"] = self._save_setting(name, vec, result, cfg, data)
            return out

        return jobs.submit("vector_sweep", work, finish, owner)

    def _save_setting(self, name: str, swept: SteeringVector, result: builders.SweepResult,
                      cfg: builders.SweepConfig, data: list) -> bool:
        """Store the sweep's choice with the vector, unless nothing was chosen; refuse when the vector was
        replaced or removed while the sweep ran (the choice was made for other values)."""
        setting = stored_setting(result, cfg, dataset_hash(data))
        if setting is None:
            return False
        current = self.store.get(name)
        if current.layers != swept.layers or any(not torch.equal(current.values[x], swept.values[x])
                                                 for x in swept.layers):
            raise ConflictError(f"steering vector {name!r} was replaced while the sweep ran; its setting was not "
                                "saved", param="name")
        meta = {**current.metadata, "setting": setting}
        self.store.put(name, replace(current, metadata=meta), overwrite=True, expect=current)
        return True
