"""What a compression run did: achieved cache sizes per layer, and the observer event."""

from __future__ import annotations

import attrs


@attrs.define
class LayerStats:
    layer: int
    prompt_length: int = 0
    budget: int = 0
    after_prefill: int = 0
    size: int = 0  # entries per KV head now
    peak: int = 0  # largest size left after any forward (the transient +q inside a step not counted)
    entries: int = 0  # real entries summed over KV heads (differs from H_kv * size on ragged layers)
    evictions: int = 0


@attrs.frozen
class EvictEvent:
    """Passed to `evictkit_after_evict` observers."""

    policy: str
    layer: int
    phase: str
    before: int
    after: int
    budget: int


@attrs.define
class CompressionStats:
    layers: list[LayerStats] = attrs.field(factory=list)
    skipped_layers: list[int] = attrs.field(factory=list)  # sliding-window layers left alone

    def sizes(self) -> list[int]:
        """Current entries per KV head, one per managed layer."""
        return [s.size for s in self.layers]

    def summary(self) -> str:
        if not self.layers:
            return "no forward pass ran under evictkit.compress"
        sizes = self.sizes()
        prompt = max(s.prompt_length for s in self.layers)
        after = [s.after_prefill for s in self.layers]
        text = (
            f"{len(self.layers)} layers: prompt {prompt} -> after prefill "
            f"{min(after)}..{max(after)}, now {min(sizes)}..{max(sizes)} entries per KV head"
        )
        if self.skipped_layers:
            text += f" ({len(self.skipped_layers)} sliding-window layers left alone)"
        return text

    def as_dict(self) -> dict:
        return attrs.asdict(self)
