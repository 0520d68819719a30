"""One shape for every registry of the library: register by name, get by name, list the names.

A registry maps names to things (a growth op, a channel rule, a training method, an
optimiser). Every registry in surgery, growth and xross is a :class:`Registry`, so they
all register, look up and refuse the same way: an unknown name is one line that names
the registry, the closest known names and the error class of the package asking.

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
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar, overload

from surgery.core.errors import SurgeryError, UserError, closest

T = TypeVar("T")


class Registry(Generic[T]):
    """Named things of one kind, in registration order.

    Args:
        kind: what one entry is, for messages (``"growth op"``, ``"method"``).
        error: the error class raised for an unknown or doubly registered name
            (each package passes its own, so its CLI prints one line and exits 2).
    """

    def __init__(self, kind: str, *, error: type[UserError] = SurgeryError) -> None:
        self.kind = kind
        self.error = error
        self._entries: dict[str, T] = {}

    @overload
    def register(self, name: str) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str, obj: T, *, replace: bool = False) -> T: ...

    def register(self, name: str, obj: T | None = None, *, replace: bool = False) -> T | Callable[[T], T]:
        """Register ``obj`` as ``name`` (or, without ``obj``, a decorator that does); returns ``obj``."""

        def add(thing: T) -> T:
            if name in self._entries and not replace and self._entries[name] is not thing:
                raise self.error(f"{self.kind} '{name}' is registered already; pass replace=True to replace it")
            self._entries[name] = thing
            return thing

        return add if obj is None else add(obj)

    def unregister(self, name: str) -> None:
        """Remove ``name`` (a test's toy entry, say); unknown names are refused like :meth:`get`."""
        self.get(name)
        del self._entries[name]

    def get(self, name: str) -> T:
        """The entry registered as ``name``, or one line naming the closest names."""
        try:
            return self._entries[name]
        except KeyError:
            found = closest(str(name), self._entries)
            near = f" (closest: {', '.join(found)})" if found else ""
            raise self.error(f"unknown {self.kind} '{name}'{near}; choose one of {', '.join(self._entries)}") from None

    __getitem__ = get

    def names(self) -> list[str]:
        """The registered names, in registration order."""
        return list(self._entries)

    def items(self) -> list[tuple[str, T]]:
        """``(name, entry)`` pairs, in registration order."""
        return list(self._entries.items())

    def values(self) -> list[T]:
        """The entries, in registration order."""
        return list(self._entries.values())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"
