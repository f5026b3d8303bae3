"""Capability tags: `Needs` flags, `Needs.tags()`, `contract.capabilities(policy)`, `evictkit list`."""

import json

import pytest

import evictkit
from evictkit.cli import main
from evictkit.contract import READ_TAGS, TAGS, Needs, capabilities, declared

# What each built-in reads, decided from its code (docs/policies.md shows the same column).
BUILT_IN_TAGS = {
    "adakv": ("window_queries", "ragged_heads"),
    "cake": ("window_queries", "cross_layer"),
    "criticalkv": ("window_queries", "layer_weights"),
    "expected_attention": ("queries",),
    "full": ("kv_only",),
    "h2o": ("queries", "attention_weights"),
    "h2o_prefill": ("window_queries", "queries", "attention_weights"),
    "keydiff": ("kv_only",),
    "knorm": ("kv_only",),
    "lacache": ("kv_only",),
    "lagkv": ("kv_only",),
    "pyramidkv": ("window_queries",),
    "random": ("kv_only",),
    "restkv": ("window_queries", "queries", "layer_weights", "attention_weights"),
    "rkv": ("window_queries",),
    "snapkv": ("window_queries",),
    "streaming_llm": ("kv_only",),
    "tova": ("window_queries",),
    "triattention": ("queries",),
}


def _built_ins() -> dict[str, type]:
    return {n: c for n, c in evictkit.policies().items() if evictkit.describe(c)["package"] == "evictkit"}


def test_every_built_in_declares_the_tags_in_the_table():
    built = _built_ins()
    missing = sorted(set(built) - set(BUILT_IN_TAGS))
    assert not missing, f"add the tags of {missing} to BUILT_IN_TAGS"
    for name, cls in built.items():
        assert declared(cls()).tags() == BUILT_IN_TAGS[name], name


@pytest.mark.parametrize(
    ("policy", "tags"),
    [
        (("criticalkv", {"scorer": "knorm"}), ("layer_weights",)),  # a wrapper adds to its scorer's reads
        (("criticalkv", {"scorer": "h2o_prefill"}),
         ("window_queries", "queries", "layer_weights", "attention_weights")),
        (("adakv", {"scorer": "h2o_prefill"}), ("window_queries", "queries", "attention_weights", "ragged_heads")),
        (("restkv", {"decode": "window"}), ("window_queries", "layer_weights")),  # nothing carried
        (("restkv", {"indicator": "attn", "decode": "window"}), ("window_queries",)),  # no o_proj
    ],
)
def test_options_and_wrapped_scorers_change_the_tags(policy, tags):
    name, params = policy
    assert declared(evictkit.policy(name, **params)).tags() == tags


def test_kv_only_is_exclusive_and_tags_keep_their_documented_order():
    assert Needs().tags() == ("kv_only",)
    assert Needs(ragged_heads=True).tags() == ("kv_only", "ragged_heads")
    assert Needs(exact_budget=False, positions="shift", may_evict_newest=True).tags() == ("kv_only",)
    every = Needs(window=4, queries=True, layer_weights=True, attention_weights=True, extra_passes=True,
                  ragged_heads=True, cross_layer=True, padding=True)
    assert every.tags() == TAGS[1:]
    for flag in ("layer_weights", "extra_passes"):
        assert Needs(**{flag: True}).tags() == (flag,)
    assert Needs(window=1).tags() == ("window_queries",)
    for name, cls in evictkit.policies().items():
        tags = declared(cls()).tags()
        reads = [t for t in tags if t in READ_TAGS]
        assert reads and ("kv_only" not in reads or reads == ["kv_only"]), (name, tags)


@pytest.mark.parametrize("flag", ["layer_weights", "attention_weights", "extra_passes", "ragged_heads", "cross_layer"])
@pytest.mark.parametrize("value", [1, "yes", None])
def test_flags_must_be_bools(flag, value):
    with pytest.raises(ValueError, match=f"Needs.{flag}={value!r}: must be True or False"):
        Needs(**{flag: value})


def test_cross_layer_needs_padding_and_is_a_shape_tag():
    with pytest.raises(ValueError, match="cross_layer=True.*padding=True"):
        Needs(cross_layer=True)
    cap = capabilities(evictkit.policy("cake"))
    assert cap["tags"] == ("window_queries", "cross_layer") and cap["reads"] == ("window_queries",)
    assert cap["cross_layer"] and not cap["ragged_heads"]


def test_attention_weights_need_the_queries():
    with pytest.raises(ValueError, match="attention_weights=True.*queries=True"):
        Needs(attention_weights=True)
    assert Needs(queries=True, attention_weights=True).tags() == ("queries", "attention_weights")


def test_capabilities_answers_from_the_declared_needs():
    cap = capabilities(evictkit.policy("adakv"))
    assert cap == {"tags": ("window_queries", "ragged_heads"), "reads": ("window_queries",),
                   "phases": ("prefill",), "ragged_heads": True, "cross_layer": False, "window": 32,
                   "positions": "absolute"}
    cap = capabilities(evictkit.policy("streaming_llm", positions="shift"))
    assert cap["reads"] == ("kv_only",) and cap["phases"] == ("prefill", "decode") and cap["positions"] == "shift"
    assert not cap["ragged_heads"] and cap["window"] == 0
    assert capabilities(evictkit.policy("rkv"))["phases"] == ("prefill", "decode")


def test_capabilities_refuses_a_policy_without_needs():
    class Broken(evictkit.Policy):
        name = "broken_needs"

        def needs(self):
            return {"window": 3}

    with pytest.raises(ValueError, match="needs\\(\\) must return evictkit.Needs"):
        capabilities(Broken())


def test_list_json_and_table_show_the_tags(capsys):
    assert main(["list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["policies"]}
    built = set(_built_ins())  # a table entry may run ahead of its plugin's registration
    for name, tags in BUILT_IN_TAGS.items():
        assert name not in built or rows[name]["tags"] == list(tags), name
    assert rows["adakv"]["needs"]["ragged_heads"] is True
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.split("\n\n")[0].splitlines()  # the policy table (other tables follow)
    start = lines[0].index("tags")
    by_name = {line.split()[0]: line for line in lines[1:]}
    for name, tags in BUILT_IN_TAGS.items():
        assert name not in built or by_name[name][start:].split()[0] == ",".join(tags), name
    # flags are shown once, as tags; the needs column keeps the other needs
    assert "queries=True" not in by_name["h2o"] and "window=32" in by_name["snapkv"]
