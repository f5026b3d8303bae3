"""One compress block per model, used by one thread: the claim a block holds while it is active.

A block's hooks compact a layer's cache after its attention; two blocks on one layer would each
compact behind the other's back, and two threads running sequences through one block would share
its per-sequence state. So a block claims its model's attention modules when it is entered (a
second block on any of them is refused), and the first thread that runs a forward owns it until
it exits (a forward from any other thread is refused before anything changes).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Sequence

from torch import nn

# attention module -> the claim on it. Weak keys: nothing is set on the user's model, and a model
# dropped inside a block is not kept alive. The lock also guards every claim's owner.
_CLAIMED: weakref.WeakKeyDictionary[nn.Module, Claim] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


class Claim:
    """A block's hold on `modules`; `describe()` names the block in refusals (model, policy, budget)."""

    def __init__(self, modules: Sequence[nn.Module], describe: Callable[[], str]) -> None:
        self.modules = list(modules)
        self.describe = describe
        self.entered_in = ""
        self.owner: tuple[int, str] | None = None  # (ident, name) of the thread running the sequences

    def take(self, who: str) -> None:
        """Claim every module, or raise RuntimeError naming the block that holds one (`who` is the newcomer)."""
        with _LOCK:
            other = next((_CLAIMED[m] for m in self.modules if m in _CLAIMED), None)
            if other is not None:
                raise RuntimeError(other.busy(f"a second evictkit.compress block ({who}) cannot start"))
            for m in self.modules:
                _CLAIMED[m] = self
            self.entered_in = threading.current_thread().name

    def release(self) -> None:
        with _LOCK:
            for m in self.modules:
                if _CLAIMED.get(m) is self:
                    del _CLAIMED[m]
            self.owner = None

    def serve_this_thread(self) -> None:
        """The first thread to run a forward owns the block until it exits; refuse any other."""
        me = threading.get_ident()
        with _LOCK:
            if self.owner is None:
                self.owner = (me, threading.current_thread().name)
            owner = self.owner
        if owner[0] != me:
            raise RuntimeError(self.busy(f"a forward from thread {threading.current_thread().name!r} is refused"))

    def busy(self, what: str) -> str:
        """Why `what` is refused while this block is active on its model (nesting, threads)."""
        where = f"entered in thread {self.entered_in!r}"
        if self.owner is not None:
            where += f", running sequences in thread {self.owner[1]!r}"
        return (
            f"{what}: {self.describe()} ({where}). One compress block per model at a time, "
            "used by one thread at a time: blocks cannot be nested, and other threads cannot share the model "
            "while a block is active. Leave the active `with` block first, serialize the threads (one lock "
            "around each whole `with` block), or give each thread its own copy of the model."
        )


__all__ = ["Claim"]
