"""The evaluation's configuration: `EvalConfig` (everything that decides the results), the
command line's policy and budget syntax, and the (policy, budget) variants a run compares."""

from __future__ import annotations

import ast
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from evictkit.budget import check_budget
from evictkit.contract import capabilities
from evictkit.eval import longbench, longgen
from evictkit.eval.tasks import TASKS, parse_tasks, register_gen, task_list
from evictkit.registry import build_policy, build_prefill_attention, get_registry

DEFAULT_DEPTHS = (0.0, 25.0, 50.0, 75.0, 100.0)
DENSE: tuple[tuple[str, tuple], ...] = (("dense", ()),)  # the default --prefill-attention


# --- parsing ----------------------------------------------------------------------------------

def _value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        return text.strip()


def _parse_named(text: str, kind: str) -> list[tuple[str, dict[str, Any]]]:
    """`a,b:x=1,y=2,c` -> [(a, {}), (b, {x: 1, y: 2}), (c, {})]; `kind` names the items in errors.

    A comma-separated item holding `=` but no `:` is one more parameter of the item before it.
    """
    out: list[tuple[str, dict[str, Any]]] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        if "=" in item and ":" not in item:
            if not out:
                raise ValueError(f"{kind} parameter {item!r} comes before any {kind} name (use name:param=value)")
            name_params = [item]
        else:
            name, _, rest = item.partition(":")
            out.append((name.strip(), {}))
            name_params = [rest] if rest.strip() else []
        for kv in name_params:
            key, eq, val = kv.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"{kind} parameter {kv!r} of {out[-1][0]!r}: write it as name=value")
            out[-1][1][key.strip()] = _value(val)
    return out


def parse_policies(text: str) -> list[tuple[str, dict[str, Any]]]:
    """`full,restkv:alpha=0.3,beta=2000,snapkv` -> [(full, {}), (restkv, {alpha: .3, beta: 2000}), (snapkv, {})].

    A comma-separated item holding `=` but no `:` is one more parameter of the policy before it.
    """
    out = _parse_named(text, "policy")
    if not out:
        raise ValueError("no policy given (e.g. --policies full,streaming_llm,snapkv)")
    return out


def parse_prefill(text: str, params: str = "") -> list[tuple[str, dict[str, Any]]]:
    """`--prefill-attention` and `--prefill-params`: `dense,xattention:threshold=0.95,a_shape:n_local=1024`
    (the --policies syntax) -> [(dense, {}), (xattention, {threshold: .95}), (a_shape, {n_local: 1024})].

    `params`, a JSON object, holds the parameters of the one non-dense method in the list (a list
    with several takes them inline). Names and parameters are checked in `EvalConfig`.
    """
    out = _parse_named(text, "prefill attention")
    if not out:
        raise ValueError(f"--prefill-attention {text!r}: no prefill attention given (e.g. dense or dense,xattention; "
                         f"registered: {_prefill_names()})")
    if params.strip():
        try:
            extra = json.loads(params)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--prefill-params {params!r} is not JSON ({exc.msg}); e.g. '{{\"threshold\": 0.9}}'") \
                from None
        if not isinstance(extra, dict):
            raise ValueError(f"--prefill-params {params!r}: must be a JSON object, e.g. '{{\"threshold\": 0.9}}'")
        sparse = [i for i, (name, _) in enumerate(out) if name != "dense"]
        if len(sparse) != 1:
            raise ValueError(
                f"--prefill-params applies to exactly one non-dense --prefill-attention, and {text!r} names "
                f"{len(sparse)}; give each its own as name:key=value (e.g. dense,xattention:threshold=0.9)")
        name, inline = out[sparse[0]]
        both = sorted(set(inline) & set(extra))
        if both:
            raise ValueError(f"--prefill-params and --prefill-attention both set {', '.join(both)} of {name!r}")
        inline.update(extra)
    return out


def _prefill_names() -> str:
    return ", ".join(get_registry().prefill_attentions())


def build_prefill(name: str, params: Sequence[tuple[str, Any]] | dict[str, Any]) -> Any:
    """The PrefillAttention named `name` with `params`; ValueError naming --prefill-attention."""
    if name not in get_registry().prefill_attentions():
        raise ValueError(f"--prefill-attention: unknown prefill attention {name!r}; registered: {_prefill_names()}")
    try:
        return build_prefill_attention(name, **dict(params))
    except ValueError as exc:
        raise ValueError(f"--prefill-attention {name}: {exc}") from None


def prefill_label(name: str, params: Sequence[tuple[str, Any]]) -> str:
    """`xattention` or `a_shape(n_local=1024)`: how rows and tables name a prefill attention."""
    return name if not params else f"{name}({','.join(f'{k}={v}' for k, v in params)})"


def parse_budgets(text: str) -> list[int | float]:
    """`64,128` (entries per KV head) or `0.1,0.25` (fractions of the prompt), or a mix."""
    out: list[int | float] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        try:
            value: int | float = int(item)
        except ValueError:
            try:
                value = float(item)
            except ValueError:
                raise ValueError(
                    f"budget {item!r} is neither an int (entries per KV head) "
                    "nor a float in (0, 1] (fraction of the prompt)"
                ) from None
        out.append(check_budget(value))
    if not out:
        raise ValueError("no budget given (e.g. --budgets 64,128,256 or 0.1,0.25)")
    return out


def _number_list(text: str, what: str, cast: type, kind: str, ok, rule: str) -> tuple:
    """`1,2,3` -> (1, 2, 3) via `cast`; ValueError naming `what` when an item is not a `kind`
    or the list is empty or fails `ok` (described by `rule`)."""
    try:
        vals = tuple(cast(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{what}={text!r}: must be comma-separated {kind}") from None
    if not vals or not ok(vals):
        raise ValueError(f"{what}={text!r}: must be {rule}")
    return vals


def _ints(text: str, what: str) -> tuple[int, ...]:
    return _number_list(text, what, int, "integers", lambda v: min(v) >= 1, "comma-separated integers >= 1")


def _floats(text: str, what: str) -> tuple[float, ...]:
    return _number_list(text, what, float, "numbers", lambda v: 0 <= min(v) and max(v) <= 100,
                        "percentages in [0, 100]")


# --- configuration ----------------------------------------------------------------------------

@attrs.frozen(kw_only=True)
class EvalConfig:
    """Everything that decides the results (and so what a resumed run must match)."""

    model: str = "smollm2"
    tasks: tuple[str, ...]
    policies: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]
    budgets: tuple[int | float, ...]
    length: int = 4096
    samples: int = 10
    seed: int = 42
    query_aware: bool = False
    max_new_tokens: int | None = None
    niah_lengths: tuple[int, ...] = ()
    niah_depths: tuple[float, ...] = DEFAULT_DEPTHS
    continuation: int = 256
    chat: bool | None = None
    dtype: str = "float32"
    data: str | None = attrs.field(default=None, converter=attrs.converters.optional(str))  # LongBench's JSONL folder
    # long generation (gen:NAME tasks): the JSONL fields of the question and the answer, and the
    # decode-time slack (a layer is cut back to its budget when it exceeds budget + slack)
    gen_fields: tuple[str, str] = attrs.field(default=longgen.DEFAULT_FIELDS, converter=tuple)
    slack: int = 0
    # the prefill attentions every (policy, budget) runs under, as (name, sorted params); the default,
    # dense alone, is the model's own attention (and leaves the fingerprint of older runs as it was)
    prefill_attention: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = DENSE

    @classmethod
    def from_strings(cls, *, tasks: str, policies: str, budgets: str, niah_lengths: str = "", niah_depths: str = "",
                     gen_fields: str = "", prefill_attention: str = "dense", prefill_params: str = "",
                     **kw: Any) -> EvalConfig:
        pol = tuple((n, tuple(sorted(p.items()))) for n, p in parse_policies(policies))
        extra: dict[str, Any] = {}
        pre = tuple(dict.fromkeys((n, tuple(sorted(p.items()))) for n, p in parse_prefill(prefill_attention,
                                                                                           prefill_params)))
        if pre != DENSE:
            extra["prefill_attention"] = pre
        if gen_fields:
            extra["gen_fields"] = longgen.parse_fields(gen_fields)
        if niah_lengths:
            extra["niah_lengths"] = _ints(niah_lengths, "--niah-lengths")
        if niah_depths:
            extra["niah_depths"] = _floats(niah_depths, "--niah-depths")
        return cls(tasks=tuple(parse_tasks(tasks)), policies=pol, budgets=tuple(parse_budgets(budgets)), **extra, **kw)

    def __attrs_post_init__(self) -> None:
        for name in ("length", "samples", "continuation"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r}: must be an int >= 1")
        if self.max_new_tokens is not None and (not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1):
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r}: must be an int >= 1")
        if isinstance(self.slack, bool) or not isinstance(self.slack, int) or self.slack < 0:
            raise ValueError(f"slack={self.slack!r}: must be an int >= 0 (extra entries before a decode-time eviction)")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype={self.dtype!r}: must be float32, bfloat16 or float16")
        if not self.prefill_attention:
            raise ValueError(f"prefill_attention=(): name at least one (registered: {_prefill_names()})")
        for name, params in self.prefill_attention:
            build_prefill(name, params)  # an unknown name or parameter is an error before the model loads
        for t in self.tasks:
            if longgen.is_task(t):
                register_gen(t)
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task {unknown[0]!r}; tasks: {task_list()}")
        for t in self.tasks:
            if TASKS[t].family == "longbench":
                longbench.data_file(self.data, t)  # a missing file is an error now, not after the model loads
            if TASKS[t].family == longgen.FAMILY:
                longgen.load(self.data, t, self.gen_fields)  # a missing file or field too

    def fingerprint(self) -> dict:
        d = attrs.asdict(self, recurse=False)
        d["tasks"] = list(self.tasks)
        d["policies"] = [[n, dict(p)] for n, p in self.policies]
        d["budgets"] = list(self.budgets)
        d["niah_lengths"] = list(self.niah_lengths or (self.length,))
        d["niah_depths"] = list(self.niah_depths)
        if self.data is None or not any(TASKS[t].family in ("longbench", longgen.FAMILY) for t in self.tasks):
            del d["data"]  # only LongBench and gen:NAME read it; runs from before --data keep their fingerprint
        else:
            d["data"] = str(Path(self.data).expanduser().resolve())
        if not any(TASKS[t].family == longgen.FAMILY for t in self.tasks):
            del d["gen_fields"], d["slack"]  # read by gen:NAME only: runs without it keep their fingerprint
        if self.prefill_attention == DENSE:
            del d["prefill_attention"]  # the default: runs from before --prefill-attention keep their fingerprint
        else:
            d["prefill_attention"] = [[n, dict(p)] for n, p in self.prefill_attention]
        return json.loads(json.dumps(d))


@attrs.frozen
class Variant:
    label: str  # "snapkv" or "restkv(alpha=0.3)"
    policy: Any
    budget: int | float | None  # None: the full cache (policy "full"), run once per sample
    prefill: str = "dense"  # the prefill attention's label ("dense", "xattention", "a_shape(n_local=1024)")
    method: Any = None  # its PrefillAttention; None for dense (the model's own attention, nothing installed)

    @property
    def key(self) -> str:
        # dense keeps the key it had before prefill attentions: a dense run can be extended by sparse ones
        base = f"{self.label}|{self.budget}"
        return base if self.method is None else f"{base}|{self.prefill}"


def build_variants(config: EvalConfig) -> list[Variant]:
    """Every (prefill attention, policy, budget) of `config`, prefill-major (each prefill attention's
    variants share one prefill per sample)."""
    out, seen = [], set()
    for pname, pparams in config.prefill_attention:
        method = build_prefill(pname, pparams)
        method = None if method.dense else method
        plabel = prefill_label(pname, pparams)
        for name, params in config.policies:
            policy = build_policy(name, **dict(params))
            label = name if not params else f"{name}({','.join(f'{k}={v}' for k, v in params)})"
            if method is not None and capabilities(policy)["ragged_heads"]:
                raise ValueError(
                    f"policy {label} keeps different counts per KV head (tag ragged_heads), which needs the model's "
                    f"own attention: it cannot run under --prefill-attention {plabel}; run it in a dense-only run")
            budgets: Sequence[int | float | None] = [None] if name == "full" else config.budgets
            for b in budgets:
                if isinstance(b, int):
                    policy.check_budget(b)
                v = Variant(label, policy, b, plabel, method)
                if v.key not in seen:
                    seen.add(v.key)
                    out.append(v)
    return out
