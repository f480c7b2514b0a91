"""Name -> model. Built-ins by name; user models by "package.module:factory"."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator

from gateway.models.base import UNKNOWN_LABEL, Model, check_model
from gateway.models.fresh_code import compiled_from_source

# The label of a model name the gateway does not serve.
UNKNOWN = UNKNOWN_LABEL

BUILTINS: dict[str, str] = {
    "shape": "gateway.models.shape:create",
    "qrcode": "gateway.models.qrcode:create",
}


def load_model(spec: str) -> Model:
    """Load a model from a built-in name or "package.module:factory" (a zero-argument callable)."""
    target = BUILTINS.get(spec, spec)
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(
            f"unknown model {spec!r}: use a built-in ({', '.join(BUILTINS)}) "
            "or package.module:factory"
        )
    # The built-ins are the gateway's own code, which changes only with it.
    own_code = contextlib.nullcontext() if spec in BUILTINS else compiled_from_source(module_name)
    with own_code:
        return check_model(_make(spec, module_name, attr), spec)


def _make(spec: str, module_name: str, attr: str) -> object:
    try:
        factory: Callable[[], object] = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load model {spec!r}: {exc}") from exc
    except (Exception, SystemExit) as exc:
        # What the module raised as it was imported: a syntax error in code edited before a
        # reload, a KeyError for an environment variable. A traceback of some forty lines
        # stopped the start, not one line naming the model.
        raise ValueError(
            f"cannot load model {spec!r}: importing {module_name} raised "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    try:
        model = factory()
    except (Exception, SystemExit) as exc:
        # SystemExit too (a model's argparse): one process exited with its code, 0 included,
        # and nothing logged; systemd's Restart=on-failure then left the gateway down.
        # Named, and no traceback: with several --model flags the message said only what the
        # factory said ("weights file missing"), and a KeyError stopped the start with a
        # traceback instead of the one-line error every other bad setting gets.
        raise ValueError(f"model {spec!r} did not load: {type(exc).__name__}: {exc}") from exc
    return model


class ModelRegistry:
    """The models a gateway serves; the first one registered is the default."""

    def __init__(self, models: list[Model]) -> None:
        if not models:
            raise ValueError("a gateway needs at least one model")
        self._models: dict[str, Model] = {}
        for model in models:
            check_model(model, f"model {getattr(model, 'name', type(model).__name__)!r}")
            if model.name in self._models:
                raise ValueError(f"two models are named {model.name!r}")
            self._models[model.name] = model
        self.default_name = models[0].name

    @classmethod
    def from_specs(cls, specs: list[str]) -> ModelRegistry:
        return cls([load_model(spec) for spec in specs])

    def get(self, name: str) -> Model | None:
        """The named model, the default one for an empty name, or None."""
        return self._models.get(name or self.default_name)

    def label(self, name: str) -> str:
        """What metrics and access records call the model a request names: the served model's
        own name (the default one's for an empty name), or UNKNOWN for any other name, so that
        clients cannot add label values (each is a series kept for the process's life)."""
        model = self.get(name)
        return model.name if model is not None else UNKNOWN

    def names(self) -> list[str]:
        return list(self._models)

    def __iter__(self) -> Iterator[Model]:
        return iter(self._models.values())
