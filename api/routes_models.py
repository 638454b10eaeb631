"""/v1/models: the model ids this deployment serves, in OpenAI's list shape.

Authenticated like every /v1 route (the project is not used: every project may
use every served model).
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel
from vbatch.api.auth import ProjectDep, ServicesDep
from vbatch.api.errors import ERROR_RESPONSES
from vbatch.core.errors import NotFound

router = APIRouter(prefix="/v1/models", tags=["models"], responses=ERROR_RESPONSES)


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


def _models(services) -> list[Model]:
    return [Model(id=m, created=services.models_created, owned_by=services.models_owned_by) for m in services.model_ids]


@router.get("", response_model=ModelList, summary="List the served models")
def list_models(project: ProjectDep, services: ServicesDep) -> ModelList:
    return ModelList(data=_models(services))


@router.get("/{model_id:path}", response_model=Model, summary="Retrieve a served model")
def retrieve_model(model_id: str, project: ProjectDep, services: ServicesDep) -> Model:
    for model in _models(services):
        if model.id == model_id:
            return model
    raise NotFound(f"The model {model_id!r} does not exist or is not served here.", code="model_not_found", param="model")
