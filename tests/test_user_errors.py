"""What users get wrong never gets past the core: each case gets a clear error naming what was
given and what to do, with nothing modified, or the correct behaviour.

Registry failures (SystemExit in a plugin, unsafe names), parameter errors, budgets, what
`compress` is given, nesting, threads, the CLI, the optional extras, and the kit's side effects.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
import threading
import types
import warnings
from pathlib import Path
from typing import ClassVar

import attrs
import pytest
import torch
from models import tiny_model

import evictkit
from evictkit import registry
from evictkit.cli import main as cli_main
from evictkit.registry import Registry, param_error_message

# --- registry: a plugin raising any BaseException, and unsafe policy names ----------------------


class _EntryPoint:
    """An entry point of the `evictkit` group that imports `value` (a module on sys.path)."""

    def __init__(self, name: str, value: str, dist: str = "evictkit-probe") -> None:
        self.name, self.value = name, value
        self.dist = types.SimpleNamespace(metadata={"Name": dist})

    def load(self):
        return importlib.import_module(self.value)


GOOD_PLUGIN = '''
from typing import ClassVar
import attrs, evictkit

@attrs.define(frozen=True, kw_only=True)
class Good(evictkit.Policy):
    name: ClassVar[str] = "probe_good"

@evictkit.hookimpl
def evictkit_register_policies(register):
    register(Good)
'''


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    """`add(entry, source)` writes a plugin module and adds it to the entry points a fresh
    Registry sees, next to the real (built-in) ones; returns a function that loads that registry."""
    monkeypatch.syspath_prepend(str(tmp_path))
    extra: list[_EntryPoint] = []
    real = importlib.metadata.entry_points

    def entry_points(**kw):
        found = list(real(**kw))
        return found + extra if kw.get("group") == registry.ENTRY_POINT_GROUP else found

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    made: list[str] = []

    def add(entry: str, source: str) -> None:
        module = f"evictkit_probe_{entry}_{len(made)}"
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
        extra.append(_EntryPoint(entry, module))
        made.append(module)

    yield add, extra
    for module in made:
        sys.modules.pop(module, None)


def _load(reg: Registry) -> dict[str, type]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return dict(reg.policies())


@pytest.mark.parametrize("raise_", ["SystemExit(3)", "SystemExit('bye')", "GeneratorExit()", "Boom('odd')"])
def test_a_plugin_raising_any_base_exception_at_import_is_a_failure_and_the_rest_load(plugins, raise_):
    add, _ = plugins
    add("exits", f"class Boom(BaseException): pass\nraise {raise_}\n")
    add("good", GOOD_PLUGIN)
    reg = Registry()
    table = _load(reg)
    assert "probe_good" in table and "streaming_llm" in table  # the rest loaded
    (failure,) = [f for f in reg.failures if f.plugin == "exits"]
    assert failure.package == "evictkit-probe"
    assert failure.error.startswith("failed to import: " + raise_.split("(")[0])
    assert _load(reg) == table  # loaded once; later calls neither raise nor reload
    assert len(reg.failures) == 1


def test_a_plugin_raising_system_exit_while_registering_is_a_failure(plugins):
    add, _ = plugins
    add("exits_late", """
        import evictkit

        @evictkit.hookimpl
        def evictkit_register_policies(register):
            raise SystemExit(1)
    """)
    add("good", GOOD_PLUGIN)
    reg = Registry()
    assert "probe_good" in _load(reg)
    assert [f.error for f in reg.failures] == ["evictkit_register_policies raised SystemExit: 1"]


def test_keyboard_interrupt_still_interrupts_and_the_next_load_starts_clean(plugins):
    add, extra = plugins
    add("good", GOOD_PLUGIN)
    add("interrupts", "raise KeyboardInterrupt\n")
    reg = Registry()
    with pytest.raises(KeyboardInterrupt):
        _load(reg)
    extra.pop()  # the user uninstalls it
    assert "probe_good" in _load(reg)
    assert reg.failures == []  # no "duplicate" or "already registered" left over from the first try


@pytest.mark.parametrize("name", ["../evil", "a/b", "rm -rf ~", "x;y", "$(id)", "Key_Norm", "key-norm", "_hidden",
                                  "9lives", "sn\u00e4pkv", "a" * 65, "tab\t"])
def test_a_policy_name_that_is_not_a_safe_identifier_is_a_plugin_failure(plugins, name):
    add, _ = plugins
    add("unsafe", f'''
        from typing import ClassVar
        import attrs, evictkit

        @attrs.define(frozen=True, kw_only=True)
        class Unsafe(evictkit.Policy):
            name: ClassVar[str] = {name!r}

        @evictkit.hookimpl
        def evictkit_register_policies(register):
            register(Unsafe)
    ''')
    reg = Registry()
    table = _load(reg)
    assert name not in table
    (failure,) = reg.failures
    assert failure.plugin == "unsafe"
    assert repr(name) in failure.error and "lowercase letters, digits and '_'" in failure.error


def test_every_builtin_name_and_a_64_character_name_are_allowed():
    for name in [*evictkit.policies(), "a" * 64, "h2o", "x9_"]:
        assert registry.NAME_PATTERN.fullmatch(name), name


# --- policy(): names and parameters ------------------------------------------------------------


def test_an_unknown_policy_suggests_the_close_name_and_still_lists_every_one():
    with pytest.raises(ValueError) as err:
        evictkit.policy("snapvk")
    text = str(err.value)
    assert "unknown policy 'snapvk' (did you mean 'snapkv'?)" in text
    assert all(name in text for name in evictkit.policies())


def test_an_unknown_policy_far_from_every_name_suggests_nothing():
    with pytest.raises(ValueError, match=r"unknown policy 'zzzz'; registered policies: ") as err:
        evictkit.policy("zzzz")
    assert "did you mean" not in str(err.value)


@pytest.mark.parametrize(("name", "params", "message"), [
    ("streaming_llm", {"sinks": 2.5}, "policy 'streaming_llm': sinks=2.5: must be an int >= 0 (default 4)"),
    ("streaming_llm", {"sinks": -1}, "policy 'streaming_llm': sinks=-1: must be an int >= 0 (default 4)"),
    ("streaming_llm", {"sinks": True}, "policy 'streaming_llm': sinks=True: must be an int >= 0 (default 4)"),
    ("streaming_llm", {"positions": "x"},
     "policy 'streaming_llm': positions='x': must be one of 'absolute', 'shift' (default 'absolute')"),
    ("random", {"seed": True}, "policy 'random': seed=True: must be an int"),
    ("random", {"seed": "1"}, "policy 'random': seed='1': must be an int"),
    ("snapkv", {"window": 2.5}, "policy 'snapkv': window=2.5: must be an int >= 1 (default 32)"),
    ("snapkv", {"kernel": 4}, "policy 'snapkv': kernel=4: must be a positive odd int"),
    ("snapkv", {"pool": "mean"}, "policy 'snapkv': pool='mean': must be one of 'max', 'avg', 'none' (default 'max')"),
    ("tova", {"head_wise": 1}, "policy 'tova': head_wise=1: must be True or False (default False)"),
    ("lacache", {"positions": 3}, "policy 'lacache': positions=3: must be one of 'absolute', 'shift'"),
])
def test_every_parameter_error_names_the_parameter_the_value_and_the_valid_range(name, params, message):
    with pytest.raises(ValueError) as err:
        evictkit.policy(name, **params)
    assert str(err.value).startswith(message)
    assert "Attribute(" not in str(err.value) and "<class" not in str(err.value)


def test_the_random_seed_is_still_any_int():
    assert evictkit.policy("random", seed=-3).seed == -3


@attrs.define(frozen=True, kw_only=True)
class _AttrsValidated(evictkit.Policy):
    """The example package's style: attrs' own validators (instance_of + ge, in_)."""

    name: ClassVar[str] = "attrs_validated"
    sinks: int = attrs.field(default=0, validator=[attrs.validators.instance_of(int), attrs.validators.ge(0)])
    ratio: float = attrs.field(default=0.5, validator=[attrs.validators.instance_of(float), attrs.validators.le(1.0)])
    mode: str = attrs.field(default="a", validator=attrs.validators.in_(("a", "b")))


@pytest.mark.parametrize(("params", "message"), [
    ({"sinks": 2.5}, "sinks=2.5: must be an int >= 0 (default 0)"),
    ({"sinks": -2}, "sinks=-2: must be an int >= 0 (default 0)"),
    ({"ratio": 2.0}, "ratio=2.0: must be a float <= 1.0 (default 0.5)"),
    ({"mode": "c"}, "mode='c': must be one of 'a', 'b' (default 'a')"),
])
def test_attrs_validator_errors_of_a_third_party_policy_read_as_words(params, message):
    with pytest.raises((TypeError, ValueError)) as err:
        _AttrsValidated(**params)
    assert param_error_message(evictkit.params_of(_AttrsValidated), params, err.value) == message


# --- budgets -------------------------------------------------------------------------------------


def test_a_fraction_too_small_for_the_protected_tokens_is_reported_as_given_and_as_resolved():
    model = tiny_model("llama", layers=2)
    ids = torch.randint(3, 128, (1, 64), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError) as err:
        with evictkit.compress(model, "snapkv", budget=0.05, window=8):
            model(ids, use_cache=True)
    text = str(err.value)
    assert "budget=0.05 of a 64-token prompt resolves to 3 entries per layer per KV head" in text
    assert "'snapkv'" in text and "window=8" in text
    assert model._forward_pre_hooks == {}  # the block exited cleanly


# --- what compress is given ----------------------------------------------------------------------


def test_compress_given_a_tokenizer_says_a_model_is_expected():
    from evictkit.eval import ByteTokenizer

    with pytest.raises(ValueError) as err:
        evictkit.compress(ByteTokenizer(), "streaming_llm", budget=8)
    text = str(err.value)
    assert "needs a transformers model" in text and "ByteTokenizer" in text


def test_compress_given_a_model_name_says_to_load_it_first():
    with pytest.raises(ValueError, match=r"got builtins\.str .*evictkit\.load_model\('smollm2'\)"):
        evictkit.compress("smollm2", "streaming_llm", budget=8)


# --- nesting -------------------------------------------------------------------------------------


def _ids(n: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def _greedy(model, ids, n: int = 4) -> torch.Tensor:
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False)


def test_nested_compress_on_one_model_is_refused_at_enter_naming_the_active_policy():
    model = tiny_model("llama", layers=2)
    attributes = set(vars(model))
    with evictkit.compress(model, "streaming_llm", budget=8) as outer:
        hooks = len(model._forward_pre_hooks)
        inner = evictkit.compress(model, "h2o", budget=8)
        with pytest.raises(RuntimeError) as err:
            inner.__enter__()
        assert "already under evictkit.compress with policy 'streaming_llm'" in str(err.value)
        assert "cannot be nested" in str(err.value)
        assert len(model._forward_pre_hooks) == hooks  # the refused block attached nothing
        # ... a block on the inner model shares the same attention modules: refused too
        with pytest.raises(RuntimeError, match="policy 'streaming_llm'"):
            evictkit.compress(model.model, "h2o", budget=8).__enter__()
        _greedy(model, _ids())  # the outer block still works
    assert all(s.size == 8 for s in outer.stats.layers)
    assert set(vars(model)) == attributes  # nothing was set on the user's model


def test_the_active_block_is_forgotten_on_exit_exceptions_included():
    model = tiny_model("llama", layers=2)
    with pytest.raises(ZeroDivisionError):
        with evictkit.compress(model, "streaming_llm", budget=8):
            raise ZeroDivisionError
    with evictkit.compress(model, "h2o", budget=8) as run:
        _greedy(model, _ids())
    assert all(s.size <= 8 for s in run.stats.layers)


# --- threads -------------------------------------------------------------------------------------


def _in_thread(fn) -> BaseException | None:
    """Run `fn` in a thread named 'worker'; return what it raised (None if nothing)."""
    raised: list[BaseException] = []

    def target():
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            raised.append(exc)

    t = threading.Thread(target=target, name="worker")
    t.start()
    t.join(timeout=120)
    assert not t.is_alive()
    return raised[0] if raised else None


def test_a_second_thread_using_a_model_under_compress_is_refused_and_the_first_is_unharmed():
    model = tiny_model("llama", layers=2)
    ids, other = _ids(), _ids(seed=1)
    with evictkit.compress(model, "h2o", budget=8):
        alone = _greedy(model, ids)
    with evictkit.compress(model, "h2o", budget=8) as run:
        with torch.no_grad():
            model(ids[:, :-1], use_cache=True)  # main thread starts a sequence: it owns the block
        exc = _in_thread(lambda: _greedy(model, other))  # another sequence, same block, other thread
        assert isinstance(exc, RuntimeError), exc
        text = str(exc)
        assert "a forward from thread 'worker' is refused" in text
        assert "used by one thread at a time" in text and "'MainThread'" in text
        # the refused forward changed nothing: main's sequence goes on
        assert all(s.prompt_length == ids.shape[1] - 1 for s in run.stats.layers)
        again = _greedy(model, ids)
    assert torch.equal(again, alone)


def test_a_second_thread_opening_its_own_block_on_the_same_model_is_refused():
    model = tiny_model("llama", layers=2)
    with evictkit.compress(model, "streaming_llm", budget=8):
        exc = _in_thread(lambda: evictkit.compress(model, "h2o", budget=8).__enter__())
        assert isinstance(exc, RuntimeError)
        assert "entered in thread 'MainThread'" in str(exc) and "policy 'streaming_llm'" in str(exc)
        _greedy(model, _ids())  # main runs a sequence: the block is main's
        exc = _in_thread(lambda: _greedy(model, _ids()))  # nor may the worker use the model without a block
        assert isinstance(exc, RuntimeError) and "a forward from thread 'worker' is refused" in str(exc)


def test_generating_in_a_worker_thread_inside_a_block_entered_in_another_works():
    """The streamer pattern: enter in the main thread, `generate` in a worker."""
    model = tiny_model("llama", layers=2)
    with evictkit.compress(model, "streaming_llm", budget=8) as run:
        assert _in_thread(lambda: _greedy(model, _ids())) is None
    assert all(s.size == 8 for s in run.stats.layers)


def test_one_policy_instance_serves_two_models_in_two_threads():
    policy = evictkit.policy("h2o")
    models = [tiny_model("llama", layers=2), tiny_model("llama", layers=2)]
    expected = []
    for m in models:
        with evictkit.compress(m, policy, budget=8):
            expected.append(_greedy(m, _ids(), n=6))
    got: dict[int, torch.Tensor] = {}
    barrier = threading.Barrier(2)

    def run(i):
        barrier.wait()
        with evictkit.compress(models[i], policy, budget=8):
            got[i] = _greedy(models[i], _ids(), n=6)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(torch.equal(got[i], expected[i]) for i in range(2))


# --- the command line ----------------------------------------------------------------------------


def test_generate_with_a_missing_prompt_file_is_a_cli_error_naming_the_file(capsys, tmp_path):
    missing = tmp_path / "missing.txt"
    assert cli_main(["generate", "--prompt-file", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("evictkit: error: --prompt-file") and str(missing) in err
    assert "No such file" in err and "Traceback" not in err


def test_help_and_readme_name_the_autoload_switch(capsys):
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    assert "EVICTKIT_DISABLE_PLUGIN_AUTOLOAD=1" in capsys.readouterr().out
    readme = Path(__file__).resolve().parents[1] / "README.md"
    assert "EVICTKIT_DISABLE_PLUGIN_AUTOLOAD=1" in readme.read_text(encoding="utf-8")


# --- optional extras -----------------------------------------------------------------------------

NO_MATPLOTLIB_EVAL = """
import json, sys
sys.modules["matplotlib"] = None  # `import matplotlib` now raises ImportError, as when not installed
from evictkit.eval import ByteTokenizer, EvalConfig, run_eval
from evictkit.specs.tiny import tiny_model

cfg = EvalConfig.from_strings(tasks="ppl", policies="streaming_llm", budgets="48", length=300, samples=1,
                              continuation=8, model="tiny")
result = run_eval(cfg, sys.argv[1], model=tiny_model("llama", layers=1, vocab=128), tokenizer=ByteTokenizer(),
                  progress=False, plots=True)
print(json.dumps(result))
"""


def test_eval_without_matplotlib_says_so_up_front_and_writes_everything_but_the_plots(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", NO_MATPLOTLIB_EVAL, str(out)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["ran"] == 1
    hint = "pip install 'evictkit[plots]'"
    assert proc.stderr.count(hint) == 1 and "Traceback" not in proc.stderr
    assert (out / "results.jsonl").read_text().count("\n") == 1
    assert hint in (out / "summary.md").read_text()
    assert not list(out.glob("plots/*.png"))


def test_load_model_without_the_models_extra_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv("EVICTKIT_CACHE", str(tmp_path))  # nothing converted yet
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ValueError) as err:
        evictkit.load_model("smollm2")
    assert "needs gguf (not installed): pip install 'evictkit[models]'" in str(err.value)
    assert list(tmp_path.iterdir()) == []  # checked before anything was assembled or written


# --- the conformance kit -------------------------------------------------------------------------

KIT_RUN = """
import sys
from hypothesis import configuration
from evictkit.specs import check_law

before = vars(configuration).get("__hypothesis_home_directory")
check_law("order", "streaming_llm")
check_law("generation", "streaming_llm")
assert vars(configuration).get("__hypothesis_home_directory") == before, "the caller's setting was not restored"
print("ok")
"""


def test_the_kit_writes_nothing_into_the_callers_directory_and_warns_of_no_deprecated_argument(tmp_path):
    work, cache = tmp_path / "pkg", tmp_path / "cache"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "HYPOTHESIS_STORAGE_DIRECTORY"}
    env.update(PYTHONPATH=os.pathsep.join(sys.path), EVICTKIT_CACHE=str(cache))
    proc = subprocess.run([sys.executable, "-W", "default", "-c", KIT_RUN], cwd=work, capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
    assert list(work.iterdir()) == []  # no .hypothesis/ in the caller's package
    assert "past_key_values" not in proc.stderr and "deprecated" not in proc.stderr.lower(), proc.stderr
