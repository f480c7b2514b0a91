"""Model plug-ins: the batch-first interface, the registry and the built-in models."""

from gateway.models.base import Model
from gateway.models.registry import ModelRegistry, load_model

__all__ = ["Model", "ModelRegistry", "load_model"]
