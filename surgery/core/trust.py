"""Resolve ``package.module:attr`` names read from files without running code from outside the allow-list.

Every name a file can hold (a recipe's model source, leaf modules and module specs, a
run's nets, an adapter's class, a ``module:callable`` option of another command) goes
through :func:`resolve`. Without ``trust_code`` a name is accepted only if

* its module lies in a trusted package (whole package names are compared, so
  ``torch`` never matches ``torchrelevil``) - checked *before* anything is imported;
* every step of its attribute path is a module or class of a trusted package (so
  ``surgery.io:os.system`` stops at ``os``); and
* the object is of an allowed kind: an ``nn.Module`` subclass *defined* in a trusted
  package (its ``__module__``), or a model builder the library knows (torchvision's
  registered builders, functions marked with :func:`model_builder`).

Nothing is called here: the caller calls the object only after it passed. With
``trust_code=True`` any importable callable is returned.

>>> resolve("torch.nn:Conv2d", what="a module class")
<class 'torch.nn.modules.conv.Conv2d'>
>>> resolve("surgery.files.io:os.system", what="the model source")
Traceback (most recent call last):
...
surgery.core.errors.SurgeryError: the model source 'surgery.files.io:os.system' reaches 'os', which is not part of ...
"""

from __future__ import annotations

import enum
import functools
import importlib
import re
import types
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from surgery.core.errors import SurgeryError
from surgery.core.moved import current_module
from surgery.core.util import first_line

TRUSTED_PACKAGES = ("torch", "torchvision", "surgery", "growth", "xross", "timm", "transformers")
TRUST_HINT = "pass --trust-code (Python: trust_code=True) only if you trust where it came from"

_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_BUILDERS: set[Callable[..., Any]] = set()

F = TypeVar("F", bound=Callable[..., Any])


class Kind(enum.Enum):
    """What a name may resolve to."""

    MODULE_CLASS = "an nn.Module class"
    MODEL_SOURCE = "an nn.Module class or a known model builder"


def model_builder(fn: F) -> F:
    """Mark a function of this library as a model builder that recipes may name without ``trust_code``."""
    _BUILDERS.add(fn)
    return fn


def in_trusted_package(module_name: str) -> bool:
    """True when ``module_name`` is a trusted package or one of its submodules (whole names compared)."""
    top = module_name.split(".", 1)[0]
    return top in TRUSTED_PACKAGES


@functools.lru_cache(maxsize=1)
def _torchvision_builders() -> frozenset[Callable[..., Any]]:
    import torchvision

    return frozenset(torchvision.models.get_model_builder(name) for name in torchvision.models.list_models())


def is_known_builder(obj: Any) -> bool:
    """A model builder the library knows: torchvision's registered builders and :func:`model_builder` functions."""
    try:
        return obj in _BUILDERS or obj in _torchvision_builders()
    except TypeError:  # unhashable objects are no builders
        return False


def _is_module_class(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, nn.Module)


def _defined_in(obj: Any) -> str:
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    return str(getattr(obj, "__module__", None) or "")


def split_spec(spec: str, what: str) -> tuple[str, list[str]]:
    """``"pkg.mod:Attr.path"`` -> ``("pkg.mod", ["Attr", "path"])``, or a one-line error."""
    mod, sep, attr = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not sep or not _DOTTED.match(mod) or not _DOTTED.match(attr):
        raise SurgeryError(f"{what} '{spec}' is not of the form 'package.module:attribute'")
    return mod, attr.split(".")


def _trusted_names() -> str:
    return ", ".join(TRUSTED_PACKAGES[:-1]) + f" or {TRUSTED_PACKAGES[-1]}"


def resolve(spec: str, *, kind: Kind = Kind.MODULE_CLASS, trust_code: bool = False, what: str = "the name") -> Any:
    """The object ``spec`` (``"package.module:attribute.path"``) names, if it may be used (see the module doc).

    Raises :class:`SurgeryError` in one line: a malformed name, a refusal that says to
    pass ``--trust-code``, a module that does not import, a missing attribute.
    """
    mod_name, attrs = split_spec(spec, what)
    mod_name = current_module(mod_name)
    if not trust_code and not in_trusted_package(mod_name):
        raise SurgeryError(
            f"{what} '{spec}' imports '{mod_name}', which is not part of {_trusted_names()}; {TRUST_HINT}"
        )
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as e:
        raise SurgeryError(
            f"{what} '{spec}': cannot import '{mod_name}' ({first_line(e)}); install it or fix the name"
        ) from None
    for part in attrs:
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise SurgeryError(
                f"{what} '{spec}': '{_defined_in(obj) or mod_name}' has no attribute '{part}'; check the name"
            ) from None
        except Exception as e:  # noqa: BLE001 - a lazy module attribute failing to load
            raise SurgeryError(f"{what} '{spec}': cannot read '{part}' ({first_line(e)})") from None
        if not trust_code and not in_trusted_package(_defined_in(obj)):
            shown = _defined_in(obj) or type(obj).__name__
            raise SurgeryError(
                f"{what} '{spec}' reaches '{shown}', which is not part of {_trusted_names()}; {TRUST_HINT}"
            )
    if not callable(obj):
        raise SurgeryError(f"{what} '{spec}' is a {type(obj).__name__}, not {kind.value}")
    if trust_code:
        return obj
    allowed = _is_module_class(obj) or (kind is Kind.MODEL_SOURCE and is_known_builder(obj))
    if not allowed:
        raise SurgeryError(f"{what} '{spec}' is not {kind.value} of {_trusted_names()}; {TRUST_HINT}")
    return obj


def class_name(cls: type) -> str:
    """The ``module:QualName`` that :func:`resolve` turns back into ``cls``."""
    return f"{cls.__module__}:{cls.__qualname__}"
