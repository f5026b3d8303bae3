"""Configuration, the version pin and the startup refusals, without starting an engine."""

from __future__ import annotations

from types import SimpleNamespace

import evictkit
import pytest

import evictkit_vllm
from evictkit_vllm import SCHEDULER_CLS, WORKER_CLS, config
from evictkit_vllm.checks import Unsupported, check_engine, policy_problems, reads_layer_weights
from evictkit_vllm.config import EvictConfig, config_of, request_config


def _vllm_config(**changes):
    """A stand-in for vllm.config.VllmConfig with the settings evictkit accepts."""
    hf_config = SimpleNamespace(layer_types=None)
    mc = SimpleNamespace(max_model_len=2048, enforce_eager=True, get_sliding_window=lambda: None, hf_config=hf_config,
                         is_multimodal_model=False, is_encoder_decoder=False, get_num_layers=lambda pc: 2,
                         get_num_attention_heads=lambda pc: 4, get_num_kv_heads=lambda pc: 2, get_head_size=lambda: 16)
    vc = SimpleNamespace(
        model_config=mc,
        cache_config=SimpleNamespace(enable_prefix_caching=False, cache_dtype="auto"),
        scheduler_config=SimpleNamespace(enable_chunked_prefill=False, max_num_batched_tokens=2048,
                                         scheduler_cls=SCHEDULER_CLS, async_scheduling=False),
        parallel_config=SimpleNamespace(worker_cls=WORKER_CLS, tensor_parallel_size=1, pipeline_parallel_size=1,
                                        data_parallel_size=1),
        use_v2_model_runner=False, speculative_config=None, kv_transfer_config=None,
        additional_config={"evictkit": {"policy": "snapkv", "budget": 64}},
    )
    for path, value in changes.items():
        obj = vc
        *parents, leaf = path.split(".")
        for p in parents:
            obj = getattr(obj, p)
        setattr(obj, leaf, value)
    return vc


def _check(vc, cfg=None):
    check_engine(vc, cfg or EvictConfig("snapkv", 64), worker_cls=WORKER_CLS, scheduler_cls=SCHEDULER_CLS)


def test_supported_settings_pass():
    _check(_vllm_config())


@pytest.mark.parametrize(("change", "named"), [
    ({"cache_config.enable_prefix_caching": True}, "enable_prefix_caching=False"),
    ({"scheduler_config.enable_chunked_prefill": True}, "enable_chunked_prefill=False"),
    ({"scheduler_config.max_num_batched_tokens": 512}, "max_num_batched_tokens"),
    ({"use_v2_model_runner": True}, "VLLM_USE_V2_MODEL_RUNNER"),
    ({"model_config.enforce_eager": False}, "enforce_eager=True"),
    ({"speculative_config": object()}, "speculative"),
    ({"scheduler_config.async_scheduling": True}, "async_scheduling=False"),
    ({"kv_transfer_config": object()}, "kv_transfer_config"),
    ({"cache_config.cache_dtype": "fp8"}, "kv_cache_dtype"),
    ({"parallel_config.tensor_parallel_size": 2}, "tensor_parallel_size=2"),
    ({"model_config.get_sliding_window": lambda: 512}, "sliding-window"),
    ({"model_config.hf_config.layer_types": ["sliding_attention", "full_attention"]}, "sliding-window"),
    ({"parallel_config.worker_cls": "vllm.v1.worker.cpu_worker.CPUWorker"}, WORKER_CLS),
    ({"scheduler_config.scheduler_cls": None}, SCHEDULER_CLS),
])
def test_each_unsupported_setting_is_named(change, named):
    with pytest.raises(Unsupported, match="cannot run on this engine") as err:
        _check(_vllm_config(**change))
    assert named in str(err.value)


@pytest.mark.parametrize(("policy", "params", "named"), [
    ("pyramidkv", {}, "its own budget (layer_budget)"),
    ("adakv", {}, "capability tag 'ragged_heads'"),
    ("cake", {}, "capability tag 'cross_layer'"),
    ("lacache", {}, "exact_budget=False"),
    ("streaming_llm", {"positions": "shift"}, "positions='absolute'"),
    # tagged "queries" only, but re-projects pre-RoPE queries through the transformers module
    ("expected_attention", {}, "reads something its needs() does not declare"),
])
def test_unsupported_policies_are_refused(policy, params, named):
    problems = policy_problems(EvictConfig(policy, 64, params), _vllm_config())
    assert problems and named in " ".join(problems)
    with pytest.raises(Unsupported, match=policy):
        _check(_vllm_config(), EvictConfig(policy, 64, params))


@pytest.mark.parametrize("policy", ["streaming_llm", "random", "snapkv", "tova", "h2o", "h2o_prefill", "restkv",
                                    "knorm", "keydiff", "lagkv", "criticalkv"])
def test_supported_policies_pass(policy):
    assert policy_problems(EvictConfig(policy, 64), _vllm_config()) == []


def _with_needs(monkeypatch, **changes):
    """A third-party-like policy: snapkv declaring other capabilities, served by EvictConfig.build()."""
    import attrs

    base = type(evictkit.policy("snapkv"))

    class Declared(base):
        def needs(self):
            return attrs.evolve(super().needs(), **changes)

    policy = Declared()
    monkeypatch.setattr(config, "_build", lambda *a: policy)
    return EvictConfig("declared", 64)


@pytest.mark.parametrize(("changes", "named"), [
    ({"extra_passes": True}, "capability tag 'extra_passes': it runs forward passes of its own"),
    ({"ragged_heads": True}, "capability tag 'ragged_heads'"),
    ({"cross_layer": True}, "capability tag 'cross_layer': its layer budgets are allocated after the last layer"),
])
def test_refused_from_capability_tags(monkeypatch, changes, named):
    problems = policy_problems(_with_needs(monkeypatch, **changes), _vllm_config())
    assert len(problems) == 1 and named in problems[0]


def test_unknown_capability_tags_are_refused(monkeypatch):
    import evictkit.contract as contract

    cfg = _with_needs(monkeypatch)
    assert policy_problems(cfg, _vllm_config()) == []
    real = contract.capabilities
    monkeypatch.setattr(contract, "capabilities", lambda p: {**real(p), "tags": (*real(p)["tags"], "telepathy")})
    problems = policy_problems(cfg, _vllm_config())
    assert len(problems) == 1 and "['telepathy']" in problems[0] and "upgrade evictkit-vllm" in problems[0]


def test_layer_weights_come_from_the_tag(monkeypatch):
    assert reads_layer_weights(EvictConfig("restkv", 64).build())
    assert reads_layer_weights(EvictConfig("criticalkv", 64).build())
    assert not reads_layer_weights(EvictConfig("snapkv", 64).build())
    assert reads_layer_weights(_with_needs(monkeypatch, layer_weights=True).build())


def test_version_pin_fails_closed(monkeypatch):
    import vllm

    config.check_vllm_version()  # the pinned release is installed here
    monkeypatch.setattr(vllm, "__version__", "0.33.0")
    with pytest.raises(RuntimeError, match="supports vLLM 0.32.0 only"):
        config.check_vllm_version()
    with pytest.raises(RuntimeError, match="0.33.0"):
        _check(_vllm_config())
    # register() on another release registers nothing: vLLM runs as if evictkit were absent
    calls = []
    monkeypatch.setattr(evictkit_vllm, "_registered", False)
    import vllm.v1.attention.backends.registry as registry

    monkeypatch.setattr(registry, "register_backend", lambda *a, **k: calls.append(a))
    evictkit_vllm.register()
    assert calls == [] and evictkit_vllm._registered is False


def test_register_is_idempotent():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    evictkit_vllm.register()
    evictkit_vllm.register()
    assert AttentionBackendEnum.CPU_ATTN.get_path() == "evictkit_vllm.backend.EvictkitCPUAttentionBackend"


def test_configuration_sources(monkeypatch):
    for name in (config.ENV_POLICY, config.ENV_BUDGET, config.ENV_PARAMS):
        monkeypatch.delenv(name, raising=False)
    assert config_of(SimpleNamespace(additional_config={})) is None  # inert
    cfg = config_of(SimpleNamespace(additional_config={"evictkit": {"policy": "snapkv", "budget": 0.25,
                                                                    "params": {"window": 8}}}))
    assert (cfg.policy, cfg.budget, cfg.params, cfg.keep(400)) == ("snapkv", 0.25, {"window": 8}, 100)
    monkeypatch.setenv(config.ENV_POLICY, "tova")
    with pytest.raises(ValueError, match=config.ENV_BUDGET):
        config_of(SimpleNamespace(additional_config=None))
    monkeypatch.setenv(config.ENV_BUDGET, "128")
    monkeypatch.setenv(config.ENV_PARAMS, '{"head_wise": true}')
    cfg = config_of(SimpleNamespace(additional_config=None))
    assert (cfg.policy, cfg.budget, cfg.params) == ("tova", 128, {"head_wise": True})
    with pytest.raises(ValueError, match="unknown keys"):
        config_of(SimpleNamespace(additional_config={"evictkit": {"policy": "tova", "budget": 8, "bugdet": 9}}))
    with pytest.raises(ValueError, match="snapk"):
        config_of(SimpleNamespace(additional_config={"evictkit": {"policy": "snapk", "budget": 8}}))


def test_engine_kwargs_validate_and_fill_in():
    kw = evictkit_vllm.engine_kwargs("snapkv", 256, window=16)
    assert kw["worker_cls"] == WORKER_CLS and kw["scheduler_cls"] == SCHEDULER_CLS
    assert kw["enable_prefix_caching"] is False and kw["enable_chunked_prefill"] is False and kw["enforce_eager"]
    assert kw["additional_config"]["evictkit"] == {"policy": "snapkv", "budget": 256, "params": {"window": 16}}
    with pytest.raises(ValueError):
        evictkit_vllm.engine_kwargs("snapkv", 256, windoww=16)
    with pytest.raises(ValueError):
        evictkit_vllm.engine_kwargs("snapkv", 0)


def test_request_overrides():
    engine = EvictConfig("snapkv", 64, {"window": 16})
    assert request_config(engine, SimpleNamespace(extra_args=None)) is engine
    assert request_config(engine, SimpleNamespace(extra_args={"evictkit": None})) is None
    other = request_config(engine, SimpleNamespace(extra_args={"evictkit": {"budget": 32}}))
    assert (other.policy, other.budget, other.params) == ("snapkv", 32, {"window": 16})
    other = request_config(engine, SimpleNamespace(extra_args={"evictkit": {"policy": "tova"}}))
    assert (other.policy, other.params) == ("tova", {})
    with pytest.raises(Unsupported, match="its own budget"):
        request_config(engine, SimpleNamespace(extra_args={"evictkit": {"policy": "pyramidkv"}}))


def _stored_by_steps(cfg: EvictConfig, prompt: int, n: int) -> int:
    """EvictConfig.stored by brute force: evictkit.compress's rule applied forward by forward."""
    K, phases = cfg.limit(prompt), cfg.phases()
    held = prompt
    if "prefill" in phases and held > K:
        held = K
    for _ in range(n - prompt):
        held += 1
        if "decode" in phases and held > K + cfg.slack:
            held = K
    return held


@pytest.mark.parametrize(("policy", "budget", "phase", "slack"), [
    ("snapkv", 40, None, 0), ("snapkv", 40, "both", 0), ("snapkv", 40, "both", 5), ("snapkv", 40, "decode", 3),
    ("streaming_llm", 40, None, 7), ("tova", 0.25, None, 2), ("h2o", 16, "decode", 0),
])
def test_stored_counts_follow_compress_rule(policy, budget, phase, slack):
    cfg = EvictConfig(policy, budget, phase=phase, slack=slack)
    for prompt in (8, 31, 32, 33, 60, 200):
        if isinstance(budget, float) and prompt < 64:
            continue
        for n in range(prompt, prompt + 70):
            assert cfg.stored(prompt, n) == _stored_by_steps(cfg, prompt, n), (prompt, n)


def test_phase_and_slack_are_validated_and_passed_on():
    kw = evictkit_vllm.engine_kwargs("snapkv", 64, phase="both", slack=8, window=16)
    assert kw["additional_config"]["evictkit"] == {"policy": "snapkv", "budget": 64, "params": {"window": 16},
                                                   "phase": "both", "slack": 8}
    cfg = config_of(SimpleNamespace(additional_config=kw["additional_config"]))
    assert (cfg.phases(), cfg.slack, cfg.evicts_while_decoding()) == (("prefill", "decode"), 8, True)
    assert EvictConfig("snapkv", 64).phases() == ("prefill",) and EvictConfig("h2o", 64).evicts_while_decoding()
    with pytest.raises(ValueError, match="phase='prefil'"):
        evictkit_vllm.engine_kwargs("snapkv", 64, phase="prefil")
    with pytest.raises(ValueError, match="slack=-1"):
        evictkit_vllm.engine_kwargs("snapkv", 64, slack=-1)
    other = request_config(cfg, SimpleNamespace(extra_args={"evictkit": {"phase": "prefill"}}))
    assert (other.phases(), other.slack) == (("prefill",), 8)
