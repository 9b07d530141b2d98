"""Token attribution: which prompt tokens drove an output, by method name (like Inseq).

Methods: ``integrated_gradients``, ``saliency``, ``input_x_gradient`` (:mod:`.gradients`), ``attention`` and
``attention_rollout`` (:mod:`.attention`), ``occlusion`` (:mod:`.occlusion`), ``reagent`` (:mod:`.reagent`).
Targets (:mod:`.targets`): a continuation's summed log-probability, each of its tokens (a matrix), or the
contrast log P(preferred) - log P(dispreferred).
"""

from steering.tasks.attribution import attention, gradients, occlusion, reagent  # noqa: F401 - register the methods
from steering.tasks.attribution.api import (
    AttributionLimits,
    AttributionRequest,
    AttributionResult,
    PreparedAttribution,
    attribute,
    check_method,
    prepare,
)
from steering.tasks.attribution.registry import METHODS, get_method, method_names
from steering.tasks.attribution.runner import Cost
from steering.tasks.attribution.targets import TARGET_KINDS, AttributionTarget

__all__ = [
    "METHODS",
    "TARGET_KINDS",
    "AttributionLimits",
    "AttributionRequest",
    "AttributionResult",
    "AttributionTarget",
    "Cost",
    "PreparedAttribution",
    "attribute",
    "check_method",
    "get_method",
    "method_names",
    "prepare",
]
