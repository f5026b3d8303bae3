"""Every law of eviction over every registered policy, and over the example third-party policy.

The laws and the kit live in specs/ (evictkit.specs); this file only applies them. The set of
policies is whatever the registry holds at collection time: a built-in whose module fails to
import is absent here and fails `test_every_builtin_plugin_loads`.
Profile: EVICTKIT_HYPOTHESIS_PROFILE=ci (default) or thorough.
"""

import sys
from pathlib import Path

import evictkit
from evictkit.registry import BUILTIN_DIST, get_registry
from evictkit.specs import conformance_tests

# The example package is not installed in the project's environment: import it from its source.
EXAMPLE_SRC = Path(__file__).resolve().parents[1] / "examples" / "evictkit-example-policy" / "src"
sys.path.insert(0, str(EXAMPLE_SRC))
from evictkit_example import KeyNorm  # noqa: E402

for _name in evictkit.policies():
    globals()[f"TestLaws_{_name}"] = conformance_tests(_name)

TestLaws_example_key_norm = conformance_tests(KeyNorm, params=[{}, {"sinks": 2, "window": 3}])


def test_every_builtin_plugin_loads():
    failures = [f for f in evictkit.plugin_failures() if f.package == BUILTIN_DIST]
    assert not failures, "\n".join(str(f) for f in failures)
    builtins = {name for name, e in get_registry().entries.items() if e.package == BUILTIN_DIST}
    assert {"full", "random", "streaming_llm"} <= builtins
