"""Pre-sharded tensor-parallel checkpoints: write, merge back, and load one rank's part.

Layout (format "ferry-tp-v1"):

    out/config.json, generation_config.json, tokenizer files   (copied from the source)
    out/sharding.json          {"tp": N, "format": "ferry-tp-v1", "files": [...]}
    out/rank-00-of-0N/model.safetensors   rank 0's slices, HF names, sliced shapes
    ...

How each tensor is split comes from `workers.tp.SPLIT_RULES`, the same table that shards
a model in memory, so a rank file holds exactly what `shard_state_dict` would give.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from workers.checkpoint_files import INDEX_FILE, SINGLE_FILE, weight_files
from workers.loader import read_config, read_weights, resolve_dtype
from workers.model import ModelConfig, Transformer
from workers.tp import check_tp, load_local, parallelize, shard_index

FORMAT = "ferry-tp-v1"
SHARDING_FILE = "sharding.json"
WEIGHTS = SINGLE_FILE  # each rank's file, and the merged one


def rank_file(rank: int, tp: int) -> str:
    return f"rank-{rank:02d}-of-{tp:02d}/{WEIGHTS}"


def full_shapes(config: ModelConfig) -> dict[str, torch.Size]:
    """Every checkpoint tensor's full shape (no lm_head when embeddings are tied)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(config).state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


def reshard(src: str | Path, tp: int, out: str | Path) -> Path:
    """Split the HF checkpoint `src` into `tp` per-rank files under `out`; returns `out`.

    The source is read lazily (safe_open slices), one rank at a time, so memory holds at
    most one rank's part. Tensor shapes are checked against config.json, naming the file.
    """
    src, out = Path(src), Path(out)
    config = read_config(src)
    check_tp(config, tp)
    shapes = full_shapes(config)
    files = _source_files(src, shapes)
    out.mkdir(parents=True, exist_ok=True)
    copy_side_files(src, out)
    for rank in range(tp):
        part = {}
        for name, file in files.items():
            with safe_open(file, framework="pt", device="cpu") as f:
                part[name] = f.get_slice(name)[shard_index(name, shapes[name], config,
                                                            rank, tp)].contiguous()
        target = out / rank_file(rank, tp)
        target.parent.mkdir(exist_ok=True)
        save_file(part, str(target), metadata={"format": "pt", "ferry_tp": str(tp),
                                               "ferry_rank": str(rank)})
        del part
    _write_json(out / SHARDING_FILE, {"tp": tp, "format": FORMAT,
                                      "files": [rank_file(r, tp) for r in range(tp)]})
    return out


def merge(src: str | Path, out: str | Path) -> Path:
    """Join the per-rank files of `src` back into one HF `model.safetensors` under `out`."""
    src, out = Path(src), Path(out)
    config = read_config(src)
    tp, files = read_sharding(src)
    shapes = full_shapes(config)
    full: dict[str, torch.Tensor] = {}
    for rank, file in enumerate(files):
        with safe_open(file, framework="pt", device="cpu") as f:
            for name, shape in shapes.items():
                if name not in f.keys():
                    raise ValueError(f"{file}: missing tensor {name!r}")
                part = f.get_tensor(name)
                if rank == 0:
                    full[name] = torch.empty(shape, dtype=part.dtype)
                index = shard_index(name, shape, config, rank, tp)
                if full[name][index].shape != part.shape:
                    raise ValueError(f"{file}: tensor {name!r} has shape {tuple(part.shape)}, "
                                     f"expected {tuple(full[name][index].shape)} for rank "
                                     f"{rank} of {tp}")
                full[name][index] = part
    out.mkdir(parents=True, exist_ok=True)
    copy_side_files(src, out)
    save_file(full, str(out / WEIGHTS), metadata={"format": "pt"})
    return out


def read_sharding(path: Path) -> tuple[int, list[Path]]:
    """(tp, rank files) from `path/sharding.json`, every file checked to exist."""
    file = path / SHARDING_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing (not a ferry tensor-parallel checkpoint)")
    meta = json.loads(file.read_text())
    if meta.get("format") != FORMAT or not isinstance(meta.get("tp"), int):
        raise ValueError(f"{file}: format {meta.get('format')!r}, expected {FORMAT!r} with tp")
    tp, names = meta["tp"], meta.get("files") or []
    if len(names) != tp:
        raise ValueError(f"{file}: lists {len(names)} files for tp={tp}")
    files = [path / n for n in names]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f}: rank file named in {file} is missing")
    return tp, files


def load_rank(path: str | Path, rank: int, world: int, device: str | torch.device = "cpu",
              dtype: torch.dtype | str | None = None) -> tuple[Transformer, ModelConfig]:
    """Rank's part of the model at `path`, built directly with local shapes.

    A pre-sharded checkpoint (sharding.json) reads only this rank's file, and its tp must
    equal `world`. A full HF checkpoint is read slice by slice (safe_open get_slice), so
    only this rank's part is copied into memory. Errors name the offending file.
    """
    path, device = Path(path), torch.device(device)
    config = read_config(path)
    check_tp(config, world)
    dtype = resolve_dtype(dtype, config, device)
    with torch.device("meta"):
        model = Transformer(config)
    parallelize(model, rank, world)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    if (path / SHARDING_FILE).is_file():
        local = _read_rank_file(path, rank, world, expected, device, dtype)
    elif any(path.glob("rank-*-of-*")) and not _has_full_weights(path):
        raise FileNotFoundError(f"{path / SHARDING_FILE}: missing next to the rank-* folders")
    else:
        local = _read_full_slices(path, config, rank, world, device, dtype)
    return load_local(model, local), config


def _read_rank_file(path: Path, rank: int, world: int, expected: dict[str, torch.Size],
                    device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    file = path / SHARDING_FILE
    meta = json.loads(file.read_text())
    if meta.get("tp") != world:
        raise ValueError(f"{file}: checkpoint is sharded for tp={meta.get('tp')}, but the "
                         f"world size is {world} (reshard it, or load the full checkpoint)")
    _, files = read_sharding(path)
    return read_weights({"": files[rank]}, expected, device, dtype)


def _read_full_slices(path: Path, config: ModelConfig, rank: int, world: int,
                      device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    shapes = full_shapes(config)
    local = {}
    for name, file in _source_files(path, shapes).items():
        with safe_open(file, framework="pt", device="cpu") as f:
            t = f.get_slice(name)[shard_index(name, shapes[name], config, rank, world)]
            # A slice of a column range is a strided view of the mmapped file: copy it.
            local[name] = t.to(device=device, dtype=dtype).contiguous()
    return local


def _source_files(src: Path, shapes: dict[str, torch.Size]) -> dict[str, Path]:
    """tensor name -> the file holding it, shapes checked against the config."""
    found: dict[str, Path] = {}
    for file in dict.fromkeys(weight_files(src).values()):
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                if name not in shapes:
                    if name.endswith("rotary_emb.inv_freq") or name == "lm_head.weight":
                        continue  # RoPE buffers; lm_head of a tied checkpoint
                    raise ValueError(f"{file}: unexpected tensor {name!r}")
                shape = tuple(f.get_slice(name).get_shape())
                if shape != tuple(shapes[name]):
                    raise ValueError(f"{file}: tensor {name!r} has shape {shape}, the config "
                                     f"implies {tuple(shapes[name])}")
                found[name] = file
    if missing := sorted(shapes.keys() - found.keys()):
        raise ValueError(f"{src}: missing tensors {missing[:8]}")
    return found


def _has_full_weights(path: Path) -> bool:
    return (path / WEIGHTS).is_file() or (path / INDEX_FILE).is_file()


def copy_side_files(src: Path, out: Path) -> None:
    """config, generation config and tokenizer files: everything but the weights."""
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in (
                INDEX_FILE, SHARDING_FILE):
            shutil.copy2(f, out / f.name)


def _write_json(file: Path, data: dict) -> None:
    file.write_text(json.dumps(data, indent=2) + "\n")
