"""One replica as N tensor-parallel ranks: rank 0 serves, the others follow.

Rank 0 is the only Kafka member. Its `RankedEngine` has the `Engine` interface (add,
abort, step, has_work, stats, check, generate, score). `add` and `abort` apply at once on
rank 0 and are queued; each `step` broadcasts the queued ops, then runs the step. Ranks > 0
run `follow(engine)`: receive the ops, apply them in order, run the same step, repeat, until
rank 0 broadcasts None (shutdown). `generate` and `score` travel the same way. Every rank's
engine thus sees the same calls in the same order, its scheduler (deterministic, no clock)
makes the same decisions, the collectives line up, and after them every rank holds
identical logits; rank 0 gives every sampled request an explicit seed at `add`, so every
rank draws the same tokens.

Failure bound: once all ranks have joined, every collective has the process group's
timeout (`init_distributed`'s `timeout_s`; joining waits up to `startup_timeout_s`). A dead
peer usually surfaces at once as a closed connection (~0.05 s in the tests), a stalled one
after at most `timeout_s`. While idle, rank 0 broadcasts a heartbeat every `timeout_s / 4`
so followers do not time out between steps, and so a follower that died while idle is
noticed: the next step raises `RanksFailed` (or the collective error) within `timeout_s`
plus one heartbeat period. Followers whose rank 0 dies raise out of `follow` within
`timeout_s`. A failed process group cannot be repaired: exit the process.
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
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from workers.engine import (Completion, Engine, EngineConfig, EngineDown, EngineRequest,
                            EngineStats, GenerationInput, GenerationOutput, StepOutput)
from workers.model import ModelConfig, Transformer
from workers.reshard import load_rank
from workers.sampler import MIN_TEMPERATURE
from workers.tokenizer import Tokenizer, load_tokenizer
from workers.config import DEVICE
from workers.tp import DEFAULT_TIMEOUT_S, env_rank, init_distributed

_PING = "ping"  # heartbeat message: keep followers' receive from timing out while idle
Op = tuple[str, Any]  # ("add", EngineRequest) | ("abort", request id)
T = TypeVar("T")


class RanksFailed(EngineDown):
    """A rank died or stalled; the process group is unusable and this process should exit."""


def load_engine(path: str | Path, rank: int, world: int, device: str = DEVICE,
                dtype: torch.dtype | str | None = None,
                engine_config: EngineConfig | None = None) -> Engine:
    """An Engine over rank's part of the model at `path` (pre-sharded or full)."""
    model, config = load_rank(path, rank, world, device=device, dtype=dtype)
    return Engine(model, config, load_tokenizer(path), device, engine_config)


class RankedEngine:
    """Rank 0's Engine: broadcasts each step's ops to the followers, then runs it in lockstep."""

    def __init__(self, engine: Engine, timeout_s: float = DEFAULT_TIMEOUT_S,
                 heartbeat_s: float | None = None) -> None:
        self.engine = engine
        self._lock = threading.Lock()            # one broadcast / step at a time
        self._ops: list[Op] = []                 # applied here, not yet sent to followers
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

    @property
    def model(self) -> Transformer:
        return self.engine.model

    @property
    def eos_ids(self) -> frozenset[int]:
        return self.engine.eos_ids

    @property
    def healthy(self) -> bool:
        return self._error is None and not self._closed.is_set()

    def encode(self, prompt: str) -> list[int]:
        return self.engine.encode(prompt)

    def check(self, request: EngineRequest) -> None:
        self.engine.check(request)

    def add(self, request: EngineRequest) -> None:
        """Queue `request` here (seed made explicit); followers get it with the next step."""
        request = _with_seed(request)
        with self._lock:
            self._raise_if_failed()
            self.engine.add(request)  # a ValueError here: nothing queued, nothing sent
            self._ops.append(("add", request))

    def abort(self, request_id: str) -> Completion | None:
        with self._lock:
            self._raise_if_failed()
            completion = self.engine.abort(request_id)
            if completion is not None:
                self._ops.append(("abort", request_id))
            return completion

    def step(self) -> StepOutput:
        """Send the queued ops, then run the step every rank runs."""
        return self._lockstep("step", None, self.engine.step)

    def has_work(self) -> bool:
        return self.engine.has_work()

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def generate(self, batch: list[GenerationInput]) -> list[GenerationOutput]:
        """Broadcast `batch` (seeds made explicit), then generate it like every rank."""
        batch = [_with_seed(x) for x in batch]
        return self._lockstep("generate", batch, lambda: self.engine.generate(batch))

    def score(self, prompt_ids: list[int], target_ids: list[int]) -> float:
        payload = (prompt_ids, target_ids)
        return self._lockstep("score", payload,
                              lambda: self.engine.score(prompt_ids, target_ids))

    def close(self) -> None:
        """Tell the followers to stop (a None message); idempotent."""
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

    def _lockstep(self, kind: str, payload: Any, run: Callable[[], T]) -> T:
        with self._lock:
            self._raise_if_failed()
            ops, self._ops = self._ops, []
            if not self._solo:
                try:
                    dist.broadcast_object_list([(kind, ops, payload)], src=0)
                except Exception as exc:
                    raise self._fail(exc) from exc
            try:
                return run()
            except ValueError:
                raise  # a bad request: every rank rejected it before any collective
            except Exception as exc:
                if self._solo:
                    raise
                raise self._fail(exc) from exc

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
    """Ranks > 0: apply rank 0's ops and run its steps, in lockstep, until a None message."""
    while True:
        message: list[Any] = [None]
        dist.broadcast_object_list(message, src=0)
        if message[0] is None:
            return
        if isinstance(message[0], str) and message[0] == _PING:
            continue
        kind, ops, payload = message[0]
        for op, arg in ops:
            if op == "add":
                engine.add(arg)
            else:
                engine.abort(arg)
        try:
            if kind == "step":
                engine.step()
            elif kind == "generate":
                engine.generate(payload)
            else:
                engine.score(*payload)
        except ValueError:
            pass  # rank 0 rejected the same call before any collective


R = TypeVar("R", EngineRequest, GenerationInput)


def _with_seed(item: R) -> R:
    """Sampled rows need the same seed on every rank: draw one here if none was given."""
    p = item.params
    if p.temperature < MIN_TEMPERATURE or p.seed is not None:
        return item
    return dataclasses.replace(item, params=dataclasses.replace(
        p, seed=random.SystemRandom().randrange(2**63)))


def serve_rank(path: str | Path, serve: Callable[[RankedEngine], None], *,
               timeout_s: float = DEFAULT_TIMEOUT_S, device: str = DEVICE,
               dtype: torch.dtype | str | None = None,
               engine_config: EngineConfig | None = None) -> None:
    """Per-process entry: load this rank's part, join the group, then serve or follow.

    Rank 0 calls `serve(ranked_engine)` (the Kafka loop) and shuts the followers down when
    it returns; ranks > 0 follow. The process group is destroyed at the end either way.
    """
    rank, world = env_rank()
    engine = load_engine(path, rank, world, device=device, dtype=dtype,
                         engine_config=engine_config)
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
