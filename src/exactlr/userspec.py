"""Load the user's own objects from ``module:attribute`` specs (uvicorn/gunicorn style).

A spec names a Python object to import:

* ``pkg.module:factory``: ``factory`` in the importable module ``pkg.module`` (the
  current directory is searched first, as ``python -m`` does; ``sys.path`` is restored
  after the import);
* ``path/to/file.py:factory``: ``factory`` in that file, loaded under a private module
  name with :func:`importlib.util.spec_from_file_location`;
* ``attr.sub`` after the colon walks attributes (``module:Class.build``).

Every problem the user can fix raises ``ValueError`` naming the spec and what to do.

Example:
    >>> load_object("math:sqrt")(4.0)
    2.0
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any


def _split(spec: str, what: str) -> tuple[str, str]:
    module, sep, attribute = spec.rpartition(":")
    # A Windows drive ("C:\\x.py") has its colon before the path, never at the end.
    if not sep or not module or not attribute or attribute.endswith((".py", "/", "\\")):
        raise ValueError(
            f"{what} {spec!r} is not of the form 'pkg.module:attribute' or "
            "'path/to/file.py:attribute'"
        )
    return module, attribute


def _from_file(path_text: str, spec: str, what: str) -> ModuleType:
    path = Path(path_text)
    if not path.is_file():
        raise ValueError(f"{what} {spec!r}: no file {path_text!r}; check the path")
    name = f"exactlr_user_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"{what} {spec!r}: {path_text!r} cannot be loaded as a Python file")
    module = importlib.util.module_from_spec(module_spec)
    # Registered before running so dataclasses and pickling inside the file can find it.
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:
        sys.modules.pop(name, None)
        raise ValueError(
            f"{what} {spec!r}: running {path_text} failed: {type(err).__name__}: {err}"
        ) from err
    return module


def _import(module_name: str, spec: str, what: str) -> ModuleType:
    cwd = str(Path.cwd())
    added = cwd not in sys.path and "" not in sys.path
    if added:  # for the import only: sys.path is restored below
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        missing = err.name or module_name
        if module_name == missing or module_name.startswith(f"{missing}."):
            raise ValueError(
                f"{what} {spec!r}: no module named {missing!r}; check the name, or run from "
                "the folder that holds it (or give a path/to/file.py)"
            ) from err
        raise ValueError(
            f"{what} {spec!r}: importing {module_name} failed: module {missing!r} is not installed"
        ) from err
    except Exception as err:
        raise ValueError(
            f"{what} {spec!r}: importing {module_name} failed: {type(err).__name__}: {err}"
        ) from err
    finally:
        if added:
            sys.path.remove(cwd)


def load_object(spec: str, *, what: str = "spec") -> Any:
    """Imports the object a ``module:attribute`` or ``file.py:attribute`` spec names.

    Args:
        spec: ``pkg.module:attr`` or ``path/to/file.py:attr`` (``attr`` may be dotted).
        what: How error messages name the spec, e.g. ``"--model"``.

    Returns:
        The object.

    Raises:
        ValueError: A malformed spec, a missing module, file or attribute, or an error
            raised while importing the module (its type and message included).
    """
    module_part, attribute = _split(spec, what)
    if module_part.endswith(".py") or "/" in module_part or "\\" in module_part:
        module = _from_file(module_part, spec, what)
    else:
        module = _import(module_part, spec, what)
    obj: Any = module
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(
                f"{what} {spec!r}: {module_part} has no attribute {attribute!r}"
            ) from None
    return obj


def load_callable(spec: str, *, what: str = "spec") -> Any:
    """:func:`load_object`, and the object must be callable (a factory or loader)."""
    obj = load_object(spec, what=what)
    if not callable(obj):
        raise ValueError(
            f"{what} {spec!r} is a {type(obj).__name__}, not a callable; name a function "
            "that returns it"
        )
    return obj
