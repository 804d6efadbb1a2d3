"""revify: train existing residual networks with far less activation memory.

``revify.convert(model)`` rewrites chains of identity residual units into reversible couplings
that rebuild their activations in backward, and checkpoints the layers in between.
"""

from ._compile import compile_units as compile_units
from ._mode import plain_autograd as plain_autograd
from ._plan import ConversionError as ConversionError
from .audit import AuditReport as AuditReport
from .audit import AuditRow as AuditRow
from .audit import audit as audit
from .check import CheckReport as CheckReport
from .check import check as check
from .convert import convert as convert
from .convert import load_state_dict as load_state_dict
from .convert import revert as revert
from .convert import set_on_mismatch as set_on_mismatch
from .convert import stages as stages
from .coupling import ReversibleStage as ReversibleStage
from .planner import FitRow as FitRow
from .planner import MemoryPlan as MemoryPlan
from .planner import fit as fit
from .planner import memory_plan as memory_plan
from .planner import plan_memory as plan_memory
from .schedule import Schedule as Schedule

__all__ = [
    "convert",
    "revert",
    "load_state_dict",
    "stages",
    "compile_units",
    "set_on_mismatch",
    "check",
    "CheckReport",
    "audit",
    "AuditReport",
    "AuditRow",
    "plain_autograd",
    "ReversibleStage",
    "Schedule",
    "MemoryPlan",
    "plan_memory",
    "memory_plan",
    "fit",
    "FitRow",
    "ConversionError",
]
__version__ = "0.1.0"
