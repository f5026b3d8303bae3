"""The command line: list, errors that say what to do, help."""

import json

import pytest

from evictkit.cli import _parse_params, main


def test_list_json_names_builtin_policies_with_their_package(capsys):
    assert main(["list", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in data["policies"]}
    assert rows["streaming_llm"]["package"] == "evictkit"
    assert rows["streaming_llm"]["phases"] == ["prefill", "decode"]
    assert rows["streaming_llm"]["params"]["sinks"] == "4"


def test_list_table(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "streaming_llm" in out and "sinks=4" in out
    lines = out.split("\n\n", 1)[0].splitlines()  # the policy table (the prefill attentions follow)
    # columns line up: every row's parameters start where the header's do
    start = lines[0].index("parameters")
    for line in lines[1:]:
        assert line[start - 2 : start] == "  " and line[start] != " ", line


def test_generate_with_unknown_policy_fails_before_loading_the_model(capsys):
    assert main(["generate", "--policy", "nope", "--prompt", "hi"]) == 2
    assert "unknown policy 'nope'" in capsys.readouterr().err


def test_generate_with_bad_params_names_them(capsys):
    assert main(["generate", "--policy", "streaming_llm", "--params", "window=3", "--prompt", "hi"]) == 2
    assert "no parameter window" in capsys.readouterr().err


def test_bad_budget_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--budget", "lots", "--prompt", "hi"])
    assert "budget 'lots'" in capsys.readouterr().err


def test_param_parsing():
    assert _parse_params("alpha=0.3,beta=2000,pool=max,flag=true") == {
        "alpha": 0.3, "beta": 2000, "pool": "max", "flag": True}
    with pytest.raises(ValueError, match="name=value"):
        _parse_params("alpha")


def test_help_explains(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "entries kept per layer per KV head" in out


def test_env_json_reports_versions_and_devices(capsys):
    import importlib.metadata

    import torch

    import evictkit

    assert main(["env", "--json"]) == 0
    env = json.loads(capsys.readouterr().out)
    v = env["versions"]
    assert v["evictkit"] == evictkit.__version__ and v["torch"] == torch.__version__
    assert v["pluggy"] == importlib.metadata.version("pluggy")
    assert v["hypothesis"] == importlib.metadata.version("hypothesis")
    assert set(v) >= {"python", "transformers", "triton", "attrs"}
    assert env["policies"] == len(evictkit.policies())
    # the extras come from evictkit's metadata: this very test runs with the dev extra's pytest
    assert env["extras"]["dev"]["packages"]["pytest"] == pytest.__version__
    assert set(env["extras"]) >= {"models", "plots", "dev"}
    dev = env["devices"]
    assert dev["cpu"]["torch_threads"] == torch.get_num_threads()
    assert len(dev["cuda"]) == torch.cuda.device_count()
    for i, g in enumerate(dev["cuda"]):
        assert g["name"] == torch.cuda.get_device_name(i) and g["memory_gib"] > 0
    assert dev["triton"] in ("native", "interpreter", "unavailable")


def test_env_triton_mode(monkeypatch):
    from evictkit.cli import triton_mode

    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert triton_mode(cuda=True) == "native"
    assert triton_mode(cuda=False) == "interpreter"  # no device: only the interpreter can run it
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_mode(cuda=True) == "interpreter"


def test_env_text(capsys):
    import torch

    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert f"torch         {torch.__version__}" in out
    assert "policies registered" in out and "triton" in out
    if not torch.cuda.is_available():
        assert "cuda          no device" in out
