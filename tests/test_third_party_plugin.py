"""A third-party policy package, installed the way a user installs one, is found and runs; broken
plugins are reported and never break `import evictkit`.

The packages are pip-installed into a temporary directory (never into the project's environment)
and exercised in subprocesses with PYTHONPATH pointing there, so entry points are discovered
exactly as in a user's environment.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "evictkit-example-policy"

def _one_module_package(dist: str, entry: str, module_text: str) -> dict[str, str]:
    """Files of an installable one-module plugin distribution `dist` whose module registers
    under the `evictkit` entry point `entry`."""
    module = dist.replace("-", "_")
    pyproject = f"""
        [build-system]
        requires = ["setuptools>=69"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "{dist}"
        version = "0.0.1"

        [project.entry-points.evictkit]
        {entry} = "{module}"

        [tool.setuptools]
        py-modules = ["{module}"]
    """
    return {"pyproject.toml": pyproject, f"{module}.py": module_text}


BROKEN_IMPORT = _one_module_package("evictkit-broken-import", "broken_import", """
    raise RuntimeError("this plugin is broken on purpose")
""")

DUPLICATE = _one_module_package("evictkit-duplicate-name", "impostor", """
    from typing import ClassVar

    import attrs

    import evictkit


    @attrs.define(frozen=True, kw_only=True)
    class Impostor(evictkit.Policy):
        name: ClassVar[str] = "streaming_llm"  # taken by a built-in


    @evictkit.hookimpl
    def evictkit_register_policies(register):
        register(Impostor)
""")


def _write_package(root: Path, files: dict[str, str]) -> Path:
    root.mkdir(parents=True)
    for name, text in files.items():
        (root / name).write_text(textwrap.dedent(text).lstrip())
    return root


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """A directory holding the example package and two broken plugins, installed by pip."""
    work = tmp_path_factory.mktemp("plugins")
    # build from copies: an in-tree build would leave build/ and *.egg-info in the repository
    example = work / "src" / "evictkit-example-policy"
    shutil.copytree(EXAMPLE, example, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    broken = _write_package(work / "src" / "broken-import", BROKEN_IMPORT)
    duplicate = _write_package(work / "src" / "duplicate-name", DUPLICATE)
    target = work / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--target", str(target), str(example), str(broken), str(duplicate)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    return target


def _run(site: Path, code: str, **env: str) -> dict:
    """Run `code` in a fresh interpreter that sees `site`; it prints one JSON object last."""
    environ = {k: v for k, v in os.environ.items() if k != "EVICTKIT_DISABLE_PLUGIN_AUTOLOAD"}
    environ.update(PYTHONPATH=str(site), **env)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=environ, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


REPORT = """
    import json, warnings
    warnings.simplefilter("ignore")
    import evictkit
    from evictkit.registry import get_registry
    policies = evictkit.policies()
    print(json.dumps({
        "policies": {name: get_registry().entries[name].package for name in policies},
        "failures": [{"plugin": f.plugin, "package": f.package, "error": f.error} for f in evictkit.plugin_failures()],
    }))
"""


def test_the_example_package_is_registered_with_its_package_name(site):
    out = _run(site, REPORT)
    assert out["policies"]["key_norm"] == "evictkit-example-policy"
    assert out["policies"]["streaming_llm"] == "evictkit"  # the built-in kept its name


def test_the_example_policy_runs_through_compress_on_a_tiny_model(site):
    out = _run(site, """
        import json, warnings
        warnings.simplefilter("ignore")
        import torch
        import evictkit
        from evictkit.specs.tiny import tiny_model

        model = tiny_model("llama", layers=2)
        ids = torch.randint(3, 128, (1, 24), generator=torch.Generator().manual_seed(0))
        with evictkit.compress(model, "key_norm", budget=8, window=2) as run:
            cache = model(ids, use_cache=True).past_key_values
        full = model(ids, use_cache=True).past_key_values
        # key_norm keeps the 6 smallest-norm keys of each head plus the 2 newest
        norms = full.layers[0].keys.float().norm(dim=-1)[..., :-2]
        expected = torch.cat([norms.argsort(dim=-1, stable=True)[..., :6].sort(dim=-1).values,
                              torch.tensor([22, 23]).expand(1, 2, 2)], dim=-1)
        kept = cache.layers[0].keys
        gathered = full.layers[0].keys.gather(2, expected.unsqueeze(-1).expand(-1, -1, -1, kept.shape[-1]))
        print(json.dumps({"sizes": run.stats.sizes(), "policy": repr(run.policy),
                          "matches_reference": bool(torch.equal(kept, gathered))}))
    """)
    assert out["sizes"] == [8, 8]
    assert out["policy"] == "KeyNorm(sinks=0, window=2)"
    assert out["matches_reference"]


def test_broken_plugins_are_reported_and_evictkit_still_imports(site):
    out = _run(site, REPORT)
    failures = {f["package"]: f for f in out["failures"]}
    assert failures["evictkit-broken-import"]["plugin"] == "broken_import"
    assert "RuntimeError: this plugin is broken on purpose" in failures["evictkit-broken-import"]["error"]
    assert failures["evictkit-duplicate-name"]["plugin"] == "impostor"
    assert "duplicate policy name 'streaming_llm'" in failures["evictkit-duplicate-name"]["error"]
    assert "key_norm" in out["policies"]  # one broken plugin does not hide another plugin


def test_disabling_autoload_loads_builtins_only(site):
    out = _run(site, REPORT, EVICTKIT_DISABLE_PLUGIN_AUTOLOAD="1")
    assert "key_norm" not in out["policies"]
    assert set(out["policies"].values()) == {"evictkit"}
    assert {"full", "random", "streaming_llm"} <= set(out["policies"])
    assert out["failures"] == []


def test_the_example_packages_own_conformance_tests_run(site, tmp_path):
    """The example's five-line test file, run by pytest against the installed package."""
    tests = site.parent / "src" / "evictkit-example-policy" / "tests"
    environ = {k: v for k, v in os.environ.items() if k != "EVICTKIT_DISABLE_PLUGIN_AUTOLOAD"}
    environ["PYTHONPATH"] = str(site)
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tests.parent),
            str(tests / "test_conformance.py")]
    collected = subprocess.run([*base, "--collect-only"], env=environ, capture_output=True, text=True, timeout=300,
                               cwd=tmp_path)
    assert collected.returncode == 0, collected.stdout + collected.stderr
    from evictkit.specs.laws import LAWS

    assert f"{2 * len(LAWS)} tests collected" in collected.stdout  # every law x 2 parameter sets
    # two laws end to end are enough to show the kit runs there; tests/test_laws.py runs them all
    ran = subprocess.run([*base, "-k", "test_order or test_compress"], env=environ, capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "4 passed" in ran.stdout
