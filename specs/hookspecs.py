"""The pluggy hook specification every evictkit plugin implements.

A plugin is a module (or object) named by an entry point in the `evictkit` group::

    [project.entry-points.evictkit]
    mypolicy = "my_package.policy"

with functions marked `@evictkit.hookimpl`::

    @evictkit.hookimpl
    def evictkit_register_policies(register):
        register(MyPolicy)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from evictkit.stats import EvictEvent

PROJECT = "evictkit"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def evictkit_register_policies(register: Callable[[type], None]) -> None:
    """Call `register(PolicyClass)` once for each policy class this plugin provides."""


@hookspec
def evictkit_register_prefill_attention(register: Callable[[type], None]) -> None:
    """Call `register(PrefillAttentionClass)` once for each prefill attention this plugin provides
    (an `evictkit.PrefillAttention` subclass: a sparse or dense attention for prefill forwards)."""


@hookspec
def evictkit_after_evict(event: EvictEvent) -> None:
    """Observe one eviction (an `evictkit.EvictEvent`): layer, phase, sizes before and after.

    Called after the cache layer has been rewritten. Observers must not modify the cache.
    """
