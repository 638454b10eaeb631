"""/v1/files: upload, list, retrieve, download, delete.

Handlers are plain `def` where they only call the (synchronous) file service:
FastAPI runs those in its thread pool, so storage I/O never blocks the loop.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response, StreamingResponse
from vbatch.api.auth import ProjectDep, ServicesDep
from vbatch.api.errors import ERROR_RESPONSES
from vbatch.api.limits import is_head_request
from vbatch.api.uploads import UPLOAD_OPENAPI, receive_upload
from vbatch.core.schemas import FileDeleted, FileObject, ListPage

MAX_FILES_PAGE = 10_000

router = APIRouter(prefix="/v1/files", tags=["files"], responses=ERROR_RESPONSES)


@router.post(
    "",
    response_model=FileObject,
    openapi_extra=UPLOAD_OPENAPI,
    responses={413: ERROR_RESPONSES[400] | {"description": "File over the size limit"}},
    summary="Upload a file (multipart: file + purpose=batch)",
)
async def create_file(request: Request, project: ProjectDep, services: ServicesDep) -> FileObject:
    return await receive_upload(request, project, services)


@router.get("", response_model=ListPage[FileObject], summary="List files")
def list_files(
    project: ProjectDep,
    services: ServicesDep,
    purpose: str | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_FILES_PAGE)] = MAX_FILES_PAGE,
    order: Literal["asc", "desc"] = "desc",
    after: str | None = None,
) -> ListPage[FileObject]:
    files, has_more = services.files.list(project, purpose=purpose, after=after, limit=limit, order=order)
    return ListPage[FileObject].of(files, has_more=has_more)


@router.get("/{file_id}", response_model=FileObject, summary="Retrieve a file object")
def retrieve_file(file_id: str, project: ProjectDep, services: ServicesDep) -> FileObject:
    return services.files.get(project, file_id)


def content_type_for(meta: FileObject) -> str:
    return "application/jsonl" if meta.filename.lower().endswith(".jsonl") else "application/octet-stream"


@router.get(
    "/{file_id}/content",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/jsonl": {}, "application/octet-stream": {}}}},
    summary="Download a file's bytes (streamed)",
)
def file_content(file_id: str, project: ProjectDep, services: ServicesDep, request: Request) -> Response:
    if is_head_request(request.scope):  # the headers only: no reason to read the bytes
        meta = services.files.get(project, file_id)
        return Response(media_type=content_type_for(meta), headers={"content-length": str(meta.bytes)})
    # `open` fails eagerly (404) before any byte is sent; the chunks are then
    # pulled from storage one at a time as the client reads.
    meta, chunks = services.files.open(project, file_id)
    return StreamingResponse(
        chunks,
        media_type=content_type_for(meta),
        headers={"content-length": str(meta.bytes)},
    )


@router.delete("/{file_id}", response_model=FileDeleted, summary="Delete a file")
def delete_file(file_id: str, project: ProjectDep, services: ServicesDep) -> FileDeleted:
    services.files.delete(project, file_id)
    return FileDeleted(id=file_id)
