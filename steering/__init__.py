"""steerserve core: steering vectors and specs, the backend contract, the Hugging Face backend, and the model
work built on it (attribution, vector builders, evaluation).

Nothing in this package knows about HTTP or the command line; ``server/`` and ``cli/`` sit on top of it.
Layers, from the bottom: value types (:mod:`.vectors`, :mod:`.spec`, :mod:`.sampling`, :mod:`.errors`), the
contract (:mod:`.engine`), backends (:mod:`.backends.hf`), and the tasks (:mod:`.tasks`).
"""

from steering.errors import (
    ConflictError,
    EngineClosedError,
    InvalidRequestError,
    ModelLoadError,
    NotFoundError,
    QueueFullError,
    SteeringError,
    SteeringValidationError,
)
from steering.sampling import SamplingParams
from steering.spec import SteeringApplication, SteeringSpec
from steering.vectors import SteeringVector

__all__ = [
    "ConflictError",
    "EngineClosedError",
    "InvalidRequestError",
    "ModelLoadError",
    "NotFoundError",
    "QueueFullError",
    "SamplingParams",
    "SteeringApplication",
    "SteeringError",
    "SteeringSpec",
    "SteeringValidationError",
    "SteeringVector",
]
__version__ = "0.2.0"
