"""Tensor parallelism on CPU (gloo): TP=2/4 vs TP=1, reshard/merge, ranks, failures.

Ranks are spawned processes on 127.0.0.1 with free ports; each writes its result to a JSON
file that the test reads after joining (no sleeps, every wait has a deadline).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.factory import build_tiny_checkpoint
from workers.engine import Engine, GenerationInput, SamplingParams
from workers.loader import load_model
from workers.ranks import RankedEngine, RanksFailed, follow, launch_local, load_engine, wait_all
from workers.reshard import load_rank, merge, reshard
from workers.tokenizer import Tokenizer, load_tokenizer
from workers.tp import apply_tp, check_tp, env_rank, init_distributed, shard_state_dict

PROMPTS = ["The ship", "Kafka topics are partitioned by key", "Once upon a time there was a",
           "A", "Tensor parallel ranks talk through torch distributed", "Hello Ferry"]
JOIN_S = 60.0


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 4 q heads, 2 kv heads: TP=4 replicates each kv head on two ranks. vocab 512 % 4 == 0.
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tp") / "tiny", seed=0,
                                 num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def tied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tp") / "tied", seed=1,
                                 tie_word_embeddings=True)


def greedy_batch(engine: Engine | Tokenizer) -> list[GenerationInput]:
    return [GenerationInput(engine.encode(p), SamplingParams(max_new_tokens=8))
            for p in PROMPTS]


def mixed_batch(engine: Engine) -> list[GenerationInput]:
    params = [SamplingParams(max_new_tokens=8),
              SamplingParams(max_new_tokens=6, temperature=0.8, seed=7),
              SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=11),
              SamplingParams(max_new_tokens=3)]
    return [GenerationInput(engine.encode(p), sp) for p, sp in zip(PROMPTS, params)]


def ids(outputs: list) -> list[list[int]]:
    return [o.output_ids for o in outputs]


def run_ranks(n: int, *args: object) -> list[int | None]:
    codes = wait_all(launch_local(n, _rank_main, *args), JOIN_S)
    return codes


# ---- rank processes (module level: spawn pickles them by name) -------------------------

# Short collective timeouts: idling past one proves the heartbeat works; a stall hits one.
TIMEOUT_S = {"ranked": 2.0, "follower_stalls": 2.0}


def _rank_main(scenario: str, ckpt: str, out: str, *extra: str) -> None:
    torch.set_num_threads(1)
    # Warm torch's lazy imports (~1.5 s on first meta-device use) before the short
    # collective timeouts start counting; later loads take milliseconds.
    load_rank(ckpt, *env_rank())
    rank, world = init_distributed(timeout_s=TIMEOUT_S.get(scenario, 10.0),
                                   startup_timeout_s=60)
    result = globals()[f"_scenario_{scenario}"](Path(ckpt), rank, world, *extra)
    if result is not None:
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _scenario_equivalence(ckpt: Path, rank: int, world: int, sharded: str,
                          tied: str, tied_sharded: str) -> dict:
    model, config = load_model(ckpt)
    engine = Engine(apply_tp(model, rank, world), config, None)
    batch = greedy_batch(load_tokenizer(ckpt))
    result = {"apply_tp": ids(engine.generate(batch))}
    result["sliced"] = ids(load_engine(ckpt, rank, world).generate(batch))
    resharded = load_engine(sharded, rank, world)
    result["resharded"] = ids(resharded.generate(batch))
    attn = resharded.model.model.layers[0].self_attn
    result["local_heads"] = [attn.n_heads, attn.n_kv_heads, attn.k_proj.weight.shape[0],
                             resharded.model.lm_head.weight.shape[0]]
    model, config = load_model(tied)
    tied_batch = greedy_batch(load_tokenizer(tied))
    result["tied_apply_tp"] = ids(Engine(apply_tp(model, rank, world), config, None)
                                  .generate(tied_batch))
    result["tied_resharded"] = ids(load_engine(tied_sharded, rank, world).generate(tied_batch))
    return result


def _scenario_ranked(ckpt: Path, rank: int, world: int) -> dict | None:
    engine = load_engine(ckpt, rank, world)
    if rank:
        follow(engine)
        return {"followed": True}
    ranked = RankedEngine(engine, timeout_s=TIMEOUT_S["ranked"])
    first = ids(ranked.generate(mixed_batch(engine)))
    # Idle past the collective timeout: only rank 0's heartbeats keep the follower alive.
    # (A deliberate idle period, not synchronisation.)
    time.sleep(TIMEOUT_S["ranked"] * 1.25)
    second = ids(ranked.generate(greedy_batch(engine)))
    ranked.close()
    return {"mixed": first, "greedy": second, "vocab": ranked.config.vocab_size,
            "max_context": ranked.max_context}


class _SignalledEngine(Engine):
    """A follower that signals itself right after its first batch: SIGKILL (it dies) or
    SIGSTOP (it freezes, alive with its connections open)."""

    sig: int = signal.SIGKILL

    def generate(self, batch: list[GenerationInput]) -> list:
        out = super().generate(batch)
        os.kill(os.getpid(), self.sig)
        return out


def _follower_fails(ckpt: Path, rank: int, world: int, sig: int, timeout_s: float) -> None:
    """Rank 0 runs two batches; the follower signals itself after the first. Rank 0 writes
    whether (and how fast) the second one failed to FERRY_TEST_OUT."""
    engine = load_engine(ckpt, rank, world)
    if rank:
        follower = _SignalledEngine(engine.model, engine.config, engine.tokenizer)
        follower.sig = sig
        follow(follower)
        return None
    ranked = RankedEngine(engine, timeout_s=timeout_s)
    ranked.generate(greedy_batch(engine))
    start = time.monotonic()
    try:
        ranked.generate(greedy_batch(engine))
        error = None
    except RanksFailed as exc:
        error = str(exc)
    Path(os.environ["FERRY_TEST_OUT"]).write_text(json.dumps(
        {"error": error, "elapsed": time.monotonic() - start, "healthy": ranked.healthy}))
    os._exit(0)  # the process group is broken: exit without a collective teardown


def _scenario_follower_dies(ckpt: Path, rank: int, world: int) -> dict | None:
    return _follower_fails(ckpt, rank, world, signal.SIGKILL, 10.0)


def _scenario_follower_stalls(ckpt: Path, rank: int, world: int) -> dict | None:
    return _follower_fails(ckpt, rank, world, signal.SIGSTOP, TIMEOUT_S["follower_stalls"])


class _TimedEngine(Engine):
    """Records when its last batch ended."""

    finished_at = 0.0

    def generate(self, batch: list[GenerationInput]) -> list:
        out = super().generate(batch)
        self.finished_at = time.monotonic()
        return out


def _scenario_leader_dies(ckpt: Path, rank: int, world: int) -> dict | None:
    engine = load_engine(ckpt, rank, world)
    if rank == 0:
        RankedEngine(engine, timeout_s=10).generate(greedy_batch(engine))
        os.kill(os.getpid(), signal.SIGKILL)
    timed = _TimedEngine(engine.model, engine.config, engine.tokenizer)
    try:
        follow(timed)
        error = None
    except Exception as exc:  # gloo raises RuntimeError / DistBackendError
        error = f"{type(exc).__name__}: {exc}"
    Path(os.environ["FERRY_TEST_OUT"]).write_text(json.dumps(
        {"error": error, "elapsed": time.monotonic() - timed.finished_at}))
    os._exit(0)


# ---- tests -----------------------------------------------------------------------------

@pytest.mark.parametrize("tp", [2, 4])
def test_tp_gives_the_same_greedy_tokens_as_tp1(ckpt: Path, tied: Path, tmp_path: Path,
                                                tp: int) -> None:
    engine, tied_engine = Engine.from_dir(ckpt), Engine.from_dir(tied)
    expected = ids(engine.generate(greedy_batch(engine)))
    tied_expected = ids(tied_engine.generate(greedy_batch(tied_engine)))
    sharded = reshard(ckpt, tp, tmp_path / f"tp{tp}")
    tied_sharded = reshard(tied, tp, tmp_path / f"tied-tp{tp}")
    assert run_ranks(tp, "equivalence", str(ckpt), str(tmp_path), str(sharded), str(tied),
                     str(tied_sharded)) == [0] * tp
    for rank in range(tp):  # every rank, not just rank 0, holds the same tokens
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result == {"apply_tp": expected, "sliced": expected, "resharded": expected,
                          "tied_apply_tp": tied_expected, "tied_resharded": tied_expected,
                          # 4 q heads, 2 kv heads of 16 dims, vocab 512: all split tp ways
                          "local_heads": [4 // tp, max(1, 2 // tp), 16 * max(1, 2 // tp),
                                          512 // tp]}


def test_reshard_then_merge_is_bit_exact(ckpt: Path, tmp_path: Path) -> None:
    source = load_file(ckpt / "model.safetensors")
    sharded = reshard(ckpt, 4, tmp_path / "tp4")
    meta = json.loads((sharded / "sharding.json").read_text())
    assert meta == {"tp": 4, "format": "ferry-tp-v1",
                    "files": [f"rank-{r:02d}-of-04/model.safetensors" for r in range(4)]}
    assert (sharded / "config.json").is_file() and (sharded / "tokenizer.json").is_file()
    merged = load_file(merge(sharded, tmp_path / "merged") / "model.safetensors")
    assert merged.keys() == source.keys()
    for name, tensor in source.items():
        assert torch.equal(merged[name], tensor), name
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


def test_rank_files_hold_their_slices(ckpt: Path, tmp_path: Path) -> None:
    source = load_file(ckpt / "model.safetensors")
    config = Engine.from_dir(ckpt).config
    sharded = reshard(ckpt, 2, tmp_path / "tp2")
    split = {n for n in source if "norm" not in n}  # everything but the replicated norms
    split_bytes = sum(source[n].nbytes for n in split)
    for rank in range(2):
        part = load_file(sharded / f"rank-{rank:02d}-of-02" / "model.safetensors")
        assert part.keys() == source.keys()
        want = shard_state_dict(source, config, rank, 2)
        assert all(torch.equal(part[n], want[n]) for n in part)
        assert sum(part[n].nbytes for n in split) == split_bytes // 2


def test_kv_heads_are_replicated_when_tp_exceeds_them(ckpt: Path) -> None:
    source = load_file(ckpt / "model.safetensors")
    config = Engine.from_dir(ckpt).config
    k = source["model.layers.0.self_attn.k_proj.weight"]  # 2 kv heads of head_dim rows
    d = config.head_dim
    parts = [shard_state_dict(source, config, r, 4)["model.layers.0.self_attn.k_proj.weight"]
             for r in range(4)]
    for part, head in zip(parts, [0, 0, 1, 1]):  # ranks 0, 1 use kv head 0; ranks 2, 3 head 1
        assert torch.equal(part, k[head * d:(head + 1) * d])


def test_tied_embeddings_shard_and_merge(tied: Path, tmp_path: Path) -> None:
    merged = merge(reshard(tied, 2, tmp_path / "tp2"), tmp_path / "merged")
    source = load_file(tied / "model.safetensors")
    assert load_file(merged / "model.safetensors").keys() == source.keys()
    model, _ = load_model(merged)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_bad_tp_degree_is_a_value_error(ckpt: Path) -> None:
    config = Engine.from_dir(ckpt).config
    with pytest.raises(ValueError, match="num_attention_heads"):
        check_tp(config, 3)
    with pytest.raises(ValueError, match="num_attention_heads"):
        reshard(ckpt, 8, ckpt.parent / "never")


def test_wrong_tp_degree_names_the_file(ckpt: Path, tmp_path: Path) -> None:
    sharded = reshard(ckpt, 2, tmp_path / "tp2")
    with pytest.raises(ValueError, match=r"sharding\.json.*tp=2.*world size is 4"):
        load_rank(sharded, 0, 4)


def test_missing_rank_file_is_named(ckpt: Path, tmp_path: Path) -> None:
    sharded = reshard(ckpt, 2, tmp_path / "tp2")
    (sharded / "rank-01-of-02" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"rank-01-of-02/model\.safetensors"):
        load_rank(sharded, 0, 2)
    with pytest.raises(FileNotFoundError, match=r"rank-01-of-02/model\.safetensors"):
        merge(sharded, tmp_path / "merged")


def test_mismatched_shape_names_tensor_and_file(ckpt: Path, tmp_path: Path) -> None:
    sharded = reshard(ckpt, 2, tmp_path / "tp2")
    file = sharded / "rank-01-of-02" / "model.safetensors"
    part = load_file(file)
    part["model.layers.1.mlp.up_proj.weight"] = part["model.layers.1.mlp.up_proj.weight"][:-1]
    save_file(part, str(file))
    with pytest.raises(ValueError, match=r"rank-01-of-02/model\.safetensors.*up_proj"):
        load_rank(sharded, 1, 2)
    with pytest.raises(ValueError, match=r"rank-01-of-02/model\.safetensors.*up_proj"):
        merge(sharded, tmp_path / "merged")


def test_missing_sharding_json_is_named(ckpt: Path, tmp_path: Path) -> None:
    sharded = reshard(ckpt, 2, tmp_path / "tp2")
    (sharded / "sharding.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"sharding\.json"):
        load_rank(sharded, 0, 2)
    with pytest.raises(FileNotFoundError, match=r"sharding\.json"):
        merge(sharded, tmp_path / "merged")


def test_load_rank_at_world_1_is_the_full_model(ckpt: Path) -> None:
    model, _ = load_rank(ckpt, 0, 1)
    full, _ = load_model(ckpt)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                  full.state_dict().values()))


def test_ranked_engine_matches_a_single_process_engine(ckpt: Path, tmp_path: Path) -> None:
    engine = Engine.from_dir(ckpt)
    assert run_ranks(2, "ranked", str(ckpt), str(tmp_path)) == [0, 0]
    result = json.loads((tmp_path / "rank0.json").read_text())
    assert result["mixed"] == ids(engine.generate(mixed_batch(engine)))
    assert result["greedy"] == ids(engine.generate(greedy_batch(engine)))
    assert (result["vocab"], result["max_context"]) == (engine.config.vocab_size,
                                                         engine.max_context)
    assert json.loads((tmp_path / "rank1.json").read_text()) == {"followed": True}


def test_ranked_engine_at_world_1_is_a_pass_through(ckpt: Path) -> None:
    engine = Engine.from_dir(ckpt)
    ranked = RankedEngine(engine)
    assert ids(ranked.generate(mixed_batch(engine))) == ids(engine.generate(mixed_batch(engine)))
    ranked.close()
    with pytest.raises(RanksFailed, match="closed"):
        ranked.generate(greedy_batch(engine))


def test_dead_follower_makes_rank0_raise_in_bounded_time(ckpt: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "rank0.json"
    monkeypatch.setenv("FERRY_TEST_OUT", str(out))  # spawned children inherit the env
    codes = run_ranks(2, "follower_dies", str(ckpt), str(tmp_path))
    assert codes[1] == -signal.SIGKILL
    result = json.loads(out.read_text())
    assert result["error"] and not result["healthy"]
    assert result["elapsed"] < 10 + 5  # the collective timeout, plus slack


def test_dead_rank0_makes_followers_raise_in_bounded_time(ckpt: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "rank1.json"
    monkeypatch.setenv("FERRY_TEST_OUT", str(out))
    codes = run_ranks(2, "leader_dies", str(ckpt), str(tmp_path))
    assert codes == [-signal.SIGKILL, 0]
    result = json.loads(out.read_text())
    assert result["error"]
    assert result["elapsed"] < 10 + 5  # the collective timeout, plus slack


@pytest.mark.slow  # ~6 s: run with `make test-slow` (or -m slow)
def test_stalled_follower_makes_rank0_raise_after_the_timeout(
        ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "rank0.json"
    monkeypatch.setenv("FERRY_TEST_OUT", str(out))
    procs = launch_local(2, _rank_main, "follower_stalls", str(ckpt), str(tmp_path))
    try:
        procs[0].join(JOIN_S)
        assert procs[0].exitcode == 0
    finally:
        procs[1].kill()  # frozen: only SIGKILL ends it
        procs[1].join()
    result = json.loads(out.read_text())
    assert result["error"]
    # No closed connection to notice: the collective timeout is what ends the wait.
    bound = TIMEOUT_S["follower_stalls"]
    assert bound - 0.5 < result["elapsed"] < bound + 5
