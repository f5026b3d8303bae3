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
    lines = out.splitlines()
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
