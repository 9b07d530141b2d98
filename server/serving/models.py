"""The served model: its card for ``/v1/models`` and the check that a request names it."""

from __future__ import annotations

import time

from server.protocol.models import ModelCard, ModelList
from steering.engine.types import ModelInfo
from steering.errors import NotFoundError


class ModelService:
    def __init__(self, info: ModelInfo, served_name: str | None = None) -> None:
        self.info = info
        self.name = served_name or info.name
        """The name clients send."""
        self.card = ModelCard(id=self.name, created=int(time.time()), max_model_len=info.max_model_len,
                              num_layers=info.num_layers, hidden_size=info.hidden_size,
                              input_modalities=["text", "image"] if info.vision else ["text"])

    @property
    def max_model_len(self) -> int:
        return self.info.max_model_len

    def check(self, name: str | None) -> None:
        """A request naming another model is a 404 (OpenAI's ``model_not_found``)."""
        if name is not None and name != self.name:
            raise NotFoundError(f"the model '{name}' does not exist; this server serves '{self.name}'",
                                param="model")

    def listing(self) -> ModelList:
        return ModelList(data=[self.card])
