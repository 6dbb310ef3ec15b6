"""Megatron-style tensor parallelism, applied from outside a TP-unaware `Transformer`.

Each rank holds a slice of every large weight:

- q/k/v and gate/up are column-parallel (output rows split): each rank computes its own
  attention heads and its own slice of the feed-forward width, with no communication;
- o_proj and down_proj are row-parallel (input columns split): each rank's partial output
  is summed with ONE all-reduce per layer, and a bias (if any) is added once, after it;
- the embedding is vocab-parallel: each rank looks up only ids in its vocab slice, zeroes
  the rest, and an all-reduce assembles the rows (exact: one non-zero term per element);
- lm_head is vocab-parallel: each rank computes its logits slice, an all-gather joins them.

When tp > num_key_value_heads, KV heads are replicated: each rank gets the one kv head its
q heads attend with. Requirements (ValueError otherwise): num_attention_heads % tp == 0,
intermediate_size % tp == 0, vocab_size % tp == 0 (no vocab padding: checkpoints whose
vocab is not a multiple of tp are refused rather than silently padded), and either
num_key_value_heads % tp == 0 or tp % num_key_value_heads == 0.

`SPLIT_RULES` is the one table mapping checkpoint names to how they are split; in-memory
sharding (`shard_state_dict`), per-rank files and their merge (`workers.reshard`) all read it.
"""

from __future__ import annotations

import os
import re
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from workers.config import TP_TIMEOUT_S
from workers.model import ModelConfig, Transformer

# name pattern -> (kind, dim). "column"/"row"/"vocab" split `dim` evenly across ranks;
# "kv_column" splits k/v by kv heads along dim 0 (replicated when tp > n_kv_heads);
# "replicate" keeps the whole tensor on every rank. First full match wins.
SPLIT_RULES: dict[str, tuple[str, int | None]] = {
    r"model\.embed_tokens\.weight": ("vocab", 0),
    r"lm_head\.weight": ("vocab", 0),
    r"model\.layers\.\d+\.self_attn\.q_proj\.(weight|bias)": ("column", 0),
    r"model\.layers\.\d+\.self_attn\.[kv]_proj\.(weight|bias)": ("kv_column", 0),
    r"model\.layers\.\d+\.self_attn\.o_proj\.weight": ("row", 1),
    r"model\.layers\.\d+\.mlp\.(gate|up)_proj\.(weight|bias)": ("column", 0),
    r"model\.layers\.\d+\.mlp\.down_proj\.weight": ("row", 1),
    r"model\.layers\.\d+\.(self_attn\.o_proj|mlp\.down_proj)\.bias": ("replicate", None),
    r"model\.(norm|layers\.\d+\.\w+_layernorm)\.weight": ("replicate", None),
}
_COMPILED = [(re.compile(p), rule) for p, rule in SPLIT_RULES.items()]


def split_rule(name: str) -> tuple[str, int | None]:
    """The (kind, dim) of checkpoint tensor `name`; KeyError for a name the table lacks."""
    for pattern, rule in _COMPILED:
        if pattern.fullmatch(name):
            return rule
    raise KeyError(f"no tensor-parallel split rule for {name!r}")


def check_tp(config: ModelConfig, world: int) -> None:
    """ValueError naming the first dimension that `world` ranks cannot split evenly."""
    if world < 1:
        raise ValueError(f"tensor parallel degree must be >= 1, got {world}")
    for what in ("num_attention_heads", "intermediate_size", "vocab_size"):
        if getattr(config, what) % world:
            raise ValueError(f"tensor parallel degree {world} does not divide "
                             f"{what} ({getattr(config, what)})")
    kv = config.num_key_value_heads
    if kv % world and world % kv:
        raise ValueError(f"tensor parallel degree {world} and num_key_value_heads ({kv}): "
                         "one must divide the other")


def kv_heads(config: ModelConfig, rank: int, world: int) -> range:
    """The kv heads rank `rank` holds: those its q heads attend with (one, if replicated)."""
    n_q, n_kv = config.num_attention_heads, config.num_key_value_heads
    group = n_q // n_kv                    # q heads per kv head
    q = n_q // world
    return range(rank * q // group, ((rank + 1) * q - 1) // group + 1)


def shard_range(name: str, full_shape: tuple[int, ...], config: ModelConfig, rank: int,
                world: int) -> tuple[int, int, int] | None:
    """(dim, start, stop) of rank's slice of tensor `name`, or None if it is replicated."""
    kind, dim = split_rule(name)
    if kind == "replicate" or world == 1:
        return None
    assert dim is not None
    if kind == "kv_column":
        heads = kv_heads(config, rank, world)
        return dim, heads.start * config.head_dim, heads.stop * config.head_dim
    size = full_shape[dim] // world
    return dim, rank * size, (rank + 1) * size


def shard_index(name: str, full_shape: tuple[int, ...], config: ModelConfig, rank: int,
                world: int) -> tuple[slice, ...]:
    """An index tuple selecting rank's slice (works on tensors and safetensors slices)."""
    rng = shard_range(name, full_shape, config, rank, world)
    index = [slice(None)] * len(full_shape)
    if rng is not None:
        dim, start, stop = rng
        index[dim] = slice(start, stop)
    return tuple(index)


def shard_state_dict(full: dict[str, Tensor], config: ModelConfig, rank: int,
                     world: int) -> dict[str, Tensor]:
    """Rank's slice of every tensor of a full (HF-named) state dict, contiguous copies."""
    check_tp(config, world)
    return {name: t[shard_index(name, tuple(t.shape), config, rank, world)].contiguous()
            for name, t in full.items()}


# ---- parallel layers -------------------------------------------------------------------

class ColumnParallelLinear(nn.Linear):
    """A Linear holding a slice of the output features; no communication."""


class RowParallelLinear(nn.Linear):
    """A Linear holding a slice of the input features; all-reduces its output, then bias."""

    def forward(self, x: Tensor) -> Tensor:
        return self.after_matmul(F.linear(x, self.weight))

    def after_matmul(self, y: Tensor) -> Tensor:
        """What follows the local matmul (also after a packed one, `model.pack_linear`)."""
        dist.all_reduce(y)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Embedding):
    """Rows [start, start + num_embeddings) of the vocabulary; all-reduce joins the ranks."""

    def __init__(self, num_embeddings: int, embedding_dim: int, start: int) -> None:
        super().__init__(num_embeddings, embedding_dim)
        self.start = start

    def forward(self, ids: Tensor) -> Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.num_embeddings)
        y = F.embedding(local.masked_fill(outside, 0), self.weight)
        y = y.masked_fill(outside[..., None], 0)
        dist.all_reduce(y)
        return y


class ParallelLMHead(nn.Linear):
    """A Linear over one vocab slice; all-gathers the logits slices in rank order."""

    def forward(self, x: Tensor) -> Tensor:
        return self.after_matmul(F.linear(x, self.weight))

    def after_matmul(self, y: Tensor) -> Tensor:
        """What follows the local matmul (also after a packed one, `model.pack_linear`)."""
        y = y.contiguous()
        parts = [torch.empty_like(y) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, y)
        return torch.cat(parts, dim=-1)


def parallelize(model: Transformer, rank: int, world: int) -> Transformer:
    """Swap `model`'s Linear/Embedding layers for parallel ones with local shapes (meta).

    Which parallel layer replaces each one, and its local shape, come from `SPLIT_RULES`
    (the same table that slices the weights). The weights are left to load
    (`load_local`); attention modules get their local head counts. No-op at world 1.
    """
    config = model.config
    check_tp(config, world)
    if world == 1:
        return model
    with torch.device("meta"):
        for name, module in list(model.named_modules()):
            if isinstance(module, (nn.Linear, nn.Embedding)):
                model.set_submodule(name, _parallel(name, module, config, rank, world))
    for layer in model.model.layers:
        layer.self_attn.n_heads = config.num_attention_heads // world
        layer.self_attn.n_kv_heads = len(kv_heads(config, rank, world))
    return model


def _parallel(name: str, module: nn.Module, config: ModelConfig, rank: int,
              world: int) -> nn.Module:
    kind, _ = split_rule(f"{name}.weight")
    full = tuple(module.weight.shape)
    local = torch.empty(full, device="meta")[shard_index(f"{name}.weight", full, config,
                                                         rank, world)].shape
    if isinstance(module, nn.Embedding):
        assert kind == "vocab", name
        return VocabParallelEmbedding(local[0], local[1], start=rank * local[0])
    bias = module.bias is not None
    if kind in ("column", "kv_column"):
        return ColumnParallelLinear(local[1], local[0], bias=bias)
    if kind == "row":
        return RowParallelLinear(local[1], local[0], bias=bias)
    if kind == "vocab":
        return ParallelLMHead(local[1], local[0], bias=False)
    raise ValueError(f"{name}: split rule {kind!r} does not apply to a {type(module).__name__}")


def load_local(model: Transformer, local: dict[str, Tensor]) -> Transformer:
    """Load a rank's slices into a `parallelize`d model; eval mode, no gradients."""
    if model.config.tie_word_embeddings:
        local = {**local, "lm_head.weight": local["model.embed_tokens.weight"]}
    model.load_state_dict(local, strict=True, assign=True)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    return model.eval().requires_grad_(False)


def apply_tp(model: Transformer, rank: int, world: int) -> Transformer:
    """Shard an already-loaded full model in place to rank's slices (no-op at world 1)."""
    check_tp(model.config, world)
    if world == 1:
        return model
    full = model.state_dict()
    if model.config.tie_word_embeddings:
        full.pop("lm_head.weight")
    local = shard_state_dict(full, model.config, rank, world)
    device = next(iter(full.values())).device
    del full
    parallelize(model, rank, world)
    return load_local(model, {k: v.to(device) for k, v in local.items()})


# ---- process group ---------------------------------------------------------------------

DEFAULT_TIMEOUT_S = TP_TIMEOUT_S  # defined with the worker's settings, torch-free
DEFAULT_STARTUP_TIMEOUT_S = 1800.0


def env_rank() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) from torchrun-style env; (0, 1) when unset."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                     startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S) -> tuple[int, int]:
    """Join the process group described by torchrun-style env; return (rank, world).

    Reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT. gloo on CPU, nccl when
    CUDA is available (and the device is set to LOCAL_RANK). No-op at world size 1.

    Two bounds: the rendezvous and a first barrier wait up to `startup_timeout_s` for the
    slowest rank to arrive; after that every collective is bounded by `timeout_s`, so a
    rank that dies or stalls makes the others raise instead of hanging (a dead peer
    usually surfaces at once, as a closed connection). Load the model first (`load_rank`
    needs no process group, see `env_rank`), then call this: loading times then fall under
    the startup bound, not the collective one.
    """
    rank, world = env_rank()
    if world <= 1:
        return 0, 1
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, rank=rank, world_size=world,
                            timeout=timedelta(seconds=max(startup_timeout_s, timeout_s)))
    dist.barrier()  # everyone has arrived: from here on, the short bound applies
    dist.set_timeout(timedelta(seconds=timeout_s))
    return rank, world
