"""Steering-vector builders by name: ``grains`` (:mod:`.grains`), ``caa``, ``pca`` and ``probe``
(:mod:`.contrast`); building and sweeping as jobs (:mod:`.api`)."""

from steering.tasks.builders import contrast, grains  # noqa: F401 - register the builders
from steering.tasks.builders.api import (
    BuildLimits,
    BuildRequest,
    BuildResult,
    PreparedBuild,
    SweepConfig,
    SweepResult,
    build,
    check_sweep,
    encode,
    encoding,
    prepare_build,
    prepare_sweep,
    sweep,
    sweep_work,
)
from steering.tasks.builders.registry import BUILDERS, builder_names, get_builder

__all__ = [
    "BUILDERS", "BuildLimits", "BuildRequest", "BuildResult", "PreparedBuild", "SweepConfig", "SweepResult",
    "build", "builder_names", "check_sweep", "encode", "encoding", "get_builder", "prepare_build", "prepare_sweep",
    "sweep", "sweep_work",
]
