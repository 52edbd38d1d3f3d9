"""A small name -> function registry, with per-entry metadata, shared by every pluggable family."""

from __future__ import annotations

from collections.abc import Callable
from types import MappingProxyType
from typing import Any, Generic, TypeVar

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    """Maps names to functions that all share one signature, each with a metadata dict.

    Metadata describes what an entry needs or how it behaves (e.g. a scorer's ``needs="data"``, a growth
    rule's ``needs=("grads",)``), so the callers never special-case names.

    Args:
        kind: What the registry holds, used in messages (e.g. ``"scorer"``).
        argument: The user-facing argument that takes a name from this registry (e.g. ``"method"``).
        register_hint: The public function that adds an entry, quoted in errors.
        defaults: Metadata every entry has unless its registration overrides it.

    """

    def __init__(self, kind: str, argument: str, register_hint: str, defaults: dict[str, Any] | None = None) -> None:
        self.kind = kind
        self.argument = argument
        self.register_hint = register_hint
        self.defaults = dict(defaults or {})
        self._entries: dict[str, F] = {}
        self._info: dict[str, dict[str, Any]] = {}

    def register(self, name: str, fn: F | None = None, *, overwrite: bool = False, **info: Any) -> Callable[[F], F] | F:
        """Register ``fn`` under ``name`` with metadata ``info``; usable as a decorator when ``fn`` is omitted.

        Raises:
            ValueError: If ``name`` is taken and ``overwrite`` is False, or ``info`` has an unknown key.

        """
        unknown = sorted(set(info) - set(self.defaults))
        if unknown:
            raise ValueError(f"Unknown {self.kind} metadata {unknown}; known: {sorted(self.defaults)}.")

        def _add(f: F) -> F:
            key = name.lower()
            if key in self._entries and not overwrite:
                raise ValueError(
                    f"A {self.kind} named {name!r} is already registered; pass `overwrite=True` to replace it."
                )
            self._entries[key] = f
            self._info[key] = {**self.defaults, **info}
            return f

        return _add if fn is None else _add(fn)

    def get(self, name: str | F, argument: str | None = None) -> F:
        """Return the entry called ``name``; a callable is returned unchanged.

        ``argument`` names the user's argument in the error (default: the registry's, e.g. ``method``).

        Raises:
            ValueError: If ``name`` is not registered; the message lists the valid names.

        """
        if callable(name):
            return name
        if not isinstance(name, str) or name.lower() not in self._entries:
            raise ValueError(
                f"Unknown `{argument or self.argument}` {name!r}. Valid {self.kind}s: {', '.join(self.list())}. "
                f"Register a new one with `{self.register_hint}(name, fn)`."
            )
        return self._entries[name.lower()]

    def info(self, name: str | F) -> MappingProxyType:
        """Metadata of ``name`` (read-only); a callable gets its ``__lightning_pai__`` dict or the defaults."""
        if callable(name):
            return MappingProxyType({**self.defaults, **getattr(name, "__lightning_pai__", {})})
        self.get(name)
        return MappingProxyType(self._info[name.lower()])

    def unregister(self, name: str) -> None:
        """Remove ``name`` (e.g. a test's temporary entry).

        Raises:
            KeyError: If ``name`` is not registered.
        """
        key = name.lower()
        if key not in self._entries:
            raise KeyError(f"No {self.kind} named {name!r} is registered.")
        del self._entries[key], self._info[key]

    def list(self) -> list[str]:
        """Names of all registered entries, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._entries
