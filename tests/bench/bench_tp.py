"""Tensor-parallel benchmark on CPU: loading per rank, and generation throughput.

Run: `python -m tests.bench.bench_tp`. Builds a random Llama checkpoint (hidden 512,
8 layers by default) and measures, in separate spawned processes (gloo on 127.0.0.1):

- load: wall time and peak RSS (resource.getrusage, per rank process) at TP=2 for a
  pre-sharded checkpoint (`load_rank`, one rank file), a full checkpoint read slice by slice
  (`load_rank` on the full directory), and a full load followed by `apply_tp`;
- generation: greedy tokens/s for TP=1 (1 and 2 threads) and TP=2 (1 thread per rank).

On a 2-core CPU machine TP=2 is expected to be slower than TP=1: the ranks share the same
cores and add two all-reduces per layer per step. Read the ratios, not the absolute numbers.
Results go to tests/bench/results/tp.json.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from models.factory import build_tiny_checkpoint
from workers.engine import GenerationInput, SamplingParams
from workers.loader import load_model
from workers.ranks import launch_local, load_engine, wait_all
from workers.reshard import load_rank, reshard
from workers.tokenizer import load_tokenizer
from workers.tp import apply_tp, init_distributed

RESULTS = Path(__file__).parent / "results" / "tp.json"
SHAPE = dict(vocab_size=int(os.environ.get("BENCH_VOCAB", "8192")),
             hidden_size=int(os.environ.get("BENCH_HIDDEN", "512")),
             intermediate_size=1408, num_hidden_layers=int(os.environ.get("BENCH_LAYERS", "8")),
             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)
BATCH, NEW_TOKENS = 4, int(os.environ.get("BENCH_NEW_TOKENS", "32"))
PROMPTS = ["The ferry leaves the harbour at dawn", "Kafka topics are partitioned by key",
           "A language model reads a prompt", "The checkpoint holds the configuration"]
REPEATS = int(os.environ.get("BENCH_REPEATS", "5"))
TIMEOUT_S = 600.0


def _status_mib(field: str) -> float | None:
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return None


def _reset_peak_rss() -> float:
    """Reset this process's peak RSS (VmHWM) to its current RSS; return the current RSS.

    Linux carries getrusage's ru_maxrss across fork + exec, so a spawned rank reports its
    parent's peak if that was higher, and the rank's own torch import spikes it too; the
    reset (clear_refs 5) makes the peak measured after it belong to the load alone.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux, or not allowed: the peak then includes earlier spikes
    return _status_mib("VmRSS") or _ru_maxrss_mib()


def _peak_rss_mib() -> float:
    return _status_mib("VmHWM") or _ru_maxrss_mib()


def _ru_maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _load_rank(mode: str, path: str, out: str, warmup: str) -> None:
    """One rank: load the model `mode`'s way; write time and peak RSS to out/<mode>-<r>.

    A tiny checkpoint is loaded first, so torch's one-time lazy imports (meta device,
    ~1.5 s per fresh process) are not counted against the first mode measured.
    """
    torch.set_num_threads(1)
    rank, world = init_distributed(timeout_s=TIMEOUT_S)
    start = time.perf_counter()
    load_rank(warmup, rank, world)
    warm_s = time.perf_counter() - start
    base = _reset_peak_rss()
    start = time.perf_counter()
    if mode == "full+apply_tp":
        model, _ = load_model(path)
        apply_tp(model, rank, world)
    else:
        model = load_engine(path, rank, world).model
    seconds = time.perf_counter() - start
    # Touch every weight: file-backed (mmapped) tensors count in RSS only once read, and
    # serving reads them all. The peak then reflects a rank ready to serve.
    checksum = sum(float(t.float().sum()) for t in model.state_dict().values())
    Path(out, f"{mode}-{rank}.json").write_text(json.dumps(
        {"load_s": seconds, "peak_rss_mib": _peak_rss_mib(), "preload_rss_mib": base,
         "ru_maxrss_mib": _ru_maxrss_mib(), "first_load_of_process_s": warm_s,
         "local_weights_mib": sum(t.nbytes for t in model.state_dict().values()) / 2**20,
         "checksum": checksum}))
    if world > 1:
        torch.distributed.destroy_process_group()


def _generate_rank(label: str, path: str, out: str, threads: int) -> None:
    """One rank: warm up, then time one greedy batch; rank 0 writes tokens/s."""
    torch.set_num_threads(threads)
    rank, world = init_distributed(timeout_s=TIMEOUT_S)
    engine = load_engine(path, rank, world)
    tok = load_tokenizer(path)
    batch = [GenerationInput(tok.encode(p), SamplingParams(max_new_tokens=NEW_TOKENS))
             for p in PROMPTS[:BATCH]]
    engine.generate([GenerationInput(x.input_ids, SamplingParams(max_new_tokens=4))
                     for x in batch])
    times = []
    for _ in range(REPEATS):  # the median of a few runs: CPU timings are noisy
        start = time.perf_counter()
        outs = engine.generate(batch)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    if rank == 0:
        tokens = sum(len(o.output_ids) for o in outs)
        Path(out, f"gen-{label}.json").write_text(json.dumps(
            {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
             "all_seconds": times,
             "output_ids": [o.output_ids for o in outs]}))
    if world > 1:
        torch.distributed.destroy_process_group()


def _run(n: int, target, *args) -> None:
    codes = wait_all(launch_local(n, target, *args), TIMEOUT_S)
    if codes != [0] * n:
        raise RuntimeError(f"{target.__name__}{args}: exit codes {codes}")


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="ferry-bench-tp-"))
    full = build_tiny_checkpoint(work / "full", seed=0, **SHAPE)
    t = time.perf_counter()
    sharded = reshard(full, 2, work / "tp2")
    reshard_s = time.perf_counter() - t
    size_mib = (full / "model.safetensors").stat().st_size / 2**20

    warmup = build_tiny_checkpoint(work / "warmup", seed=0)
    load = {}
    for mode, path in [("presharded", sharded), ("full+slices", full), ("full+apply_tp", full)]:
        _run(2, _load_rank, mode, str(path), str(work), str(warmup))
        ranks = [json.loads((work / f"{mode}-{r}.json").read_text()) for r in range(2)]
        load[mode] = {"ranks": ranks,
                      "load_s": max(r["load_s"] for r in ranks),
                      "peak_rss_mib": max(r["peak_rss_mib"] for r in ranks),
                      "peak_over_preload_mib": max(r["peak_rss_mib"] - r["preload_rss_mib"]
                                                    for r in ranks)}

    gen = {}
    for label, n, threads, path in [("tp1-2threads", 1, 2, full), ("tp1-1thread", 1, 1, full),
                                     ("tp2-1thread-per-rank", 2, 1, sharded)]:
        _run(n, _generate_rank, label, str(path), str(work), threads)
        gen[label] = json.loads((work / f"gen-{label}.json").read_text())
    same = len({json.dumps(g.pop("output_ids")) for g in gen.values()}) == 1

    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "torch": torch.__version__},
              "model": {**SHAPE, "checkpoint_mib": round(size_mib, 1)},
              "batch": BATCH, "new_tokens": NEW_TOKENS, "repeats": REPEATS, "reshard_s": reshard_s,
              "load_tp2": load, "generate": gen, "tp2_tokens_equal_tp1": same}
    shutil.rmtree(work)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)


def print_table(r: dict) -> None:
    print(f"model {r['model']}  reshard to tp2: {r['reshard_s']:.2f}s")
    print(f"{'load at TP=2 (worst rank)':<28}{'load s':>9}{'peak RSS MiB':>14}"
          f"{'over pre-load':>15}{'RSS vs presharded':>19}")
    pre = r["load_tp2"]["presharded"]
    for mode, m in r["load_tp2"].items():
        print(f"{mode:<28}{m['load_s']:>9.3f}{m['peak_rss_mib']:>14.0f}"
              f"{m['peak_over_preload_mib']:>15.0f}"
              f"{m['peak_over_preload_mib'] / pre['peak_over_preload_mib']:>18.2f}x")
    print(f"{'generate (batch 4, median)':<28}{'tokens/s':>9}{'vs tp1-2threads':>17}")
    ref = r["generate"]["tp1-2threads"]["tokens_per_s"]
    for label, g in r["generate"].items():
        print(f"{label:<28}{g['tokens_per_s']:>9.1f}{g['tokens_per_s'] / ref:>16.2f}x")
    print(f"TP=2 greedy tokens equal TP=1: {r['tp2_tokens_equal_tp1']}")


if __name__ == "__main__":
    main()
