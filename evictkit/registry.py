"""Policy registry: a pluggy PluginManager fed by the `evictkit` entry-point group.

Built-in policies are registered through the same group as third-party ones. Loading is
lazy (the first call to `policies()`), and a broken plugin is recorded and warned about,
never raised: `import evictkit` and every other plugin keep working.
"""

from __future__ import annotations

import importlib.metadata
import os
import threading
import warnings
from collections.abc import Mapping

import attrs
import pluggy

from evictkit.specs import hookspecs

ENTRY_POINT_GROUP = "evictkit"
DISABLE_ENV = "EVICTKIT_DISABLE_PLUGIN_AUTOLOAD"
BUILTIN_DIST = "evictkit"


@attrs.frozen
class PluginFailure:
    """A plugin that could not be loaded or registered."""

    plugin: str  # entry-point name
    package: str  # distribution that ships it
    error: str

    def __str__(self) -> str:
        return f"plugin {self.plugin!r} from package {self.package!r}: {self.error}"


@attrs.frozen
class PolicyEntry:
    cls: type
    plugin: str
    package: str


class Registry:
    """Loads plugins once and keeps name -> policy class, plus the failures."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loaded = False
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.entries: dict[str, PolicyEntry] = {}
        self.failures: list[PluginFailure] = []

    def ensure_loaded(self) -> None:
        with self._lock:
            if not self._loaded:
                self._load()
                self._loaded = True

    def _load(self) -> None:
        builtins_only = os.environ.get(DISABLE_ENV, "").strip() not in ("", "0")
        eps = sorted(
            importlib.metadata.entry_points(group=ENTRY_POINT_GROUP),
            # built-ins first, so a third-party duplicate is the one reported
            key=lambda ep: (_dist_name(ep) != BUILTIN_DIST, _dist_name(ep), ep.name),
        )
        seen_modules: set[str] = set()
        for ep in eps:
            package = _dist_name(ep)
            if builtins_only and package != BUILTIN_DIST:
                continue
            if ep.value in seen_modules:  # same dist found twice on sys.path
                continue
            seen_modules.add(ep.value)
            try:
                module = ep.load()
                self.pm.register(module, name=f"{package}:{ep.name}")
            except Exception as exc:  # a broken plugin must never break evictkit
                self._fail(ep.name, package, f"failed to import: {type(exc).__name__}: {exc}")
                continue
            self._register_from(module, ep.name, package)

    def _register_from(self, module: object, plugin: str, package: str) -> None:
        impls = [
            impl for impl in self.pm.hook.evictkit_register_policies.get_hookimpls() if impl.plugin is module
        ]

        def register(cls: type) -> None:
            self.add(cls, plugin=plugin, package=package)

        for impl in impls:
            try:
                impl.function(register=register)
            except Exception as exc:
                self._fail(plugin, package, f"evictkit_register_policies raised {type(exc).__name__}: {exc}")

    def add(self, cls: type, *, plugin: str, package: str) -> None:
        """Register one policy class; a bad class or duplicate name is recorded as a failure."""
        from evictkit.contract import Policy

        if not (isinstance(cls, type) and issubclass(cls, Policy)):
            self._fail(plugin, package, f"registered {cls!r}, which is not an evictkit.Policy subclass")
            return
        name = getattr(cls, "name", "")
        if not isinstance(name, str) or not name:
            self._fail(plugin, package, f"{cls.__qualname__} has no `name`")
            return
        if name in self.entries:
            other = self.entries[name]
            self._fail(plugin, package, f"duplicate policy name {name!r} (already registered by {other.package})")
            return
        self.entries[name] = PolicyEntry(cls=cls, plugin=plugin, package=package)

    def _fail(self, plugin: str, package: str, error: str) -> None:
        failure = PluginFailure(plugin=plugin, package=package, error=error)
        self.failures.append(failure)
        warnings.warn(f"evictkit: {failure}", RuntimeWarning, stacklevel=4)

    def policies(self) -> Mapping[str, type]:
        self.ensure_loaded()
        return {name: e.cls for name, e in sorted(self.entries.items())}


def _dist_name(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return dist.metadata["Name"] if dist is not None else "?"


_registry: Registry | None = None
_registry_lock = threading.Lock()


def get_registry() -> Registry:
    global _registry
    with _registry_lock:
        if _registry is None:
            _registry = Registry()
        return _registry


def reset_registry() -> None:
    """Forget loaded plugins (tests; after installing a package at run time)."""
    global _registry
    with _registry_lock:
        _registry = None
