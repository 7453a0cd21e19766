"""One pipeline: ``plan`` (every check, headers only) then ``execute`` (stream, merge, write).

``merge``, ``cluster``, ``route``, ``run`` (recipes), ``eval compare`` and the search are thin callers.
"""

from ..options import make_options
from ..request import MergeRequest, ModuleOverride
from .api import merge
from .execute import MergeResult, execute, merge_stream
from .plan import MergePlan, ModulePlan, plan, resolve_device, resolve_dtype
from .recipe_plan import plan_recipe

__all__ = ["MergePlan", "MergeRequest", "MergeResult", "ModuleOverride", "ModulePlan", "execute", "make_options", "merge", "merge_stream", "plan",
           "plan_recipe", "resolve_device", "resolve_dtype"]
