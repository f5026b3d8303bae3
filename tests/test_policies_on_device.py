"""Every registered policy evicts on every device the `device` fixture gives (CUDA with `-m gpu`):
one prefill and two decode steps on a tiny random llama, the kept entries checked for shape,
range and device, and the kept set compared with the same run on CPU."""

import pytest
import torch
from models import tiny_model

import evictkit
from evictkit.hf import cache_kwarg, cache_of

PROMPT, BUDGET, LAYERS = 96, 48, 4
#: parameters a policy needs on a 4-layer model (the ladder's default span is 16 layers)
PARAMS = {"lacache": {"span": 2}}
#: policies whose choice is a draw, not a score: the same seed draws differently on CUDA
RANDOM = {"random"}


def run(name: str, device: str) -> tuple[dict[int, torch.Tensor], list[int], torch.Tensor]:
    """Prefill PROMPT tokens under `name` at BUDGET on `device`, then decode two tokens.

    returns ({layer: kept positions [1, H_kv, K] after prefill, on CPU}, the per-layer budgets the
    layers got (a schedule's, or a cross-layer policy's allocation), the last step's logits [1, 1, vocab])."""
    model = tiny_model("llama", layers=LAYERS, device=device)
    ids = torch.randint(3, 128, (1, PROMPT), generator=torch.Generator().manual_seed(0)).to(device)
    comp = evictkit.compress(model, name, budget=BUDGET, **PARAMS.get(name, {}))
    with comp, torch.inference_mode():
        out = model(ids, use_cache=True)
        kept = {li: pos.clone() for li, pos in comp.kept_positions().items()}
        for li, pos in kept.items():
            assert pos.device.type == device, f"layer {li}: positions on {pos.device}"
        cache, kw = cache_of(out), cache_kwarg(model)
        tok = out.logits[:, -1:].argmax(-1)
        for _ in range(2):
            out = model(tok, use_cache=True, **{kw: cache})
            tok = out.logits[:, -1:].argmax(-1)
    budgets = {s.layer: s.budget for s in comp.stats.layers}
    return {li: p.cpu() for li, p in kept.items()}, [budgets[li] for li in range(LAYERS)], out.logits.cpu()


def policy_names() -> list[str]:
    return sorted(evictkit.policies())


_on_cpu: dict[str, tuple] = {}


def on_cpu(name: str) -> tuple:
    if name not in _on_cpu:
        _on_cpu[name] = run(name, "cpu")
    return _on_cpu[name]


@pytest.mark.parametrize("name", policy_names())
def test_policy_evicts_on_the_device(name, device):
    kept, budgets, logits = run(name, device)
    assert torch.isfinite(logits).all()
    if name == "full":
        return  # hooks on, nothing evicted: no kept set to check
    if "prefill" not in evictkit.policies()[name].phases:
        pytest.skip(f"{name} evicts while decoding only; the prompt here is kept whole")
    assert sorted(kept) == list(range(LAYERS)), "every layer evicts at this budget"
    assert sum(budgets) <= LAYERS * BUDGET + LAYERS  # a schedule or an allocation redistributes the total
    for li, pos in kept.items():
        assert pos.shape[:2] == (1, 2) and budgets[li] < PROMPT  # per-layer budgets (PyramidKV: a pyramid)
        real = pos[pos >= 0]  # -1 pads the rows of a ragged (per-head) selection
        assert real.numel() <= 2 * budgets[li], f"layer {li}: {real.numel()} entries kept over 2 heads"
        if real.numel() == pos.numel():
            assert pos.shape[-1] <= budgets[li]
        assert real.numel() and int(real.max()) < PROMPT
        for row in pos.flatten(0, 1):
            row = row[row >= 0]
            assert row.unique().numel() == row.numel(), f"layer {li}: a position kept twice"
    if name in RANDOM:
        return
    # the same model and prompt on CPU keep the same entries (fp32; a rare near-tie may flip)
    ref, _, _ = on_cpu(name)
    for li, pos in kept.items():
        same = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(pos.flatten(0, 1), ref[li].flatten(0, 1)))
        assert same >= 0.95 * (ref[li] >= 0).sum(), f"layer {li}: {device} keeps other entries than CPU"
