"""``/v1/steering``: the vector store, building and sweeping vectors, llama.cpp export."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response
from pydantic import ValidationError

from server.deps import AdminKey, GenerateKey, ReadKey, ServicesDep
from server.errors import APIError, validation_message
from server.openapi import API_ERRORS, errors
from server.protocol.vectors import (
    BuilderList,
    JobInfo,
    VectorBuildRequest,
    VectorDeleted,
    VectorInfo,
    VectorList,
    VectorReload,
    VectorRename,
    VectorSweepRequest,
    VectorUpload,
)
from server.serving.vectors import VectorService
from steering.gguf_vectors import read_vector_file
from steering.store import NAME_RE
from steering.vectors import SteeringVector

VectorPath = Annotated[str, Path(pattern=f"^{NAME_RE.pattern}$", description="a stored vector's name")]

router = APIRouter(prefix="/v1/steering", tags=["vectors"], responses={**API_ERRORS, **errors(404)})

_FORM_FIELDS = {"name", "file", "overwrite", "description"}
_UPLOAD_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": VectorUpload.model_json_schema()},
    "multipart/form-data": {"schema": {
        "type": "object", "required": ["name", "file"], "properties": {
            "name": {"type": "string"},
            "file": {"type": "string", "format": "binary",
                     "description": "a steerserve safetensors vector or a llama.cpp control-vector GGUF"},
            "overwrite": {"type": "boolean", "default": False},
            "description": {"type": "string"}}}},
}}}


@router.get("/vectors", response_model=VectorList)
async def list_vectors(svc: ServicesDep, _: ReadKey) -> VectorList:
    return await asyncio.to_thread(svc.vectors.listing)  # a scan of the directory: off the event loop


@router.post("/vectors", response_model=VectorInfo, status_code=201, openapi_extra=_UPLOAD_BODY,
             responses=errors(409))
async def upload_vector(request: Request, svc: ServicesDep, _: AdminKey) -> VectorInfo:
    """Upload a vector as JSON (``values``: {layer: [floats]}) or as a file (multipart)."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        name, vec, overwrite, description = await _from_form(request)
    else:
        try:
            payload = VectorUpload.model_validate_json(await request.body())
        except ValidationError as exc:
            errors = list(exc.errors())
            if errors and errors[0]["type"] == "json_invalid":
                raise APIError(400, f"request body is not valid JSON: {errors[0]['msg']}") from exc
            message, param = validation_message(errors)
            raise APIError(400, message, param) from exc
        name, vec, overwrite, description = payload.name, payload.to_core(), payload.overwrite, payload.description
    return svc.vectors.put(name, vec, overwrite, description)


async def _from_form(request: Request) -> tuple[str, SteeringVector, bool, str | None]:
    form = await request.form()
    unknown = set(form.keys()) - _FORM_FIELDS
    if unknown:
        raise APIError(400, f"unknown form fields: {sorted(unknown)}; allowed: {sorted(_FORM_FIELDS)}")
    name, upload = form.get("name"), form.get("file")
    if not isinstance(name, str) or upload is None or isinstance(upload, str):
        raise APIError(400, "multipart upload needs a 'name' field and a 'file' (safetensors, or a llama.cpp "
                       "control-vector GGUF)", "file")
    vec = read_vector_file(await upload.read(), getattr(upload, "filename", None) or "the uploaded file")
    overwrite = str(form.get("overwrite", "false")).lower() in ("1", "true", "yes")
    desc = form.get("description")
    return name, vec, overwrite, desc if isinstance(desc, str) else None


@router.post("/vectors/reload", response_model=VectorReload)
async def reload_vectors(svc: ServicesDep, _: AdminKey) -> VectorReload:
    """Re-scan the vector directory now (vectors written by the CLI or another process are otherwise found on
    first use and by listings): what was added, removed, changed, and which files are not usable."""
    return await asyncio.to_thread(svc.vectors.reload)


@router.get("/vectors/{name}", response_model=VectorInfo)
async def get_vector(name: VectorPath, svc: ServicesDep, _: ReadKey) -> VectorInfo:
    return svc.vectors.get(name)


@router.delete("/vectors/{name}", response_model=VectorDeleted)
async def delete_vector(name: VectorPath, svc: ServicesDep, _: AdminKey) -> VectorDeleted:
    svc.vectors.delete(name)
    return VectorDeleted(id=name)


@router.post("/vectors/{name}/rename", response_model=VectorInfo, responses=errors(409))
async def rename_vector(name: VectorPath, req: VectorRename, svc: ServicesDep, _: AdminKey) -> VectorInfo:
    return svc.vectors.rename(name, req)


@router.get("/vectors/{name}/gguf", response_class=Response,
            responses={200: {"content": {"application/octet-stream": {}}, "description": "a llama.cpp control vector"}})
async def export_vector_gguf(name: VectorPath, svc: ServicesDep, _: ReadKey,
                            scale: Annotated[float, Query(ge=-1e6, le=1e6)] = 1.0) -> Response:
    data, dropped = svc.vectors.export_gguf(name, scale)
    headers = {"Content-Disposition": f'attachment; filename="{name}.gguf"'}
    if dropped:
        headers["X-Steerserve-Dropped-Layers"] = ",".join(map(str, dropped))
    return Response(data, media_type="application/octet-stream", headers=headers)


@router.get("/methods", response_model=BuilderList)
async def vector_methods(_: ReadKey) -> BuilderList:
    return VectorService.methods()


@router.post("/vectors/build", response_model=JobInfo, status_code=202, responses=errors(409, 501))
async def build_vector(req: VectorBuildRequest, svc: ServicesDep, who: AdminKey) -> JobInfo:
    return await svc.vectors.build(req, who)


@router.post("/vectors/{name}/sweep", response_model=JobInfo, status_code=202, responses=errors(501))
async def sweep_vector(name: VectorPath, req: VectorSweepRequest, svc: ServicesDep, who: GenerateKey) -> JobInfo:
    return await svc.vectors.sweep(name, req, who)
