"""One replica as N tensor-parallel ranks: rank 0 serves, the others follow.

Rank 0 is the only Kafka member. Its `RankedEngine` has the `Engine` interface; each
`generate(batch)` first broadcasts the batch to the other ranks, then runs it. Ranks > 0
run `follow(engine)`: receive a batch, run the same `generate`, repeat, until rank 0
broadcasts None (shutdown). After the collectives every rank holds identical logits, and
rank 0 gives every sampled row an explicit seed before broadcasting, so every rank draws
the same tokens and runs the same number of steps (the collectives stay in lockstep).

Failure bound: once all ranks have joined, every collective has the process group's
timeout (`init_distributed`'s `timeout_s`; joining waits up to `startup_timeout_s`). A dead
peer usually surfaces at once as a closed connection (~0.05 s in the tests), a stalled one
after at most `timeout_s`. While idle, rank 0 broadcasts a heartbeat every `timeout_s / 4`
so followers do not time out between batches, and so a follower that died while idle is
noticed: the next `generate` raises `RanksFailed` (or the collective error) within
`timeout_s` plus one heartbeat period. Followers whose rank 0 dies raise out of `follow`
within `timeout_s`. A failed process group cannot be repaired: exit the process.
"""

from __future__ import annotations

import dataclasses
import os
import random
import socket
import threading
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from workers.engine import Engine, EngineDown, GenerationInput, GenerationOutput
from workers.model import ModelConfig, Transformer
from workers.reshard import load_rank
from workers.tokenizer import Tokenizer, load_tokenizer
from workers.tp import DEFAULT_TIMEOUT_S, env_rank, init_distributed

_PING = "ping"  # heartbeat message: keep followers' receive from timing out while idle


class RanksFailed(EngineDown):
    """A rank died or stalled; the process group is unusable and this process should exit."""


def load_engine(path: str | Path, rank: int, world: int, device: str = "cpu",
                dtype: torch.dtype | str | None = None) -> Engine:
    """An Engine over rank's part of the model at `path` (pre-sharded or full)."""
    model, config = load_rank(path, rank, world, device=device, dtype=dtype)
    return Engine(model, config, load_tokenizer(path), device)


class RankedEngine:
    """Rank 0's Engine: broadcasts each batch to the followers, then runs it in lockstep."""

    def __init__(self, engine: Engine, timeout_s: float = DEFAULT_TIMEOUT_S,
                 heartbeat_s: float | None = None) -> None:
        self.engine = engine
        self._lock = threading.Lock()            # one broadcast / generate at a time
        self._error: BaseException | None = None
        self._closed = threading.Event()
        # World size 1 (no process group): a plain pass-through, no broadcasts.
        self._solo = not dist.is_initialized() or dist.get_world_size() == 1
        self._heartbeat_s = timeout_s / 4 if heartbeat_s is None else heartbeat_s
        self._heart = threading.Thread(target=self._beat, name="ferry-tp-heartbeat",
                                       daemon=True)
        if not self._solo:
            self._heart.start()

    # The Engine interface.
    @property
    def config(self) -> ModelConfig:
        return self.engine.config

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.engine.tokenizer

    @property
    def max_context(self) -> int:
        return self.engine.max_context

    def encode(self, prompt: str) -> list[int]:
        return self.engine.encode(prompt)

    def generate(self, batch: list[GenerationInput]) -> list[GenerationOutput]:
        """Broadcast `batch` (seeds made explicit), then generate it like every rank."""
        batch = [_with_seed(x) for x in batch]
        with self._lock:
            self._raise_if_failed()
            if self._solo:
                return self.engine.generate(batch)
            try:
                dist.broadcast_object_list([batch], src=0)
            except Exception as exc:
                raise self._fail(exc) from exc
            try:
                return self.engine.generate(batch)
            except ValueError:
                raise  # a bad request: every rank rejected it before any collective
            except Exception as exc:
                raise self._fail(exc) from exc

    def close(self) -> None:
        """Tell the followers to stop (a None batch); idempotent."""
        if self._closed.is_set():
            return
        self._closed.set()
        if self._solo:
            return
        with self._lock:
            if self._error is None:
                try:
                    dist.broadcast_object_list([None], src=0)
                except Exception as exc:  # a follower already gone: nothing left to stop
                    self._fail(exc)
        self._heart.join()

    @property
    def model(self) -> Transformer:
        return self.engine.model

    @property
    def eos_ids(self) -> frozenset[int]:
        return self.engine.eos_ids

    @property
    def healthy(self) -> bool:
        return self._error is None and not self._closed.is_set()

    def _beat(self) -> None:
        while not self._closed.wait(self._heartbeat_s):
            with self._lock:
                if self._error is not None or self._closed.is_set():
                    return
                try:
                    dist.broadcast_object_list([_PING], src=0)
                except Exception as exc:
                    self._fail(exc)
                    return

    def _fail(self, exc: BaseException) -> RanksFailed:
        self._error = self._error or exc
        return RanksFailed(f"tensor-parallel ranks failed: {exc}")

    def _raise_if_failed(self) -> None:
        if self._closed.is_set():
            raise RanksFailed("RankedEngine is closed")
        if self._error is not None:
            raise RanksFailed(f"tensor-parallel ranks failed: {self._error}")


def follow(engine: Engine) -> None:
    """Ranks > 0: run every batch rank 0 broadcasts, in lockstep, until a None batch."""
    while True:
        message: list[Any] = [None]
        dist.broadcast_object_list(message, src=0)
        batch = message[0]
        if batch is None:
            return
        if isinstance(batch, str) and batch == _PING:
            continue
        try:
            engine.generate(batch)
        except ValueError:
            pass  # rank 0 rejected the same batch before any collective


def _with_seed(item: GenerationInput) -> GenerationInput:
    """Sampled rows need the same seed on every rank: draw one here if none was given."""
    p = item.params
    if p.temperature == 0 or p.seed is not None:
        return item
    seed = random.SystemRandom().randrange(2**63)
    return GenerationInput(item.input_ids, dataclasses.replace(p, seed=seed))


def serve_rank(path: str | Path, serve: Callable[[RankedEngine], None], *,
               timeout_s: float = DEFAULT_TIMEOUT_S, device: str = "cpu",
               dtype: torch.dtype | str | None = None) -> None:
    """Per-process entry: load this rank's part, join the group, then serve or follow.

    Rank 0 calls `serve(ranked_engine)` (the Kafka loop) and shuts the followers down when
    it returns; ranks > 0 follow. The process group is destroyed at the end either way.
    """
    rank, world = env_rank()
    engine = load_engine(path, rank, world, device=device, dtype=dtype)
    init_distributed(timeout_s=timeout_s)  # after loading: see its docstring
    try:
        if rank == 0:
            ranked = RankedEngine(engine, timeout_s=timeout_s)
            try:
                serve(ranked)
            finally:
                ranked.close()
        else:
            follow(engine)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ---- launching -------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(nproc: int, target: Callable[..., Any], *args: Any, nnodes: int = 1,
                 node_rank: int = 0, master_addr: str = "127.0.0.1",
                 master_port: int | None = None) -> list[BaseProcess]:
    """Start this node's `nproc` ranks as spawned processes running `target(*args)`.

    Each gets torchrun-style env (RANK = node_rank * nproc + local rank, WORLD_SIZE =
    nnodes * nproc, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so `target` calls
    `init_distributed()`. Multi-node: run this on every node with the same nnodes,
    master_addr and master_port and its own node_rank. Returns the processes (join them,
    or use `wait_all`). `target` must be importable (a module-level function).
    """
    if master_port is None:
        if nnodes > 1:
            raise ValueError("multi-node launch needs an explicit master_port")
        master_port = free_port()
    ctx = mp.get_context("spawn")
    procs = []
    for local_rank in range(nproc):
        env = {"RANK": str(node_rank * nproc + local_rank), "WORLD_SIZE": str(nnodes * nproc),
               "LOCAL_RANK": str(local_rank), "LOCAL_WORLD_SIZE": str(nproc),
               "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port)}
        p = ctx.Process(target=_run_with_env, args=(env, target, args), daemon=False)
        p.start()
        procs.append(p)
    return procs


def wait_all(procs: list[BaseProcess], timeout_s: float) -> list[int | None]:
    """Join every process within one shared deadline; kill stragglers; exit codes."""
    import time

    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return [p.exitcode for p in procs]


def _run_with_env(env: dict[str, str], target: Callable[..., Any], args: tuple) -> None:
    os.environ.update(env)
    target(*args)
