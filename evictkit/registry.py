"""Policy registry: a pluggy PluginManager fed by the `evictkit` entry-point group.

Built-in policies are registered through the same group as third-party ones. Loading is
lazy (the first call to `policies()`), and a broken plugin is recorded and warned about,
never raised: `import evictkit` and every other plugin keep working. That includes a plugin
that raises SystemExit (or any BaseException but KeyboardInterrupt) at import or registration.

Policy names match `NAME_PATTERN` (lowercase letters, digits and underscores, starting with a
letter, at most 64 characters): names end up in file names, command lines and result tables, so
a class registering any other name is a plugin failure, not a policy.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import os
import re
import threading
import warnings
from collections.abc import Mapping
from typing import Any

import attrs
import pluggy

from evictkit.contract import Policy, params_of
from evictkit.prefill_contract import PrefillAttention, prefill_params
from evictkit.specs import hookspecs

ENTRY_POINT_GROUP = "evictkit"
DISABLE_ENV = "EVICTKIT_DISABLE_PLUGIN_AUTOLOAD"
BUILTIN_DIST = "evictkit"
#: what a policy name may be: a safe identifier (no path, shell or upper-case characters)
NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,63}")
NAME_RULE = "lowercase letters, digits and '_', starting with a letter, at most 64 characters"


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
        self.prefill_entries: dict[str, PolicyEntry] = {}  # prefill attention name -> its class
        self.failures: list[PluginFailure] = []

    def ensure_loaded(self) -> None:
        with self._lock:
            if not self._loaded:
                try:
                    self._load()
                except BaseException:
                    # only KeyboardInterrupt (or a bug here) gets out: start clean on the next call
                    # instead of reporting every plugin loaded so far as a duplicate
                    self._reset()
                    raise
                self._loaded = True

    def _reset(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.entries = {}
        self.prefill_entries = {}
        self.failures = []

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
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # a broken plugin must never break evictkit, SystemExit included
                self._fail(ep.name, package, f"failed to import: {_describe(exc)}")
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
            except KeyboardInterrupt:
                raise
            except BaseException as exc:
                self._fail(plugin, package, f"evictkit_register_policies raised {_describe(exc)}")
        self._register_prefill_from(module, plugin, package)

    def _register_prefill_from(self, module: object, plugin: str, package: str) -> None:
        """The module's `evictkit_register_prefill_attention` implementations, as for policies."""
        hook = self.pm.hook.evictkit_register_prefill_attention
        for impl in [i for i in hook.get_hookimpls() if i.plugin is module]:
            try:
                impl.function(register=lambda cls: self.add_prefill(cls, plugin=plugin, package=package))
            except KeyboardInterrupt:
                raise
            except BaseException as exc:
                self._fail(plugin, package, f"evictkit_register_prefill_attention raised {_describe(exc)}")

    def add_prefill(self, cls: type, *, plugin: str, package: str) -> None:
        """Register one prefill attention class; a bad class or duplicate name is recorded as a failure."""
        if not (isinstance(cls, type) and issubclass(cls, PrefillAttention)):
            self._fail(plugin, package, f"registered {cls!r}, which is not an evictkit.PrefillAttention subclass")
            return
        name = getattr(cls, "name", "")
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            self._fail(plugin, package, f"{cls.__qualname__} has the prefill attention name {name!r}, which is "
                       f"not allowed: a name is {NAME_RULE}")
            return
        if name in self.prefill_entries:
            other = self.prefill_entries[name]
            self._fail(plugin, package, f"duplicate prefill attention name {name!r} (already registered by "
                       f"{other.package})")
            return
        self.prefill_entries[name] = PolicyEntry(cls=cls, plugin=plugin, package=package)

    def add(self, cls: type, *, plugin: str, package: str) -> None:
        """Register one policy class; a bad class or duplicate name is recorded as a failure."""
        if not (isinstance(cls, type) and issubclass(cls, Policy)):
            self._fail(plugin, package, f"registered {cls!r}, which is not an evictkit.Policy subclass")
            return
        name = getattr(cls, "name", "")
        if not isinstance(name, str) or not name:
            self._fail(plugin, package, f"{cls.__qualname__} has no `name`")
            return
        if not NAME_PATTERN.fullmatch(name):
            self._fail(plugin, package, f"{cls.__qualname__} has the policy name {name!r}, which is not allowed: "
                       f"a policy name is {NAME_RULE} (e.g. 'my_policy')")
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

    def prefill_attentions(self) -> Mapping[str, type]:
        self.ensure_loaded()
        return {name: e.cls for name, e in sorted(self.prefill_entries.items())}


def _describe(exc: BaseException) -> str:
    """'SystemExit: 3'-style text of an exception raised by a plugin."""
    return f"{type(exc).__name__}: {exc}"


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


# --- messages for `evictkit.policy()` ---------------------------------------------------------


def unknown_policy_message(name: object, known: list[str]) -> str:
    """'unknown policy ...' with the close names first (difflib) and then every registered one."""
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6) if isinstance(name, str) else []
    hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
    listing = ", ".join(known) or "(none)"
    return f"unknown policy {name!r}{hint}; registered policies: {listing} (`evictkit list` shows their parameters)"


def param_error_message(fields: Mapping[str, attrs.Attribute], params: Mapping[str, object], exc: BaseException) -> str:
    """A readable text for an error raised while building a policy from `params`
    (`fields`: the class's parameters, `evictkit.params_of`).

    attrs' own validators raise `(message, Attribute, expected, value)` tuples, or texts such as
    "'sinks' must be >= 0: -1"; both become "sinks=-1: must be an int >= 0 (default 4)".
    Messages that already read well (evictkit's validators: "window=2.5: must be an int >= 1")
    only gain the default.
    """
    args = exc.args
    attr = None
    if len(args) >= 2 and isinstance(args[1], attrs.Attribute):
        attr = args[1]
    elif args and isinstance(args[0], str):
        m = re.match(r"'(\w+)' must ", args[0])
        if m and m.group(1) in fields:
            attr = fields[m.group(1)]
    if attr is not None and attr.name in params:
        expected = _expected(attr) or _strip_attrs_message(args[0])
        text = f"{attr.name}={params[attr.name]!r}: must be {expected}"
    else:
        text = str(args[0]) if len(args) >= 1 and isinstance(args[0], str) else str(exc)
        m = re.match(r"(\w+)=", text)
        attr = fields.get(m.group(1)) if m else None
    if attr is not None and attr.default is not attrs.NOTHING:
        text += f" (default {attr.default!r})"
    return text


def _expected(attr: attrs.Attribute) -> str:
    """What attrs' standard validators on `attr` accept, in words ('an int >= 0'), or ''."""
    validator = attr.validator
    parts = list(getattr(validator, "_validators", None) or ([validator] if validator is not None else []))
    kind, bounds, choices = "", [], ""
    for v in parts:
        if hasattr(v, "type") and isinstance(v.type, (type, tuple)):
            types = v.type if isinstance(v.type, tuple) else (v.type,)
            kind = " or ".join(_TYPE_WORDS.get(t, f"a {t.__name__}") for t in types)
        elif hasattr(v, "bound") and hasattr(v, "compare_op"):
            bounds.append(f"{v.compare_op} {v.bound!r}")
        elif hasattr(v, "options"):
            choices = "one of " + ", ".join(map(repr, v.options))
        else:
            return ""  # a custom validator: its own message says it best
    return choices or " ".join(filter(None, [kind or ("a number" if bounds else ""), " and ".join(bounds)]))


_TYPE_WORDS = {int: "an int", float: "a float", str: "a str", bool: "True or False"}


def _strip_attrs_message(message: object) -> str:
    """"'x' must be <int> (got 2.5 ...)" -> the part after 'must be'."""
    text = str(message)
    m = re.search(r"must be (.*)", text)
    return m.group(1) if m else text


def build_policy(name: str, **params: Any) -> Any:
    """`evictkit.policy(name, **params)`: the registered class built with checked parameters."""
    table = get_registry().policies()
    if not isinstance(name, str) or name not in table:
        raise ValueError(unknown_policy_message(name, list(table)))
    return _build("policy", name, table[name], params_of(table[name]), params)


def build_prefill_attention(name: str, **params: Any) -> PrefillAttention:
    """The prefill attention registered as `name`, built with checked parameters."""
    table = get_registry().prefill_attentions()
    if not isinstance(name, str) or name not in table:
        close = difflib.get_close_matches(name, list(table), n=3, cutoff=0.6) if isinstance(name, str) else []
        hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
        raise ValueError(f"unknown prefill attention {name!r}{hint}; registered: {', '.join(table) or '(none)'} "
                         "(`evictkit list` shows their parameters)")
    return _build("prefill attention", name, table[name], prefill_params(table[name]), params)


def _build(kind: str, name: str, cls: type, fields: Mapping[str, attrs.Attribute], params: Mapping[str, Any]) -> Any:
    """`cls(**params)` with unknown parameters and invalid values refused in words, naming the
    parameter and what is valid."""
    unknown = sorted(set(params) - set(fields))
    if unknown:
        valid = ", ".join(f"{f}={a.default!r}" for f, a in fields.items()) or "(none)"
        raise ValueError(f"{kind} {name!r} has no parameter {', '.join(unknown)}; valid parameters: {valid}")
    try:
        return cls(**params)
    except (TypeError, ValueError) as exc:
        # attrs' validators raise tuples (message, Attribute, type, value): say it in words
        raise ValueError(f"{kind} {name!r}: {param_error_message(fields, params, exc)}") from exc
