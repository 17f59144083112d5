"""Continual-personalization methods, all behind ``fastcp.methods.base.Method``."""
from fastcp.methods import merge, naive  # noqa: F401  (registration)
from fastcp.methods.base import METHODS, Context, Method, TaskBatch, get_method

__all__ = ["METHODS", "Context", "Method", "TaskBatch", "get_method"]
