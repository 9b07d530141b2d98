"""Steering-vector builders by name: ``grains`` (:mod:`.grains`), ``caa``, ``pca`` and ``probe``
(:mod:`.contrast`); building (:mod:`.api`) and sweeping (:mod:`.sweep`) as jobs."""

from steering.tasks.builders import contrast, grains  # noqa: F401 - register the builders
from steering.tasks.builders.api import (
    BuildLimits,
    BuildRequest,
    BuildResult,
    PreparedBuild,
    build,
    encode,
    encoding,
    prepare_build,
    prepare_sweep,
    sweep,
)
from steering.tasks.builders.registry import BUILDERS, builder_names, get_builder
from steering.tasks.builders.sweep import FluencyConfig, SweepConfig, SweepResult, check_sweep, sweep_work

__all__ = [
    "BUILDERS", "BuildLimits", "BuildRequest", "BuildResult", "FluencyConfig", "PreparedBuild", "SweepConfig",
    "SweepResult",
    "build", "builder_names", "check_sweep", "encode", "encoding", "get_builder", "prepare_build", "prepare_sweep",
    "sweep", "sweep_work",
]
