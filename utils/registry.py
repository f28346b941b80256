"""Named things chosen on the command line (methods, datasets, …), each defined once.

A :class:`Registry` maps names to entries. The package that owns the things fills it when it is imported
(``model`` registers its methods, ``datasets`` its benchmarks); the command line takes its choices from it, and a
name that is not there is one :class:`~utils.errors.UserError` listing the known ones.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from utils.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """An ordered mapping from names to entries, with the flag that chooses among them.

    Args:
        kind: what the entries are, for messages ("method", "dataset").
        flag: the command-line flag whose value is looked up ("--model").
    """

    def __init__(self, kind: str, flag: str) -> None:
        self.kind = kind
        self.flag = flag
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        """Add ``entry`` under ``name``; registering the same name again replaces it (a module imported twice,
        or a test redefining an entry). Returns ``entry``."""
        if not name or not isinstance(name, str):
            raise ValueError(f"a {self.kind} needs a non-empty name, got {name!r}")
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(self._entries) or "(none registered)"
            raise UserError(f"{self.flag} {name!r}: unknown {self.kind}; choose one of {known}") from None

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())
