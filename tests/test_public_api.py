"""What third parties see: built-ins import only what they can import, and old names keep working."""

import ast
import warnings
from pathlib import Path

import pytest

import evictkit

PLUGINS = Path(__file__).parent.parent / "plugins"
#: modules a policy may import from evictkit: the facade, the helpers, and sibling built-ins
PUBLIC = {"evictkit", "evictkit.helpers"}


@pytest.mark.parametrize("path", sorted(PLUGINS.glob("*.py")), ids=lambda p: p.name)
def test_built_in_policies_import_only_public_modules(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("evictkit"):
            assert node.module in PUBLIC or node.module.startswith("evictkit.plugins."), (path.name, node.module)


def test_the_old_policy_module_path_warns_and_keeps_the_function():
    with pytest.warns(DeprecationWarning, match="evictkit.contract; import Policy from evictkit"):
        from evictkit.policy import Policy
    assert Policy is evictkit.Policy
    assert callable(evictkit.policy) and evictkit.policy("full").name == "full"


def test_validators_are_public_and_name_the_parameter():
    import attrs

    from evictkit.helpers import int_at_least, odd_kernel, one_of

    @attrs.define(frozen=True)
    class P:
        window: int = attrs.field(default=4, validator=int_at_least(1))
        pool: str = attrs.field(default="max", validator=one_of(("max", "avg")))
        kernel: int = attrs.field(default=3, validator=odd_kernel)

    for kwargs, match in (({"window": 0}, r"window=0: must be an int >= 1"), ({"window": True}, "window=True"),
                          ({"pool": "min"}, r"pool='min': must be one of 'max', 'avg'"),
                          ({"kernel": 4}, r"kernel=4: must be a positive odd int")):
        with pytest.raises(ValueError, match=match):
            P(**kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        P()
