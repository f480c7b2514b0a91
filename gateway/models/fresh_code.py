"""A model's own code, compiled from its source each time it is loaded.

Python takes a module's cached bytecode (`__pycache__/*.pyc`) for current when the source's size
and modification time, in whole seconds, are those it was compiled from. Model code rewritten
within the same second with the same size, or unpacked with fixed times (the archives of a
reproducible build all carry one date), was served as the old code after a reload, with no word
of it. So while a model loads, the modules of its own package (or its own module, when it is
not in a package) are compiled from their source, and no bytecode of them is read or written.
Everything else it imports (its libraries) is cached by Python as usual.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from importlib.machinery import ModuleSpec, PathFinder, SourceFileLoader
from pathlib import Path
from types import CodeType, ModuleType


class _FromSource(SourceFileLoader):
    def get_code(self, fullname: str) -> CodeType:
        return self.source_to_code(self.get_data(self.path), self.path)


class _OwnCodeFinder:
    """Finds modules as Python's path finder does, and loads those under `root` from source."""

    def __init__(self, root: Path) -> None:
        self._root = root

    def find_spec(
        self, name: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        spec = PathFinder.find_spec(name, path, target)
        if spec is None or spec.origin is None or type(spec.loader) is not SourceFileLoader:
            return None
        origin = Path(spec.origin).resolve()
        if origin != self._root and not origin.is_relative_to(self._root):
            return None
        spec.loader = _FromSource(name, spec.origin)
        return spec


def own_code_root(module_name: str) -> Path | None:
    """The model's own code: the directory of the top-level package `module_name` is in, or
    the file of a top-level module; None when that cannot be told without importing it (a
    namespace package, a module that is not a Python source file, one that is not there)."""
    top = module_name.partition(".")[0]
    try:
        spec = PathFinder.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return None
    origin = Path(spec.origin).resolve()
    return origin.parent if spec.submodule_search_locations is not None else origin


@contextlib.contextmanager
def compiled_from_source(module_name: str) -> Iterator[None]:
    """While the block runs, modules of `module_name`'s own code that are imported are
    compiled from their source (see the module's docstring)."""
    root = None if module_name in sys.modules else own_code_root(module_name)
    if root is None:
        yield
        return
    finder = _OwnCodeFinder(root)
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
