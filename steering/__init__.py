"""steerserve core: model loading, layer discovery, steering hooks, the batching engine.

Nothing in this package knows about HTTP; ``server/`` is a thin layer over it.
"""

from steering.errors import (
    EngineClosedError,
    EngineError,
    ModelLoadError,
    QueueFullError,
    SteeringValidationError,
)

__all__ = [
    "EngineClosedError",
    "EngineError",
    "ModelLoadError",
    "QueueFullError",
    "SteeringValidationError",
]
__version__ = "0.1.0"
