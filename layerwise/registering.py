"""Registries by name (architectures, head kinds, their local losses): a name taken twice is refused, unless by the
same function imported again (a script that registers, run as __main__ and then imported by its module name)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

F = TypeVar("F", bound=Callable)


def same_function(a: Callable, b: Callable) -> bool:
    """Whether b is a, or the same source (file and first line) defined again."""
    if a is b:
        return True
    ca, cb = getattr(a, "__code__", None), getattr(b, "__code__", None)
    return (
        ca is not None and cb is not None and (ca.co_filename, ca.co_firstlineno) == (cb.co_filename, cb.co_firstlineno)
    )


class Registry(Generic[F]):
    """Functions by name; `what` names one entry in the refusal ("an architecture")."""

    def __init__(self, what: str):
        self.what = what
        self.entries: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        def add(function: F) -> F:
            if name in self.entries and not same_function(self.entries[name], function):
                raise ValueError(f"{self.what} named {name!r} is registered already")
            self.entries[name] = function
            return function

        return add

    def names(self) -> list[str]:
        return sorted(self.entries)
