"""A Llama-architecture decoder-only transformer, in the spirit of gpt-fast.

Module and parameter names mirror Hugging Face's `LlamaForCausalLM`, so its safetensors
state dict loads with `load_state_dict(strict=True)`. Attention modules keep their *local*
head counts (`n_heads`, `n_kv_heads`) and reshapes never hard-code hidden sizes, so a
tensor-parallel wrapper can shard q/k/v/gate/up by output columns and o/down by input
columns from outside, then all-reduce after `o_proj` and `down_proj`.

Two ways to run it: `forward` on (batch, time) tensors with a dense per-row `KVCache`
(scoring, tests, the tensor-parallel checks), and `forward_paged` on one packed step of a
continuous batch: every scheduled token of every row in one flat sequence (no padding in
the matmuls), keys and values written to slots of block pools and read back per row
through its block table (see `workers/kv_cache.py`).

Why one long module: the dense and the paged forward are the same layers; kept side by
side so a change to one is seen against the other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class ModelConfig:
    """The subset of a Hugging Face `LlamaConfig` that the model needs."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None   # None: same as num_attention_heads (no GQA)
    head_dim: int | None = None              # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    torch_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) is not a "
                             f"multiple of num_key_value_heads ({self.num_key_value_heads})")
        rope_type = (self.rope_scaling or {}).get("rope_type",
                                                  (self.rope_scaling or {}).get("type"))
        if rope_type not in (None, "default"):
            raise ValueError(f"rope_scaling type {rope_type!r} is not supported "
                             "(only plain RoPE)")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")

    @classmethod
    def from_dict(cls, config_json: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face `config.json` dict; unknown keys are ignored."""
        d = dict(config_json)
        d.setdefault("torch_dtype", d.get("dtype"))
        # transformers 5 nests RoPE settings in `rope_parameters`.
        if isinstance(rope := d.get("rope_parameters"), dict):
            d.setdefault("rope_theta", rope.get("rope_theta", cls.rope_theta))
            d["rope_scaling"] = d.get("rope_scaling") or rope
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known and v is not None})

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """All end-of-sequence ids (Llama 3 style configs list several)."""
        eos = self.eos_token_id
        return () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)


class KVCache:
    """One layer's preallocated keys and values, shape (batch, n_kv_heads, max_len, head_dim)."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, cache_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, H, T, D) into slots `cache_pos` (T,); return the whole cache."""
        self.k[:, :, cache_pos] = k
        self.v[:, :, cache_pos] = v
        return self.k, self.v


@dataclass
class AttnGroup:
    """Rows of a packed step that attend together (index tensors built once per step,
    shared by every layer). Queries come from the packed tokens, keys/values from the pool.

    Two kinds: decode groups (one query per row, `bias` set) attend with batched matmuls,
    the q heads that share a kv head folded into the query axis; prefill groups (`mask`
    set) go through SDPA.
    """

    q_idx: Tensor          # [R, Q] packed index of each row's queries (padding repeats one)
    kv_idx: Tensor         # [R * kv_heads * B] rows of the pool viewed as (blocks * kv_heads,
                           # block_size * D): each row's blocks, head by head; the context is
                           # L = B * block_size slots
    mask: Tensor | None    # [R, 1, Q * group, L] bool, True = attend (prefill groups)
    bias: Tensor | None    # [R * kv_heads, group, L] additive 0 / -inf (decode groups, Q = 1)
    out_idx: Tensor        # [M] packed index of each real query, in `keep` order
    keep: Tensor | None    # [R * Q] which flattened queries are real; None = all
    gathered: tuple[Tensor, Tensor] | None = None  # K/V gather buffers, reused by each layer
    identity: bool = False  # q_idx and out_idx are 0..N-1, keep is None: no select, no scatter
    # Decode rows that attend over the decode slab (`workers/decode_slab.py`) instead of a
    # gather: [R * kv_heads] row of the slab viewed as (-1, D) that each row's new key/value
    # of each kv head goes to (kv_idx is then empty; bias spans the slab's cap).
    slab_idx: Tensor | None = None
    # Slab rows attend span by span where set (`DecodeSlab.spans`): (first row, end row,
    # positions read, that span's bias [rows * kv_heads, group, positions]); bias is unused.
    slab_spans: list[tuple[int, int, int, Tensor]] | None = None


@dataclass
class PagedStep:
    """Where one packed step's tokens write their keys/values and how rows attend."""

    write_idx: Tensor          # [N * kv_heads] row of the pool viewed as (-1, D) that each
                               # token's key/value of each kv head goes to
    groups: list[AttnGroup]


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale (no bias, no mean subtraction)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32 and scale after casting back, exactly as HF does; torch's
        # fused kernel gives the same bits in float32 (one op instead of five).
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)


def rope_cos_sin(position_ids: Tensor, head_dim: int, theta: float,
                 dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (B, T, head_dim) for the HF (rotate_half) RoPE convention."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float,
                                             device=position_ids.device) / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq  # float32 always, like HF
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, H, T, D) with cos/sin (B, T, D), or packed x: (N, H, D) with cos/sin (N, D)."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin


Packed = tuple[Tensor, Tensor | None]  # a linear's weight in oneDNN's layout, and its bias


def pack_linear(modules: Sequence[nn.Linear]) -> Packed | None:
    """One linear over the concatenated output rows of `modules` (fusing q/k/v or gate/up
    into one matmul), its weight reordered once into oneDNN's blocked layout for CPU
    matmuls; None where oneDNN cannot (not CPU, not fp32/bf16, no mkldnn build).

    A module whose forward is more than the matmul (a tensor-parallel layer that reduces or
    gathers after it) may be packed alone if it says what follows the matmul with an
    `after_matmul(y)` method (which then adds its own bias); fused modules must be plain.
    """
    w = modules[0].weight
    if (w.device.type != "cpu" or w.dtype not in (torch.float32, torch.bfloat16)
            or not torch.backends.mkldnn.is_available()):
        return None
    plain = all(type(m).forward is nn.Linear.forward for m in modules)
    if not plain and (len(modules) > 1 or not hasattr(modules[0], "after_matmul")):
        return None
    w = torch.cat([m.weight for m in modules]) if len(modules) > 1 else w
    bias = None
    if plain and any(m.bias is not None for m in modules):
        bias = torch.cat([m.bias if m.bias is not None else w.new_zeros(m.out_features)
                          for m in modules])
    try:
        return torch.ops.mkldnn._reorder_linear_weight(w.detach()), bias
    except (RuntimeError, AttributeError):
        return None


class _Threads:
    """While `Transformer.forward_paged` runs its small ops (norms, RoPE, SiLU, softmax,
    casts, KV writes) on fewer threads, `full` is torch's own count, which the matmuls and
    the KV gathers get back.

    Why: an elementwise op over a decode step's few rows is microseconds of work, and a
    2-thread OpenMP team stalls for a scheduler tick whenever another process holds a core
    (measured on a shared 2-core box: RMSNorm of 64 x 768 took 3 ms on 2 threads, 60 us on
    one); matmuls have the work to pay for the team.
    """

    full = 0     # 0: not inside `small_op_threads`
    small = 0


@contextmanager
def small_op_threads(n: int | None) -> Iterator[None]:
    """Run all but the matmuls of `Transformer.forward_paged` (and whatever else the block
    runs: step metadata) on `n` threads; None, or n >= torch's count: no change."""
    full = torch.get_num_threads()
    if not n or n >= full or _Threads.full:
        yield
        return
    _Threads.full, _Threads.small = full, n
    torch.set_num_threads(n)
    try:
        yield
    finally:
        _Threads.full = 0
        torch.set_num_threads(full)


def _on_all_threads(fn, *args, **kwargs):
    """fn(*args) with torch's full thread count (a matmul inside a small-op forward)."""
    if not _Threads.full:
        return fn(*args, **kwargs)
    torch.set_num_threads(_Threads.full)
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_num_threads(_Threads.small)


def packed_linear(x: Tensor, packed: Packed) -> Tensor:
    return _on_all_threads(torch.ops.mkldnn._linear_pointwise, x, packed[0], packed[1],
                           "none", [], "")


def _linear(x: Tensor, module: nn.Linear, packed: Packed | None) -> Tensor:
    if packed is None:
        return _on_all_threads(module, x)
    y = packed_linear(x, packed)
    after = getattr(module, "after_matmul", None)
    return y if after is None else after(y)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE and an optional KV cache."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.num_attention_heads       # local heads: a TP shard rewrites these
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, hidden, bias=bias)
        self.packed_qkv: Packed | None = None   # see `Transformer.prepack`
        self.packed_o: Packed | None = None

    def prepack(self) -> None:
        self.packed_qkv = pack_linear([self.q_proj, self.k_proj, self.v_proj])
        self.packed_o = pack_linear([self.o_proj])

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                cache: KVCache | None, cache_pos: Tensor | None) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(cache_pos, k, v)
            # The mask's width says how many slots are live: skip the unused tail.
            k, v = k[:, :, :mask.shape[-1]], v[:, :, :mask.shape[-1]]
        rep = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def forward_paged(self, x: Tensor, cos: Tensor, sin: Tensor, pool: tuple[Tensor, Tensor],
                      step: PagedStep, slab: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """x: (N, hidden) packed tokens; pool: K and V (blocks, kv_heads, block_size, D);
        slab: this layer's decode slab (rows, kv_heads, cap, D), for groups with `slab_idx`."""
        N, D, H, KV = x.shape[0], self.head_dim, self.n_heads, self.n_kv_heads
        if self.packed_qkv is not None:  # one matmul, one RoPE over the q and k heads
            qkv = packed_linear(x, self.packed_qkv).view(N, H + 2 * KV, D)
            qk = apply_rope(qkv[:, :H + KV], cos, sin)
            q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + KV:]
        else:
            q = apply_rope(_on_all_threads(self.q_proj, x).view(N, H, D), cos, sin)
            k = apply_rope(_on_all_threads(self.k_proj, x).view(N, KV, D), cos, sin)
            v = _on_all_threads(self.v_proj, x).view(N, KV, D)
        k_pool, v_pool = pool
        k_pool.view(-1, D).index_copy_(0, step.write_idx, k.reshape(N * KV, D))
        v_pool.view(-1, D).index_copy_(0, step.write_idx, v.reshape(N * KV, D))
        if len(step.groups) == 1 and step.groups[0].identity:  # a step of decodes only
            y = _attend_any(q, k, v, pool, slab, step.groups[0]).view(N, -1)
            return _linear(y, self.o_proj, self.packed_o)
        y = q.new_empty(N, H * D)
        for g in step.groups:  # one or two groups (decodes, prefill chunks), not rows
            y_g = _attend_any(q, k, v, pool, slab, g).flatten(0, 1)
            y.index_copy_(0, g.out_idx, y_g if g.keep is None else y_g[g.keep])
        return _linear(y, self.o_proj, self.packed_o)


def _attend_any(q: Tensor, k: Tensor, v: Tensor, pool: tuple[Tensor, Tensor],
                slab: tuple[Tensor, Tensor] | None, g: AttnGroup) -> Tensor:
    if g.slab_idx is None:
        return _attend(q, pool[0], pool[1], g)
    if slab is None:
        raise ValueError("a decode group on the slab needs the layer's slab")
    return _attend_slab(q, k, v, slab, g)


def _attend_slab(q: Tensor, k: Tensor, v: Tensor, slab: tuple[Tensor, Tensor],
                 g: AttnGroup) -> Tensor:
    """(R, 1, heads * D): decode rows (one query each) over their slab rows, after writing
    this step's key/value there; rows are the slab's first R, in slab order."""
    k_slab, v_slab = slab
    R = g.q_idx.shape[0]
    _, n_kv, _, D = k_slab.shape
    if not g.identity:
        idx = g.q_idx.view(-1)
        q, k, v = q.index_select(0, idx), k.index_select(0, idx), v.index_select(0, idx)
    k_slab.view(-1, D).index_copy_(0, g.slab_idx, k.reshape(R * n_kv, D))
    v_slab.view(-1, D).index_copy_(0, g.slab_idx, v.reshape(R * n_kv, D))
    q = q.reshape(R * n_kv, -1, D)
    if g.slab_spans is None:
        return _slab_span(q, k_slab[:R], v_slab[:R], g.bias).view(R, 1, -1)
    out = q.new_empty(q.shape)
    for a, b, c, bias in g.slab_spans:  # each reads its rows' first c positions only
        _slab_span(q[a * n_kv:b * n_kv], k_slab[a:b, :, :c], v_slab[a:b, :, :c], bias,
                   out=out[a * n_kv:b * n_kv])
    return out.view(R, 1, -1)


def _slab_span(q: Tensor, k: Tensor, v: Tensor, bias: Tensor,
               out: Tensor | None = None) -> Tensor:
    """q (rows * kv, group, D) over slab rows k, v (rows, kv, positions, D): (rows * kv,
    group, D). The (rows, kv) axes of a slab slice merge into one view, no copy."""
    n, kv, c, D = k.shape
    keys, values = k.view(n * kv, c, D), v.view(n * kv, c, D)
    s = _on_all_threads(torch.baddbmm, bias, q, keys.transpose(1, 2), alpha=D ** -0.5)
    p = torch.softmax(s, -1, dtype=torch.float32).to(q.dtype)
    return _on_all_threads(torch.bmm, p, values, out=out)


def _attend(q: Tensor, k_pool: Tensor, v_pool: Tensor, g: AttnGroup) -> Tensor:
    """(R, Q, heads * D): each row's queries over the keys/values of its blocks.

    Grouped-query attention without repeating K/V: the q heads that share a kv head are
    folded into the query axis, (R, kv_heads, Q * group, D) against (R, kv_heads, L, D).
    """
    R, Q = g.q_idx.shape
    n_blocks, n_kv, block_size, D = k_pool.shape
    # One index_select per pool on whole (block, kv head) runs, into buffers that every
    # layer of the step reuses, viewed as (R, kv, L, D): each row's keys, head-major.
    if g.gathered is None:
        g.gathered = (k_pool.new_empty(len(g.kv_idx), block_size * D),
                      v_pool.new_empty(len(g.kv_idx), block_size * D))
    k_buf, v_buf = g.gathered
    # Megabytes per layer: worth both threads on a quiet machine, like the matmuls.
    _on_all_threads(torch.index_select, k_pool.view(n_blocks * n_kv, -1), 0, g.kv_idx,
                    out=k_buf)
    _on_all_threads(torch.index_select, v_pool.view(n_blocks * n_kv, -1), 0, g.kv_idx,
                    out=v_buf)
    k, v = k_buf.view(R * n_kv, -1, D), v_buf.view(R * n_kv, -1, D)
    if not (g.identity and q.shape[0] == R * Q):  # identity: q is already in row order
        q = q.index_select(0, g.q_idx.view(-1))
    if g.bias is not None:  # one query per row: (R * kv, group, D) @ (R * kv, D, L)
        s = _on_all_threads(torch.baddbmm, g.bias, q.reshape(R * n_kv, -1, D),
                            k.transpose(1, 2), alpha=D ** -0.5)
        p = torch.softmax(s, -1, dtype=torch.float32).to(q.dtype)
        return _on_all_threads(torch.bmm, p, v).view(R, 1, -1)  # (R * kv, group, D)
    q = q.view(R, Q, n_kv, -1, D)
    group = q.shape[3]
    q = q.permute(0, 2, 1, 3, 4).reshape(R, n_kv, Q * group, D)
    y = _on_all_threads(F.scaled_dot_product_attention, q, k.view(R, n_kv, -1, D),
                        v.view(R, n_kv, -1, D), attn_mask=g.mask)
    return y.view(R, n_kv, Q, group, D).permute(0, 2, 1, 3, 4).reshape(R, Q, -1)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden, inter, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(hidden, inter, bias=bias)
        self.up_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)
        self.packed_gate_up: Packed | None = None   # see `Transformer.prepack`
        self.packed_down: Packed | None = None

    def prepack(self) -> None:
        self.packed_gate_up = pack_linear([self.gate_proj, self.up_proj])
        self.packed_down = pack_linear([self.down_proj])

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def forward_packed(self, x: Tensor) -> Tensor:
        """`forward` through the packed linears (gate and up in one matmul) where set."""
        if self.packed_gate_up is None:
            return self.forward(x)
        gate, up = packed_linear(x, self.packed_gate_up).chunk(2, dim=-1)
        return _linear(F.silu(gate) * up, self.down_proj, self.packed_down)


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                cache: KVCache | None, cache_pos: Tensor | None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_pos)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_paged(self, x: Tensor, cos: Tensor, sin: Tensor, pool: tuple[Tensor, Tensor],
                      step: PagedStep, slab: tuple[Tensor, Tensor] | None = None) -> Tensor:
        x = x + self.self_attn.forward_paged(self.input_layernorm(x), cos, sin, pool, step,
                                             slab)
        return x + self.mlp.forward_packed(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """HF's `LlamaModel`: embeddings, layers, final norm (the `model.` prefix)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Transformer(nn.Module):
    """HF's `LlamaForCausalLM`: `model` (the decoder) plus `lm_head`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.packed_lm_head: Packed | None = None
        if config.tie_word_embeddings:
            self.tie_weights()

    def prepack(self) -> bool:
        """Reorder every linear weight once into oneDNN's layout for `forward_paged` on CPU
        (q/k/v and gate/up each fused into one matmul): 1.1-2x faster matmuls than plain
        `F.linear` here. The packed copies sit beside the parameters (the state dict and
        `forward` are unchanged) and double the linear weights' memory; they are a snapshot,
        so call `prepack` again after changing weights. False (nothing packed) where
        oneDNN cannot serve this device and dtype."""
        self.packed_lm_head = pack_linear([self.lm_head])
        if self.packed_lm_head is None:
            return False
        for layer in self.model.layers:
            layer.self_attn.prepack()
            layer.mlp.prepack()
        return True

    def tie_weights(self) -> None:
        """Share the embedding matrix with `lm_head` (call again after `assign=True` loads)."""
        self.lm_head.weight = self.model.embed_tokens.weight

    def new_cache(self, batch: int, max_len: int) -> list[KVCache]:
        """A zeroed KV cache per layer, sized from each layer's local kv heads."""
        w = self.model.embed_tokens.weight
        return [KVCache(batch, layer.self_attn.n_kv_heads, max_len, layer.self_attn.head_dim,
                        w.dtype, w.device) for layer in self.model.layers]

    def forward(self, input_ids: Tensor, position_ids: Tensor,
                cache: list[KVCache] | None = None, attn_mask: Tensor | None = None,
                cache_pos: Tensor | None = None, logits_to_keep: int = 0) -> Tensor:
        """Logits (B, T', vocab) for input_ids (B, T).

        position_ids (B, T): RoPE positions, per row (left padding shifts them).
        cache: from `new_cache`; the new keys/values go to slots `cache_pos` (T,), shared
        by all rows. attn_mask: bool (B, 1, T, S), True = attend; with a cache its columns
        are cache slots 0..S-1 (S <= max_len, only those are read). Without a mask the
        attention is plain causal (cache: slots up to each query's own). logits_to_keep:
        only the last n positions get logits (0 = all), to spare the lm_head on prefill.
        """
        if cache is not None:
            if cache_pos is None:
                raise ValueError("cache_pos is required with a cache")
            if attn_mask is None:
                slots = torch.arange(cache[0].k.shape[2], device=input_ids.device)
                attn_mask = (slots <= cache_pos[:, None])[None, None]
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta,
                                x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, attn_mask, None if cache is None else cache[i], cache_pos)
        x = self.model.norm(x[:, -logits_to_keep:])
        return self.lm_head(x)

    def forward_paged(self, input_ids: Tensor, positions: Tensor,
                      pools: Sequence[tuple[Tensor, Tensor]], step: PagedStep,
                      logits_idx: Tensor,
                      slabs: Sequence[tuple[Tensor, Tensor]] | None = None) -> Tensor:
        """Logits (K, vocab) for packed tokens input_ids (N,) at RoPE positions (N,).

        pools: one (K, V) block pool pair per layer, written at `step.slots`; logits_idx
        (K,): the packed tokens that need next-token logits (the lm_head runs on those only).
        slabs: the decode slab's (K, V) per layer, for a step whose decode group reads it.
        Under `small_op_threads(n)`, only the matmuls use all of torch's threads.
        """
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta,
                                x.dtype)
        for i, (layer, pool) in enumerate(zip(self.model.layers, pools)):
            x = layer.forward_paged(x, cos, sin, pool, step, slabs[i] if slabs else None)
        if not len(logits_idx):  # a step of prefill chunks only (the same on every rank)
            return x.new_empty(0, self.config.vocab_size)
        return _linear(self.model.norm(x.index_select(0, logits_idx)), self.lm_head,
                       self.packed_lm_head)
