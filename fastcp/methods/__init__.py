"""Continual-personalization methods, all behind ``fastcp.methods.base.Method``."""
from fastcp.methods import (  # noqa: F401  (registration)
    clora, dsc, ewc_dc, fl2t, joint, magmax, merge, naive, ortho, separate,
)
from fastcp.methods.base import METHODS, Context, Method, TaskBatch, get_method

__all__ = ["METHODS", "Context", "Method", "TaskBatch", "get_method"]
