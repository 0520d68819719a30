"""One shape for every registry of the library: register by name, get by name, list the names.

A registry maps names to things (a growth op, a channel rule, a training method, an
optimiser). Every registry in surgery, growth and xross is a :class:`Registry`, so they
all register, look up and refuse the same way: an unknown name is one line that names
the registry, the closest known names and the error class of the package asking.

A name is usually a string; the channel rules key theirs by the graph's own targets (a
function, an aten operator, a module class), so any hashable key is accepted and
messages show its :func:`label`. :meth:`Registry.find` is the lookup that may miss
(None, for callers with a fallback) and :meth:`Registry.for_class` looks a class up along
its MRO, by class or, for classes of optional packages, by class name.

>>> from surgery.core.registry import Registry
>>> colours = Registry("colour")
>>> @colours.register("red")
... def red() -> str:
...     return "#f00"
>>> colours.register("green", lambda: "#0f0")  # doctest: +ELLIPSIS
<function <lambda> at ...>
>>> colours.names()
['red', 'green']
>>> colours.get("red")()
'#f00'
>>> "blue" in colours
False
>>> colours.get("rde")
Traceback (most recent call last):
...
surgery.core.errors.SurgeryError: unknown colour 'rde' (closest: red, green); choose one of red, green
>>> colours.register("red", lambda: "#e00")
Traceback (most recent call last):
...
surgery.core.errors.SurgeryError: colour 'red' is registered already; pass replace=True to replace it
>>> colours.find("blue") is None
True
>>> from torch import nn
>>> layers = Registry("layer")
>>> _ = layers.register(nn.modules.conv._ConvNd, "conv")
>>> _ = layers.register("Conv1D", "hf conv1d")  # a class of an optional package, by name
>>> layers.for_class(nn.Conv2d), layers.for_class(type("Conv1D", (nn.Module,), {})), layers.for_class(nn.ReLU)
('conv', 'hf conv1d', None)
>>> layers.names()
['_ConvNd', 'Conv1D']
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from typing import Any, Generic, overload

from typing_extensions import TypeVar

from surgery.core.errors import SurgeryError, UserError, closest

T = TypeVar("T")
K = TypeVar("K", bound=Hashable, default=str)  # the key type: names by default


def label(key: Hashable) -> str:
    """How a key reads in messages and :meth:`Registry.names`: a string as it is, a class or function by name."""
    if isinstance(key, str):
        return key
    name = getattr(key, "__name__", None)
    return name if isinstance(name, str) and not hasattr(key, "overloadpacket") else str(key)


class Registry(Generic[T, K]):
    """Named things of one kind, in registration order.

    Args:
        kind: what one entry is, for messages (``"growth op"``, ``"method"``).
        error: the error class raised for an unknown or doubly registered name
            (each package passes its own, so its CLI prints one line and exits 2).
    """

    def __init__(self, kind: str, *, error: type[UserError] = SurgeryError) -> None:
        self.kind = kind
        self.error = error
        self._entries: dict[K, T] = {}

    @overload
    def register(self, name: K) -> Callable[[T], T]: ...

    @overload
    def register(self, name: K, obj: T, *, replace: bool = False) -> T: ...

    def register(self, name: K, obj: T | None = None, *, replace: bool = False) -> T | Callable[[T], T]:
        """Register ``obj`` as ``name`` (or, without ``obj``, a decorator that does); returns ``obj``."""

        def add(thing: T) -> T:
            if name in self._entries and not replace and self._entries[name] is not thing:
                raise self.error(f"{self.kind} '{label(name)}' is registered already; pass replace=True to replace it")
            self._entries[name] = thing
            return thing

        return add if obj is None else add(obj)

    def unregister(self, name: K) -> None:
        """Remove ``name`` (a test's toy entry, say); unknown names are refused like :meth:`get`."""
        self.get(name)
        del self._entries[name]

    def get(self, name: K) -> T:
        """The entry registered as ``name``, or one line naming the closest names."""
        try:
            return self._entries[name]
        except KeyError:
            names = self.names()
            found = closest(label(name), names)
            near = f" (closest: {', '.join(found)})" if found else ""
            raise self.error(f"unknown {self.kind} '{label(name)}'{near}; choose one of {', '.join(names)}") from None

    __getitem__ = get

    def find(self, name: K) -> T | None:
        """The entry registered as ``name``, or None (for callers that fall back on something else)."""
        return self._entries.get(name)

    def for_class(self, cls: type) -> T | None:
        """The entry of the first class along ``cls``'s MRO registered by class or by class name; None if none."""
        entries: dict[Any, T] = self._entries
        for base in cls.__mro__:
            found = entries.get(base)
            if found is None:
                found = entries.get(base.__name__)
            if found is not None:
                return found
        return None

    def names(self) -> list[str]:
        """The registered names (:func:`label` of each key), in registration order."""
        return [label(k) for k in self._entries]

    def items(self) -> list[tuple[K, T]]:
        """``(name, entry)`` pairs, in registration order."""
        return list(self._entries.items())

    def values(self) -> list[T]:
        """The entries, in registration order."""
        return list(self._entries.values())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[K]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"
