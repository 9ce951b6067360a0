"""/v1/files and /v1/batches in OpenAI's request and response shapes (the official `openai` client's
`files.create / retrieve / list / content / delete` and `batches.create / retrieve / list / cancel`)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import FastAPI, Request, Response
from pydantic import BaseModel, Field

from adgen.serve.batches.runner import BatchRunner
from adgen.serve.schemas import parse_body
from adgen.serve.security import ApiError


class BatchCreateRequest(BaseModel):
    model_config = {"extra": "forbid"}

    input_file_id: Annotated[str, Field(min_length=1, max_length=64)]
    endpoint: Annotated[str, Field(min_length=1, max_length=64)]
    completion_window: Annotated[str, Field(max_length=16)] = "24h"
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None = None


UPLOAD_SCHEMA = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"],
    "properties": {"file": {"type": "string", "format": "binary"}, "purpose": {"type": "string", "enum": ["batch"]}},
}}}}}
CREATE_SCHEMA = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": BatchCreateRequest.model_json_schema()}}}}


def add_batch_routes(app: FastAPI, runner: BatchRunner) -> None:
    files, store = runner.files, runner.store

    @app.post("/v1/files", openapi_extra=UPLOAD_SCHEMA)
    async def upload_file(request: Request):
        try:
            form = await request.form(max_files=1, max_fields=8)
        except Exception as e:  # not multipart, or a malformed one
            raise ApiError(400, f"upload a file as multipart/form-data with fields 'file' and 'purpose' ({e})") from None
        upload, purpose = form.get("file"), form.get("purpose")
        if upload is None or isinstance(upload, str):
            raise ApiError(400, "the form has no file part 'file'", param="file")
        if not isinstance(purpose, str):
            raise ApiError(400, "the form has no field 'purpose' (use 'batch')", param="purpose")
        data = await upload.read()
        return files.create(data, filename=upload.filename or "upload.jsonl", purpose=purpose)

    @app.get("/v1/files")
    async def list_files(purpose: str | None = None):
        data = files.list(purpose=purpose)
        return {"object": "list", "data": data, "has_more": False}

    @app.get("/v1/files/{file_id}")
    async def get_file(file_id: str):
        return files.get(file_id)

    @app.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str):
        return Response(files.content(file_id), media_type="application/jsonl")

    @app.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str):
        return files.delete(file_id)

    @app.post("/v1/batches", openapi_extra=CREATE_SCHEMA)
    async def create_batch(request: Request):
        req: BatchCreateRequest = parse_body(BatchCreateRequest, await request.body())
        return runner.create(req.input_file_id, req.endpoint, req.completion_window, req.metadata)

    @app.get("/v1/batches")
    async def list_batches(limit: str = "20", after: str | None = None):
        if not limit.isdigit() or not 1 <= int(limit) <= 100:
            raise ApiError(400, f"limit must be an integer from 1 to 100, not {limit!r}", param="limit")
        return _page(store.list(), int(limit), after)

    @app.get("/v1/batches/{batch_id}")
    async def get_batch(batch_id: str):
        return store.get(batch_id)

    @app.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str):
        return runner.cancel(batch_id)


def _page(items: list[dict[str, Any]], limit: int, after: str | None) -> dict[str, Any]:
    """OpenAI's cursor page: the `limit` items after the one with id `after` (newest first)."""
    start = 0
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise ApiError(400, f"after: no batch with id '{after}'", param="after")
        start = ids.index(after) + 1
    page = items[start : start + limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": start + limit < len(items)}
