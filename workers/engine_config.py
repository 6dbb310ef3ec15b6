"""The engine's scheduling budgets and KV cache size, apart from the engine so that the
worker's settings (and `ferry worker --help`) take their defaults from here without
importing torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    """Scheduling budgets and the KV cache's size."""

    max_num_seqs: int = 64               # rows running at once
    max_num_batched_tokens: int = 512    # tokens per step (decodes + prefill chunks)
    block_size: int = 16                 # token slots per KV block
    num_blocks: int | None = None        # None: as many as `kv_cache_bytes` holds
    kv_cache_bytes: int = 2 << 30        # K and V of every layer, this rank's heads
    enable_prefix_caching: bool = True
    prepack_weights: bool = True         # CPU: linears in oneDNN's layout (`Transformer.prepack`)
    # CPU: threads for all but the matmuls and KV gathers (None: torch's count for all). 1
    # pays on a host shared with other busy processes, where a 2-thread OpenMP team stalls on
    # every small op (decode steps 3x faster at load ~10); on a dedicated host it costs 6-8%.
    small_op_threads: int | None = None
    # Decode rows' keys/values kept contiguous beside the pools (`workers/decode_slab.py`):
    # spares a gather of every row's context per layer per step; 0 = gather always.
    decode_slab_bytes: int = 1 << 30
