"""A small name -> function registry shared by scorers and distributions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    """Maps names to functions that all share one signature.

    Args:
        kind: What the registry holds, used in messages (e.g. ``"scorer"``).
        argument: The user-facing argument that takes a name from this registry (e.g. ``"method"``).
        register_hint: The public function that adds an entry, quoted in errors.

    """

    def __init__(self, kind: str, argument: str, register_hint: str) -> None:
        self.kind = kind
        self.argument = argument
        self.register_hint = register_hint
        self._entries: dict[str, F] = {}

    def register(self, name: str, fn: F | None = None, *, overwrite: bool = False) -> Callable[[F], F] | F:
        """Register ``fn`` under ``name``; usable as a decorator when ``fn`` is omitted.

        Raises:
            ValueError: If ``name`` is taken and ``overwrite`` is False.

        """

        def _add(f: F) -> F:
            key = name.lower()
            if key in self._entries and not overwrite:
                raise ValueError(
                    f"A {self.kind} named {name!r} is already registered; pass `overwrite=True` to replace it."
                )
            self._entries[key] = f
            return f

        return _add if fn is None else _add(fn)

    def get(self, name: str | F) -> F:
        """Return the entry called ``name``; a callable is returned unchanged.

        Raises:
            ValueError: If ``name`` is not registered; the message lists the valid names.

        """
        if callable(name):
            return name
        if not isinstance(name, str) or name.lower() not in self._entries:
            raise ValueError(
                f"Unknown `{self.argument}` {name!r}. Valid {self.kind}s: {', '.join(self.list())}. "
                f"Register a new one with `{self.register_hint}(name, fn)`."
            )
        return self._entries[name.lower()]

    def list(self) -> list[str]:
        """Names of all registered entries, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._entries
