"""evictkit's laws of eviction, applied to key_norm (the package must be installed: pip install -e .)."""
from evictkit.specs import conformance_tests

TestKeyNorm = conformance_tests("key_norm")
TestKeyNormProtected = conformance_tests("key_norm", params={"sinks": 2, "window": 4})
