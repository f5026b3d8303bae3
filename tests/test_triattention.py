"""TriAttention: the scores against a loop-by-loop restatement of the method, a hand-worked case,
the statistics file (round trip, refusals), `evictkit triattention-stats` end to end on a tiny
random model, decode-time eviction under compress, and the conformance kit with a stats file."""

from __future__ import annotations

import json
import math

import pytest
import torch
from generation import prompt_ids
from models import tiny_model

import evictkit
from evictkit.cli import main
from evictkit.observation import Observation
from evictkit.plugins import _triattention_stats as qs
from evictkit.plugins.triattention import TriAttention, geometric_offsets, trig_scores
from evictkit.specs import conformance_tests
from evictkit.specs.tiny import tiny_attention


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_stats(layers: int, heads: int, head_dim: int, seed: int = 0, theta: float = 10000.0) -> qs.QueryStats:
    g = _gen(seed)
    F = head_dim // 2
    q = torch.complex(torch.randn(layers, heads, F, generator=g), torch.randn(layers, heads, F, generator=g))
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    return qs.QueryStats(q_mean=q, q_abs_mean=q.abs() + torch.rand(layers, heads, F, generator=g),
                         inv_freq=inv_freq.expand(layers, F).clone(), attention_scaling=torch.ones(layers),
                         fingerprint=torch.full((layers, 2), float("nan"), dtype=torch.float64),
                         meta={"model": "random", "identity": {}})


# --- the scores against their definition ----------------------------------------------------
def _reference(keys, positions, t, q_mean, q_abs, inv_freq, rope, offsets, aggregation, mlr) -> list[list[list[float]]]:
    """S per (query head, key), loop by loop in fp64: RoPE undone with the model's own cos/sin
    (x = y cos - rotate_half(y) sin), then the series summed frequency by frequency."""
    Hkv, T, D = keys.shape
    H, F = q_mean.shape
    G = H // Hkv
    out = []
    for h in range(H):
        row = []
        for j in range(T):
            p = int(positions[h // G, j])
            cos, sin = rope(torch.zeros(1), torch.tensor([[p]]))
            y = keys[h // G, j].double()
            half = torch.cat([-y[F:], y[:F]])
            x = (y * cos[0, 0].double() - half * sin[0, 0].double()).tolist()
            per_offset = []
            for d in offsets:
                s = 0.0
                for f in range(F):
                    qr, qi = float(q_mean[h, f].real), float(q_mean[h, f].imag)
                    kr, ki = x[f], x[f + F]
                    amp = math.hypot(qr, qi) * math.hypot(kr, ki)
                    phi = math.atan2(qi * kr - qr * ki, qr * kr + qi * ki)  # arg(q conj k)
                    extra = (float(q_abs[h, f]) - (math.hypot(qr, qi) if mlr else 0.0)) * math.hypot(kr, ki)
                    s += amp * math.cos((t - p + d) * float(inv_freq[f]) + phi) + extra
                per_offset.append(s)
            row.append(sum(per_offset) / len(per_offset) if aggregation == "mean" else max(per_offset))
        out.append(row)
    return out


@pytest.mark.parametrize("aggregation,mlr,most", [("mean", True, 65536), ("max", True, 64), ("mean", False, 8)])
def test_trig_scores_match_the_series_summed_by_hand(aggregation, mlr, most):
    module, rope = tiny_attention(4, 2, 8, 0, "float32")
    g = _gen(1)
    T = 7
    positions = torch.stack([torch.tensor([0, 2, 3, 9, 10, 11, 15]), torch.tensor([1, 2, 5, 6, 12, 13, 15])])
    cos, sin = rope(torch.zeros(1), positions)
    pre = torch.randn(2, T, 8, generator=g)
    half = torch.cat([-pre[..., 4:], pre[..., :4]], dim=-1)
    keys = pre * cos + half * sin  # the cache holds keys rotated at their true positions
    stats = _random_stats(1, 4, 8)
    inv_freq, scaling = qs.layer_rope(module)
    got = trig_scores(keys[None], positions[None], torch.tensor([16]), stats.q_mean[0][None], stats.q_abs_mean[0][None],
                      inv_freq, scaling, geometric_offsets(most), aggregation, mlr)[0]
    ref = _reference(keys, positions, 16, stats.q_mean[0], stats.q_abs_mean[0], inv_freq, rope,
                     geometric_offsets(most).tolist(), aggregation, mlr)
    torch.testing.assert_close(got.double(), torch.tensor(ref, dtype=torch.float64), rtol=1e-4, atol=1e-4)


def test_trig_scores_hand_worked():
    # D = 2, one frequency w = pi/2, the one offset d = 1, t = 1, keys at p = 0 (no rotation):
    # q = 1, E|z| = 2. Key (1, 0): cos(2 w) + (2 - 1) * 1 = 0. Key (0, 1): phi = arg(conj i) = -pi/2,
    # cos(pi - pi/2) + 1 = 1. Key (2, 0): 2 cos(pi) + 2 = 0.
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])[None, None]
    s = trig_scores(keys, torch.zeros(1, 1, 3, dtype=torch.long), torch.tensor([1]),
                    torch.tensor([[1.0 + 0.0j]], dtype=torch.complex64)[None], torch.tensor([[2.0]])[None],
                    torch.tensor([math.pi / 2]), 1.0, geometric_offsets(1))
    torch.testing.assert_close(s[0, 0], torch.tensor([0.0, 1.0, 0.0]), atol=1e-6, rtol=0)


def _decode_obs(T: int, prompt: int, stats_path=None, seed: int = 3, **kw) -> tuple[Observation, TriAttention]:
    module, rope = tiny_attention(4, 2, 8, 0, "float32")
    g = _gen(seed)
    pos = torch.arange(T)
    obs = Observation(
        module=module, layer_idx=0, n_layers=1, phase="decode", keys=torch.randn(1, 2, T, 8, generator=g),
        values=torch.randn(1, 2, T, 8, generator=g), positions=pos.expand(1, 2, T), state={},
        scratch={"triattention_prompt": prompt}, hidden_states=torch.randn(1, 1, module.config.hidden_size),
        position_embeddings=rope(torch.zeros(1), pos[-1:][None]), query_positions=pos[-1:][None], window=0,
    )
    return obs, TriAttention(stats=stats_path, match="shape", **kw)


def test_selection_pins_the_prompt_normalises_and_takes_the_group_max(tmp_path):
    path = tmp_path / "s.safetensors"
    qs.save(_random_stats(1, 4, 8), path)
    T, prompt, budget = 24, 9, 15
    obs, policy = _decode_obs(T, prompt, str(path))
    stats = qs.load(path)
    inv_freq, scaling = qs.layer_rope(obs.module)
    raw = trig_scores(obs.keys, obs.positions, torch.tensor([T]), stats.q_mean[0][None], stats.q_abs_mean[0][None],
                      inv_freq, scaling, geometric_offsets(65536))[0]
    kept = policy.select(obs, budget)[0]
    for kv in range(2):
        z = []
        for h in (2 * kv, 2 * kv + 1):
            c = raw[h, prompt:].double().tolist()
            mean = sum(c) / len(c)
            std = max(math.sqrt(sum((x - mean) ** 2 for x in c) / len(c)), 1e-6)
            z.append([(x - mean) / std for x in c])
        best = [max(a, b) for a, b in zip(*z)]
        order = sorted(range(len(best)), key=lambda i: (-best[i], -i))[: budget - prompt]
        assert kept[kv].tolist() == list(range(prompt)) + sorted(prompt + i for i in order)


def test_a_prompt_that_fills_the_budget_keeps_its_first_entries():
    obs, _ = _decode_obs(20, 12)
    obs.scratch.update(triattention_calib_z=torch.ones(1, 4, 4, dtype=torch.complex128),
                       triattention_calib_abs=torch.ones(1, 4, 4) * 2, triattention_calib_n=1)
    assert TriAttention().select(obs, 8)[0].tolist() == [list(range(8))] * 2
    assert TriAttention(window=1).select(obs, 8)[0].tolist() == [[*range(7), 19]] * 2
    # unpinned, every entry competes
    assert TriAttention(pin_prompt=False).select(obs, 8)[0].tolist() != [list(range(8))] * 2


def test_noise_is_deterministic_and_tiny(tmp_path):
    path = tmp_path / "s.safetensors"
    qs.save(_random_stats(1, 4, 8), path)
    obs, quiet = _decode_obs(30, 5, str(path))
    _, noisy = _decode_obs(30, 5, str(path), seed=3)
    noisy = TriAttention(stats=str(path), match="shape", seed=0)
    a, b = quiet.score(obs), noisy.score(obs)
    assert torch.equal(b, noisy.score(obs)) and not torch.equal(a, b)
    assert float((a - b).abs().max()) <= 1e-6


# --- the statistics file ----------------------------------------------------------------------
def test_stats_file_round_trip_and_refusals(tmp_path):
    stats = _random_stats(2, 4, 16, seed=4)
    path = tmp_path / "s.safetensors"
    qs.save(stats, path)
    back = qs.load(path)
    assert torch.equal(back.q_mean, stats.q_mean) and torch.equal(back.q_abs_mean, stats.q_abs_mean)
    assert back.shape == (2, 4, 16) and back.meta["model"] == "random"
    with pytest.raises(ValueError, match="no such file.*triattention-stats"):
        TriAttention(stats=str(tmp_path / "missing.safetensors"))
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a TriAttention statistics file"):
        qs.load(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_text("junk")
    with pytest.raises(ValueError, match="not a safetensors file"):
        qs.load(tmp_path / "junk.safetensors")


def _stats_of(model, n: int = 40) -> qs.QueryStats:
    return qs.compute_stats(model, [prompt_ids(n, 5)[0].tolist()], model_name="tiny")


def test_a_file_from_another_model_is_refused(tmp_path):
    model = tiny_model("llama", layers=2, heads=4, kv_heads=2, head_dim=16)
    path = tmp_path / "s.safetensors"
    qs.save(_stats_of(model), path)
    ids = prompt_ids(20, 1)
    cases = [
        (tiny_model("llama", layers=3, heads=4, kv_heads=2, head_dim=16), "3 layers", {}),
        (tiny_model("llama", layers=2, heads=4, kv_heads=2, head_dim=16, seed=7), "q_proj weights differ", {}),
    ]
    other_theta = tiny_model("llama", layers=2, heads=4, kv_heads=2, head_dim=16)
    other_theta.config.rope_parameters = {**other_theta.config.rope_parameters, "rope_theta": 500.0}
    cases.append((other_theta, "RoPE frequencies", {}))
    for other, message, params in cases:
        with pytest.raises(ValueError, match=message), evictkit.compress(other, "triattention", budget=22,
                                                                           stats=str(path), **params):
            other.generate(ids, max_new_tokens=4, do_sample=False)
    # match="shape" accepts another checkpoint of the same shape (a fine-tune)
    seeded = cases[1][0]
    with evictkit.compress(seeded, "triattention", budget=22, stats=str(path), match="shape") as run:
        seeded.generate(ids, max_new_tokens=4, do_sample=False)
    assert run.stats.layers[0].size == 22


def test_stats_are_the_mean_of_the_pre_rope_queries():
    model = tiny_model("llama", layers=2, heads=4, kv_heads=2, head_dim=16)
    ids = prompt_ids(30, 2)
    stats = qs.compute_stats(model, [ids[0].tolist()], skip_first=3)
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    for li, layer in enumerate(model.model.layers):
        x = layer.input_layernorm(hidden[li])[:, 3:]
        q = layer.self_attn.q_proj(x).view(1, 27, 4, 16)[0].double()  # [N, H, D]
        z = torch.complex(q[..., :8], q[..., 8:])
        torch.testing.assert_close(stats.q_mean[li], z.mean(0).to(torch.complex64), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stats.q_abs_mean[li], z.abs().mean(0).float(), rtol=1e-5, atol=1e-6)
    assert stats.meta["tokens"] == 27 and stats.meta["skip_first"] == 3


# --- the command, end to end ----------------------------------------------------------------
def _model_dir(tmp_path):
    """A tiny random Llama saved with a word-level tokenizer: what `--model DIR` loads."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, 128)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    model = tiny_model("llama", layers=2, heads=4, kv_heads=2, head_dim=16)
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)
    return folder


def test_the_command_writes_a_file_the_policy_runs_with(tmp_path, capsys):
    folder = _model_dir(tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    g = _gen(0)
    lines = [" ".join(f"w{int(i)}" for i in torch.randint(1, 128, (n,), generator=g)) for n in (25, 40)]
    prompts.write_text("\n".join(json.dumps({"question": t}) for t in lines) + "\n")
    out = tmp_path / "stats.safetensors"
    argv = ["triattention-stats", "--model", str(folder), "--prompts", str(prompts), "--field", "question",
            "--out", str(out), "--generate", "6"]
    assert main(argv) == 0
    assert "2 layers x 4 query heads x 8 frequencies from 77 tokens of 2 prompts" in capsys.readouterr().out
    stats = qs.load(out)
    assert stats.meta["tokens"] == 25 + 40 + 2 * 6 and stats.meta["generate"] == 6
    assert stats.meta["identity"]["num_hidden_layers"] == 2 and stats.meta["model"] == str(folder)
    model, _ = evictkit.load_model(str(folder))
    with evictkit.compress(model, "triattention", budget=30, stats=str(out)) as run:
        model.generate(prompt_ids(20, 3), max_new_tokens=25, do_sample=False)
    kept = run.kept_positions()
    for li in (0, 1):
        assert kept[li].shape[-1] == 30
        assert kept[li][0, :, :20].tolist() == [list(range(20))] * 2  # the prompt is pinned
    # a bad prompts file fails with a message naming the option
    (tmp_path / "bad.jsonl").write_text('{"prompt": 3}\n')
    assert main(["triattention-stats", "--model", str(folder), "--prompts", str(tmp_path / "bad.jsonl"),
                 "--out", str(out)]) == 2
    assert "--prompts" in capsys.readouterr().err


def test_decode_only_under_compress_and_the_papers_slack():
    model = tiny_model("llama", layers=2, heads=4, kv_heads=2, head_dim=16)
    with evictkit.compress(model, "triattention", budget=24, slack=7) as run:
        model.generate(prompt_ids(30, 1), max_new_tokens=20, do_sample=False)
    # the prompt (30 > budget) is not compressed at prefill; at decode it keeps its first 24
    assert [s.after_prefill for s in run.stats.layers] == [30, 30]
    assert all(s.size <= 24 + 7 for s in run.stats.layers)


# --- the conformance kit with a statistics file ------------------------------------------------
class _FileStats(TriAttention):
    """TriAttention reading random statistics of whatever shape the kit draws (the kit's models
    and layers vary; a file fits one shape): the scoring and selection laws with file statistics."""

    def _layer_stats(self, obs):
        B = obs.keys.shape[0]
        st = _random_stats(obs.n_layers, obs.n_heads, obs.head_dim, seed=obs.n_heads * 100 + obs.head_dim)
        inv_freq, scaling = qs.layer_rope(obs.module)
        L = obs.layer_idx
        return st.q_mean[L].expand(B, -1, -1), st.q_abs_mean[L].expand(B, -1, -1), inv_freq, scaling


TestLaws_triattention_file = conformance_tests(_FileStats, params=[{}, {"window": 2, "sinks": 1, "seed": 0},
                                                                   {"aggregation": "max", "normalize": False,
                                                                    "pin_prompt": False, "offsets": 16}])


def test_with_a_file_it_reads_keys_and_positions_only(tmp_path):
    from evictkit.contract import declared

    path = tmp_path / "s.safetensors"
    qs.save(_random_stats(1, 4, 8), path)
    assert declared(TriAttention(stats=str(path))).tags() == ("kv_only",)
    assert declared(TriAttention()).tags() == ("queries",)  # it re-projects the prompt's queries
    assert declared(TriAttention(window=1)).may_evict_newest is False and declared(TriAttention()).may_evict_newest
