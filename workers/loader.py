"""Load a Hugging Face layout checkpoint directory into a `Transformer`.

The directory's files are named in `workers.checkpoint_files`; an optional
`generation_config.json`'s `eos_token_id` wins over config.json's, as in HF `generate`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from workers.checkpoint_files import CONFIG_FILE, read_json, weight_files
from workers.model import ModelConfig, Transformer


def load_model(path: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | str | None = None) -> tuple[Transformer, ModelConfig]:
    """Build the model from `path` on `device`, in eval mode with gradients off.

    dtype: explicit (a torch dtype or a name like "bfloat16") wins; otherwise the config's
    `torch_dtype`/`dtype` on accelerators and float32 on CPU (CPU half precision is slow;
    ask for bfloat16 explicitly to get it).
    """
    path, device = Path(path), torch.device(device)
    config = read_config(path)
    dtype = resolve_dtype(dtype, config, device)
    weights = weight_files(path)
    with torch.device("meta"):  # shapes only: the real tensors come from the files
        model = Transformer(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    state = read_weights(weights, expected, device, dtype)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()  # assign=True gave each name its own Parameter: share one again
    model.eval().requires_grad_(False)
    return model, config


def read_config(path: Path) -> ModelConfig:
    """config.json, with generation_config.json's eos id when that file gives one."""
    file = path / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing (not a Hugging Face model directory?)")
    config = ModelConfig.from_dict(read_json(file))
    gen_file = path / "generation_config.json"
    if gen_file.is_file() and (eos := read_json(gen_file).get("eos_token_id")) is not None:
        config.eos_token_id = eos
    return config


def resolve_dtype(dtype: torch.dtype | str | None, config: ModelConfig,
                  device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        dtype = "float32" if device.type == "cpu" else (config.torch_dtype or "float32")
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
            raise ValueError(f"dtype {dtype!r} is not a torch floating point dtype")
        dtype = resolved
    return dtype


def read_weights(files: dict[str, Path], expected: dict[str, torch.Size],
                 device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Read every tensor, checking names and shapes against `expected`, naming the file."""
    state: dict[str, torch.Tensor] = {}
    for file in dict.fromkeys(files.values()):  # each file once, in order
        with safe_open(file, framework="pt", device="cpu") as f:  # mmap; copied once below
            for name in f.keys():
                if _ignored(name, expected):
                    continue
                if name not in expected:
                    raise ValueError(f"{file}: unexpected tensor {name!r} "
                                     "(not a Llama-architecture weight)")
                shape = torch.Size(f.get_slice(name).get_shape())
                if shape != expected[name]:
                    raise ValueError(f"{file}: tensor {name!r} has shape {tuple(shape)}, "
                                     f"the config implies {tuple(expected[name])}")
                state[name] = f.get_tensor(name).to(device=device, dtype=dtype)
    if missing := sorted(expected.keys() - state.keys()):
        where = ", ".join(sorted({str(f) for f in files.values()}))
        raise ValueError(f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''} "
                         f"(read {where})")
    return state


def _ignored(name: str, expected: dict[str, torch.Size]) -> bool:
    # Old exports carry RoPE buffers; tied checkpoints may still ship lm_head.weight.
    return name.endswith("rotary_emb.inv_freq") or (
        name == "lm_head.weight" and name not in expected)
