"""Streaming benchmark: time to first token and inter-token latency through the whole path
(HTTP SSE -> gateway -> router -> worker, as deployed) against the engine's own step times,
against vLLM's OpenAI server on the same model, and throughput streaming vs not.

Systems, each measured in every round, one after another (the order reversed every other
round, so drift from the machine's other load hits them alike):
  engine   the Engine in this process, no Kafka, no HTTP: the same requests (same token ids,
           same engine budgets, prefix caching off as in the worker) in the same closed loop
           (C requests in flight, the next added the step after one finishes). Its TTFT at
           one client is the prefill step: `Engine.add`, then the `step()` that returns the
           first token. Its ITL is the gap between the steps that return a row's tokens.
  ferry    aiohttp client -> `ferry gateway`-equivalent process (API key, alias; its own
           process) -> `ferry router` process -> `ferry worker` process, completions with
           `stream: true`; text chunks read off the `data:` lines as they arrive.
  ferry-nostream  the same requests, `stream: false` (saturation only: the throughput base).
  vllm     `python -m vllm.entrypoints.openai.api_server` from the vLLM venv
           (tests/bench/peers.py), the same checkpoint, CPU, same dtype, prefix caching off,
           its own scheduling defaults, `ignore_eos`; streamed like ferry. Kept stopped
           (SIGSTOP) outside its own turns so its idle polling costs the others nothing. If
           it cannot be started within BENCH_VLLM_START_S the results say why and the rest runs.
Phases: "1 client" (sequential requests: low load) and "C clients" (C closed-loop clients:
saturation). TTFT = request sent to the first chunk with non-empty text; ITL = gaps between
consecutive text chunks of one request; tokens/s = completion tokens / (first send to last
answer) of the run. Percentiles pool the samples of all rounds; tokens/s ratios are also
given per round.

The model: a random-weight Llama with a trained byte-level BPE tokenizer (the gateway takes
text), built once and cached under ~/.ferry/bench-models/. No eos anywhere (config,
generation config and tokenizer config), so every request generates exactly max_tokens, and
the prompts are picked (greedy, in-process, once) so that every generated token decodes to
text on its own: one token per chunk on every path, the chunk counts are checked. Default
shape hidden 512 x 8 layers (vocab 32000, bf16): the bench_engine Llama (768 x 12) costs
~1 s a step at 32 rows on the shared 2-core box; this keeps a step in the 10-300 ms range
that GPU serving sees and the whole run within ~15 minutes.

Knobs (env): BENCH_HIDDEN (512), BENCH_LAYERS (8), BENCH_VOCAB (32000), BENCH_DTYPE (bf16 |
fp32), BENCH_ROUNDS (3), BENCH_SEQUENTIAL (10 requests per system per round at 1 client),
BENCH_CONCURRENCY (32), BENCH_CONCURRENT (64 requests per run at saturation),
BENCH_MAX_TOKENS (32), BENCH_PROMPT_TOKENS (64), BENCH_VLLM (1; 0 skips it),
BENCH_VLLM_START_S (300), BENCH_WORKER_CPUS (e.g. "1": the worker alone on those cores, see
WORKER_CPUS below). KAFKA_BOOTSTRAP: use that broker instead of starting one (the run
starts its own otherwise, on the non-worker cores when pinned).

Run: `.venv/bin/python -m tests.bench.bench_streaming` (or `make bench`). Results go to
tests/bench/results/streaming.json; the logs of the processes to ~/.ferry/bench-logs/streaming/.
Everything shares the machine's cores (2 on the dev box; torch 2 threads everywhere, vLLM's
OMP bound to cores 0-1 as peers.vllm_env says): read the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# BENCH_WORKER_CPUS="1": the worker process alone on those cores (torch threads = their
# count), this process, the gateway, the router (and the broker, when this run starts it) on
# the others; the in-process engine gets as many threads as the worker. As a deployment
# separates them: on a shared 2-core box, every delta's broker/gateway/client work otherwise
# preempts a torch thread mid-step (measured: a 30% duty neighbour adds ~4 ms to a 13 ms
# decode step).
WORKER_CPUS = {int(c) for c in os.environ.get("BENCH_WORKER_CPUS", "").split(",") if c.strip()}
OTHER_CPUS = (os.sched_getaffinity(0) - WORKER_CPUS) if WORKER_CPUS else set()
THREADS = len(WORKER_CPUS) if WORKER_CPUS else 2
if WORKER_CPUS and "--gateway-child" not in sys.argv:
    os.sched_setaffinity(0, OTHER_CPUS)  # children inherit it; the worker is moved below
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # before torch loads, here and in children
    os.environ.setdefault(_var, str(THREADS))

REPO = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).parent / "results" / "streaming.json"
MODELS = Path.home() / ".ferry" / "bench-models"
LOGS = Path.home() / ".ferry" / "bench-logs" / "streaming"
SEED = 0

HIDDEN = int(os.environ.get("BENCH_HIDDEN", "512"))
LAYERS = int(os.environ.get("BENCH_LAYERS", "8"))
VOCAB = int(os.environ.get("BENCH_VOCAB", "32000"))
DTYPE = os.environ.get("BENCH_DTYPE", "bf16")
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "4"))
SEQUENTIAL = int(os.environ.get("BENCH_SEQUENTIAL", "16"))
CONCURRENCY = int(os.environ.get("BENCH_CONCURRENCY", "32"))
CONCURRENT = int(os.environ.get("BENCH_CONCURRENT", "96"))
MAX_TOKENS = int(os.environ.get("BENCH_MAX_TOKENS", "32"))
PROMPT_TOKENS = int(os.environ.get("BENCH_PROMPT_TOKENS", "64"))
VLLM = os.environ.get("BENCH_VLLM", "1") != "0"
VLLM_START_S = float(os.environ.get("BENCH_VLLM_START_S", "300"))

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
# Worker defaults (WorkerConfig), prefix caching off: every system sees the same prompts in
# every round, and none may answer a repeat from its cache.
ENGINE_BUDGETS = {"max_num_seqs": 64, "max_num_batched_tokens": 512}
DEPLOYMENT = f"bench-stream-{uuid.uuid4().hex[:8]}"
CALL_TIMEOUT_S = 600.0  # gateway call and attempt timeouts: no retry doubles the work
WARM_UP_S = 120.0


# ----------------------------------------------------------------------------- the model


def shape() -> dict[str, int]:
    heads = max(1, HIDDEN // 64)
    intermediate = int(os.environ.get("BENCH_INTERMEDIATE", (HIDDEN * 8 // 3) // 64 * 64))
    return {"hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": heads,
            "num_key_value_heads": max(1, heads // 3), "intermediate_size": intermediate,
            "vocab_size": VOCAB, "max_position_embeddings": 2048}


def synthetic_corpus() -> str:
    """Made-up ASCII words, so that BPE can fill a large vocabulary with whole-character
    tokens (the built-in corpus alone yields a few hundred, and a model vocabulary of raw
    bytes would make every fourth generated token half a character)."""
    rng = random.Random(f"{SEED}-corpus")
    syllables = ["ka", "to", "ri", "ne", "mu", "sa", "lo", "vi", "de", "po", "an", "el", "is",
                 "or", "un", "ba", "ce", "fi", "gu", "ha", "jo", "ly", "qu", "xe", "zy", "th",
                 "st", "pr", "ch", "sh"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 5)))
             for _ in range(200_000)]
    return "\n".join(" ".join(words[i:i + 12]) for i in range(0, len(words), 12))


def ensure_checkpoint() -> Path:
    s = shape()
    out = MODELS / (("streaming-llama-h{hidden_size}-l{num_hidden_layers}-a{num_attention_heads}"
                     "-kv{num_key_value_heads}-i{intermediate_size}-v{vocab_size}"
                     "-p{max_position_embeddings}").format(**s) + f"-seed{SEED}")
    if (out / ".complete").exists():
        print(f"checkpoint: reusing {out}")
        return out
    print(f"checkpoint: building {out}", flush=True)
    from models.factory import build_tiny_checkpoint

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    build_tiny_checkpoint(tmp, seed=SEED, corpus=synthetic_corpus(), **s)
    for name in ("config.json", "generation_config.json"):  # no eos: exact lengths everywhere
        file = tmp / name
        data = json.loads(file.read_text())
        data["eos_token_id"] = None
        file.write_text(json.dumps(data, indent=2) + "\n")
    tok_config = tmp / "tokenizer_config.json"
    data = json.loads(tok_config.read_text())
    data.pop("eos_token", None)
    tok_config.write_text(json.dumps(data, indent=2) + "\n")
    (tmp / ".complete").write_text("")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def load_engine(model_dir: Path):
    import torch

    from workers.engine import Engine, EngineConfig

    torch.set_num_threads(THREADS)
    return Engine.from_dir(model_dir, dtype=DTYPES[DTYPE], engine_config=EngineConfig(
        **ENGINE_BUDGETS, enable_prefix_caching=False))


def pick_prompts(engine, n: int) -> tuple[list[str], dict]:
    """n prompts of ~PROMPT_TOKENS tokens (distinct from their first word) whose greedy
    completion of MAX_TOKENS tokens streams one text piece per token (no token that decodes
    to nothing or to half a character). Also warms the engine up on the real shapes."""
    from models.factory import CORPUS
    from workers.engine import GenerationInput, SamplingParams
    from workers.streaming import DeltaStream

    vocab = sorted({w.strip(".,!?:") for w in CORPUS.split()} - {""})
    rng = random.Random(f"{SEED}-prompts")
    picked: list[str] = []
    tried = 0
    while len(picked) < n:
        batch = []
        for _ in range(max(8, math.ceil((n - len(picked)) * 1.3))):
            words = [f"Request {tried}:"]
            tried += 1
            while len(engine.encode(" ".join(words))) < PROMPT_TOKENS:
                words.append(rng.choice(vocab))
            batch.append(" ".join(words))
        outs = engine.generate([GenerationInput(engine.encode(p),
                                                SamplingParams(max_new_tokens=MAX_TOKENS))
                                for p in batch])
        for prompt, out in zip(batch, outs):
            stream = DeltaStream("r", "m", "s", engine.tokenizer)
            pieces = [stream.push([t]) for t in out.output_ids]
            if len(out.output_ids) == MAX_TOKENS and all(d is not None and d.text
                                                         for d in pieces):
                picked.append(prompt)
        if tried > 20 * n + 100:
            raise RuntimeError(f"only {len(picked)} of {tried} candidate prompts stream one "
                               f"text piece per token; try another BENCH_VOCAB or seed")
    lengths = [len(engine.encode(p)) for p in picked[:n]]
    return picked[:n], {"candidates": tried, "kept": len(picked),
                        "prompt_tokens_min": min(lengths), "prompt_tokens_max": max(lengths)}


# ----------------------------------------------------------------------------- samples


@dataclass
class Sample:
    """One request as its caller saw it (seconds)."""

    e2e: float
    completion_tokens: int
    prompt_tokens: int | None = None
    ttft: float | None = None                      # streamed only
    gaps: list[float] = field(default_factory=list)  # between text chunks
    chunks: int = 0


@dataclass
class Run:
    system: str
    phase: str
    round: int
    wall: float
    samples: list[Sample]
    decode_steps: list[float] = field(default_factory=list)  # engine: steps at C rows, no prefill
    server: dict[str, float] = field(default_factory=dict)  # ferry: histogram sum/count deltas


def engine_run(engine, prompts: list[list[int]], concurrency: int, tag: str
               ) -> tuple[float, list[Sample], list[float]]:
    """The closed loop in-process: `concurrency` requests in flight, the next one added before
    the step after one finishes. Returns wall, samples, and the times of steps in which
    exactly `concurrency` rows each decoded one token and nothing was prefilled."""
    import time as t

    from workers.engine import EngineRequest, SamplingParams

    queue = list(enumerate(prompts))
    added: dict[str, float] = {}
    tokens: dict[str, list[float]] = {}
    samples: list[Sample] = []
    decode_steps: list[float] = []
    in_flight = 0

    def top_up() -> bool:
        nonlocal in_flight
        any_added = False
        while queue and in_flight < concurrency:
            i, ids = queue.pop(0)
            rid = f"{tag}-{i}"
            engine.add(EngineRequest(rid, ids, SamplingParams(max_new_tokens=MAX_TOKENS)))
            added[rid], tokens[rid] = t.perf_counter(), []
            in_flight += 1
            any_added = True
        return any_added

    start = t.perf_counter()
    fresh = top_up()
    prev = t.perf_counter()
    while engine.has_work():
        out = engine.step()
        now = t.perf_counter()
        if not fresh and len(out.new_tokens) == concurrency and all(
                tokens[r] and len(v) == 1 for r, v in out.new_tokens.items()):
            decode_steps.append(now - prev)
        for rid, new in out.new_tokens.items():
            tokens[rid] += [now] * len(new)
        for done in out.finished:
            assert done.finish_reason == "length" and len(done.output_ids) == MAX_TOKENS, done
            times = tokens[done.id]
            samples.append(Sample(e2e=times[-1] - added[done.id],
                                  completion_tokens=len(done.output_ids),
                                  prompt_tokens=done.prompt_tokens,
                                  ttft=times[0] - added[done.id],
                                  gaps=[b - a for a, b in itertools.pairwise(times)],
                                  chunks=len(times)))
            in_flight -= 1
        fresh = top_up()
        prev = t.perf_counter()
    return t.perf_counter() - start, samples, decode_steps


@dataclass
class HttpTarget:
    name: str
    url: str
    model: str
    headers: dict[str, str]
    extra: dict[str, Any]  # vLLM: ignore_eos


async def http_call(http, target: HttpTarget, prompt: str, stream: bool) -> Sample:
    import orjson

    body = {"model": target.model, "prompt": prompt, "max_tokens": MAX_TOKENS,
            "temperature": 0, **target.extra}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    start = time.perf_counter()
    async with http.post(f"{target.url}/v1/completions", json=body,
                         headers=target.headers) as resp:
        if not stream:
            answer = await resp.json()
            end = time.perf_counter()
            if resp.status != 200:
                raise RuntimeError(f"{target.name}: HTTP {resp.status}: {answer}")
            usage = answer["usage"]
            return Sample(e2e=end - start, completion_tokens=usage["completion_tokens"],
                          prompt_tokens=usage["prompt_tokens"])
        if resp.status != 200:
            raise RuntimeError(f"{target.name}: HTTP {resp.status}: {await resp.text()}")
        times: list[float] = []
        usage = None
        async for line in resp.content:
            now = time.perf_counter()
            if not line.startswith(b"data: "):
                continue
            payload = line[6:].strip()
            if payload == b"[DONE]":
                break
            event = orjson.loads(payload)
            if "error" in event:
                raise RuntimeError(f"{target.name}: stream error: {event['error']}")
            choices = event.get("choices") or []
            if choices and choices[0].get("text"):
                times.append(now)
            if event.get("usage"):
                usage = event["usage"]
        end = time.perf_counter()
    if usage is None or not times:
        raise RuntimeError(f"{target.name}: stream without usage or text ({len(times)} chunks)")
    return Sample(e2e=end - start, completion_tokens=usage["completion_tokens"],
                  prompt_tokens=usage["prompt_tokens"], ttft=times[0] - start,
                  gaps=[b - a for a, b in itertools.pairwise(times)], chunks=len(times))


def session():
    """A connection pool of its own for each run: no run inherits connections that a server
    (vLLM's closes idle ones after 5 s) may be closing."""
    import aiohttp

    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                 timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S))


async def http_run(target: HttpTarget, prompts: list[str], concurrency: int,
                   stream: bool) -> tuple[float, list[Sample]]:
    samples: list[Sample] = []
    todo = iter(prompts)

    async def client() -> None:
        for prompt in todo:  # shared: each client takes the next prompt until none is left
            samples.append(await http_call(http, target, prompt, stream))

    async with session() as http:
        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return time.perf_counter() - start, samples


async def until_served(target: HttpTarget, prompt: str) -> None:
    """A fresh key and route take a moment to reach the router and the gateway."""
    deadline = time.monotonic() + WARM_UP_S
    while True:
        try:
            async with session() as http:
                await asyncio.wait_for(http_call(http, target, prompt, True), 60)
            return
        except (TimeoutError, RuntimeError) as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{target.name}: not served within {WARM_UP_S:g}s: "
                                   f"{exc!r}") from exc
            await asyncio.sleep(0.5)


# ----------------------------------------------------------------------------- processes


class Vllm:
    """vLLM's OpenAI server in its own session (so the whole group can be paused)."""

    def __init__(self, model_dir: Path, log: Path) -> None:
        self.model_dir, self.log = model_dir, log
        self.port = 0
        self.process: subprocess.Popen | None = None
        self.failure: str | None = None
        self.version: str | None = None
        self.started_s: float | None = None
        self._t0 = 0.0

    def start(self) -> None:
        from ferry.broker import free_port
        from tests.bench import peers

        try:
            python = peers.ensure_vllm_venv()
            self.version = (peers.VLLM_VENV / ".ferry-bench-ready").read_text().strip()
        except Exception as exc:  # noqa: BLE001 (no venv, and none can be made here)
            self.failure = f"vLLM venv unavailable: {exc!r}"[:800]
            return
        self.port = free_port()
        cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server",
               "--model", str(self.model_dir), "--served-model-name", "bench",
               "--host", "127.0.0.1", "--port", str(self.port), "--dtype", DTYPES[DTYPE],
               "--max-model-len", "2048", "--no-enable-prefix-caching", "--enforce-eager",
               "--seed", str(SEED), "--disable-uvicorn-access-log", "--disable-log-stats"]
        self._t0 = time.monotonic()
        with self.log.open("w") as out:
            out.write("$ " + " ".join(cmd) + "\n")
            out.flush()
            self.process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                            env=peers.vllm_env(), cwd=self.log.parent,
                                            start_new_session=True)
        self.command = cmd

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self) -> bool:
        """Up within VLLM_START_S of its start, else `failure` says why (and it is stopped)."""
        if self.process is None:
            return False
        while True:
            if self.process.poll() is not None:
                self.failure = (f"vLLM server exited with {self.process.returncode} during "
                                f"start-up: {_tail(self.log)}")
                return False
            if _http_ok(f"{self.url}/v1/models"):
                self.started_s = time.monotonic() - self._t0
                print(f"vllm: up after {self.started_s:.0f}s on {self.url}", flush=True)
                return True
            if time.monotonic() - self._t0 > VLLM_START_S:
                self.failure = (f"vLLM server not up within {VLLM_START_S:g}s: "
                                f"{_tail(self.log)}")
                self.stop()
                return False
            time.sleep(1.0)

    def _signal(self, sig: int) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, sig)

    def pause(self) -> None:
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.resume()
        self._signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.process.wait()


class WorkerProcess:
    """`ferry worker` serving DEPLOYMENT with the engine budgets above, prefix caching off."""

    def __init__(self, model_dir: Path, bootstrap: str, log: Path) -> None:
        from ferry.broker import free_port

        self.metrics_url = f"http://127.0.0.1:{(port := free_port())}/metrics"
        cmd = [sys.executable, "-m", "ferry.cli", "worker", "--model", str(model_dir),
               "--metrics-port", str(port),
               "--deployment", DEPLOYMENT, "--bootstrap", bootstrap, "--dtype", DTYPES[DTYPE],
               "--no-prefix-caching", "--max-num-seqs", str(ENGINE_BUDGETS["max_num_seqs"]),
               "--max-num-batched-tokens", str(ENGINE_BUDGETS["max_num_batched_tokens"])]
        with log.open("w") as out:
            self.process = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "FERRY_LOG_LEVEL": "INFO"},
                preexec_fn=(lambda: os.sched_setaffinity(0, WORKER_CPUS)) if WORKER_CPUS
                else None)
        deadline = time.monotonic() + 300
        while "assigned partitions" not in log.read_text(errors="replace"):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"worker did not come up: {_tail(log)}")
            time.sleep(0.2)

    def stop(self) -> None:
        _stop(self.process)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class GatewayProcess:
    """The gateway (auth mode: API keys + router, on the router's ingress) in its own
    process, as `ferry gateway` runs it; a child of this module because the CLI has no
    --ingress flag."""

    def __init__(self, bootstrap: str, ingress: str, log: Path) -> None:
        from ferry.broker import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "tests.bench.bench_streaming", "--gateway-child",
               "--bootstrap", bootstrap, "--ingress", ingress, "--port", str(self.port)]
        self.log = log
        with log.open("w") as out:
            self.process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                            cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 60
        while not _http_ok(f"{self.url}/healthz"):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"gateway did not come up: {_tail(log)}")
            time.sleep(0.2)

    def stop(self) -> None:
        _stop(self.process)


def gateway_child(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gateway-child", action="store_true")
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--ingress", required=True)
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args(argv)
    from ferry.cli import _run_until_signalled, _setup_logging
    from streams.front.gateway import GatewaySettings, serve

    _setup_logging()
    settings = GatewaySettings(ingress=args.ingress, request_timeout_s=CALL_TIMEOUT_S,
                               attempt_timeout_s=CALL_TIMEOUT_S, port=args.port)
    asyncio.run(_run_until_signalled(serve(args.bootstrap, settings)))


# Histograms the Ferry processes keep, read before and after each Ferry run (sum and count
# deltas give means: where the path's time goes, server-side).
SERVER_METRICS = {
    "worker": ["ferry_inference_seconds", "ferry_engine_step_seconds",
               "ferry_inter_token_latency_seconds",
               "ferry_time_to_first_token_seconds", "ferry_queue_wait_seconds"],
    "gateway": ["ferry_gateway_time_to_first_token_seconds",
                "ferry_gateway_inter_token_latency_seconds"],
}


def scrape(urls: dict[str, str]) -> dict[str, float]:
    """{metric_sum / metric_count: value} over all label sets, from each process's page."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for who, url in urls.items():
        with urllib.request.urlopen(url, timeout=10) as page:
            text = page.read().decode()
        wanted = set(SERVER_METRICS[who])
        for family in text_string_to_metric_families(text):
            if family.name not in wanted:
                continue
            for sample in family.samples:
                if sample.name.endswith(("_sum", "_count")):
                    out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as page:
            return page.status == 200
    except OSError:
        return False


def _tail(log: Path, chars: int = 1500) -> str:
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


# ----------------------------------------------------------------------------- the run


async def measure(bootstrap: str, ingress: str, engine, prompts: list[str],
                  gateway: GatewayProcess, worker: WorkerProcess, vllm: Vllm | None
                  ) -> list[Run]:
    from streams.routing.keys import add_key
    from streams.routing.routes import set_route

    tag = uuid.uuid4().hex[:8]
    alias, tenant = f"bench-stream-alias-{tag}", f"bench-stream-{tag}"
    await set_route(bootstrap, alias, {DEPLOYMENT: 100})
    api_key = await add_key(bootstrap, tenant)
    ferry = HttpTarget("ferry", gateway.url, alias, {"Authorization": f"Bearer {api_key}"}, {})
    targets = [ferry]
    if vllm is not None:
        targets.append(HttpTarget("vllm", vllm.url, "bench", {}, {"ignore_eos": True}))
    by_name = {t.name: t for t in targets}
    pages = {"worker": worker.metrics_url, "gateway": f"{gateway.url}/metrics"}
    ids = [engine.encode(p) for p in prompts]
    low, sat = prompts[:SEQUENTIAL], prompts[:CONCURRENT]
    runs: list[Run] = []
    for concurrency in (1, CONCURRENCY):  # the engine's shapes at both loads
        engine_run(engine, ids[-min(len(ids), 2 * concurrency):], concurrency, f"warm{concurrency}")
    for target in targets:  # warm each path: a first request, then a short burst
        async with _turn(vllm, target.name):
            await until_served(target, prompts[-1])
            await http_run(target, prompts[-8:], 8, True)
            if target is ferry:
                await http_run(target, prompts[-8:], 8, False)
    for r in range(ROUNDS):
        order = ["engine", *(t.name for t in targets)]
        sat_order = ["engine", "ferry", "ferry-nostream", *(["vllm"] if vllm else [])]
        if r % 2:
            order.reverse()
            sat_order.reverse()
        for phase, systems, concurrency, chosen in (
                ("1 client", order, 1, low), (f"{CONCURRENCY} clients", sat_order,
                                              CONCURRENCY, sat)):
            for system in systems:
                t0 = time.perf_counter()
                if system == "engine":
                    wall, samples, steps = engine_run(engine, ids[:len(chosen)],
                                                      concurrency, f"r{r}-{concurrency}")
                    run = Run(system, phase, r, wall, samples, steps)
                else:
                    target = by_name["vllm" if system == "vllm" else "ferry"]
                    before = scrape(pages) if target is ferry else {}
                    async with _turn(vllm, system):
                        wall, samples = await http_run(target, chosen, concurrency,
                                                       system != "ferry-nostream")
                    after = scrape(pages) if target is ferry else {}
                    run = Run(system, phase, r, wall, samples,
                              server={k: v - before.get(k, 0.0) for k, v in after.items()})
                check(run, chosen)
                runs.append(run)
                tok_s = sum(s.completion_tokens for s in samples) / run.wall
                chunks = [x.chunks for x in samples]
                print(f"round {r + 1}/{ROUNDS} {phase:<11} {system:<15} "
                      f"{len(samples):>3} requests {tok_s:7.1f} tok/s, text chunks per "
                      f"request {min(chunks)}-{max(chunks)} ({time.perf_counter() - t0:5.1f}s)",
                      flush=True)
    return runs


class _turn:
    """vLLM runs only in its own turns: paused (SIGSTOP) the rest of the time."""

    def __init__(self, vllm: Vllm | None, system: str) -> None:
        self.vllm = vllm if system == "vllm" else None

    async def __aenter__(self) -> None:
        if self.vllm is not None:
            self.vllm.resume()
            await asyncio.sleep(1.0)  # its overdue timers fire before the run, not in it

    async def __aexit__(self, *exc: object) -> None:
        if self.vllm is not None:
            self.vllm.pause()


def check(run: Run, prompts: list[str]) -> None:
    """Every request generated exactly MAX_TOKENS. (Chunks per request are reported, not
    checked: a stream may fairly merge tokens whose deltas come in together.)"""
    assert len(run.samples) == len(prompts), (run.system, len(run.samples))
    bad = [s for s in run.samples if s.completion_tokens != MAX_TOKENS]
    assert not bad, f"{run.system}: {len(bad)} requests did not generate {MAX_TOKENS} tokens"


# ----------------------------------------------------------------------------- report


def summarize(runs: list[Run]) -> list[dict]:
    from tests.bench.common import pct

    rows = []
    keys = list(dict.fromkeys((r.phase, r.system) for r in runs))
    for phase, system in keys:
        group = [r for r in runs if (r.phase, r.system) == (phase, system)]
        samples = [s for r in group for s in r.samples]
        ttft = [s.ttft * 1000 for s in samples if s.ttft is not None]
        gaps = [g * 1000 for s in samples for g in s.gaps]
        e2e = [s.e2e * 1000 for s in samples]
        steps = [d * 1000 for r in group for d in r.decode_steps]
        per_round = [sum(s.completion_tokens for s in r.samples) / r.wall for r in group]
        rows.append({
            "phase": phase, "system": system, "rounds": len(group), "requests": len(samples),
            "tok_s": sum(s.completion_tokens for s in samples) / sum(r.wall for r in group),
            "tok_s_per_round": per_round,
            "ttft_p50_ms": pct(ttft, 50) if ttft else None,
            "ttft_p99_ms": pct(ttft, 99) if ttft else None,
            "itl_p50_ms": pct(gaps, 50) if gaps else None,
            "itl_p99_ms": pct(gaps, 99) if gaps else None,
            "e2e_p50_ms": pct(e2e, 50), "e2e_p99_ms": pct(e2e, 99),
            "chunks_per_request": (sum(s.chunks for s in samples) / len(samples)
                                   if ttft else None),
            "chunks_min": min(s.chunks for s in samples) if ttft else None,
            "requests_one_chunk_per_token": sum(s.chunks == s.completion_tokens
                                                for s in samples),
            "prompt_tokens_mean": (sum(s.prompt_tokens for s in samples if s.prompt_tokens)
                                   / len(samples)),
            "ttft_mean_ms": sum(ttft) / len(ttft) if ttft else None,
            "itl_mean_ms": sum(gaps) / len(gaps) if gaps else None,
            **server_means(group),
            "pure_decode_step_p50_ms": pct(steps, 50) if steps else None,
            "pure_decode_steps": len(steps),
        })
    return rows


def server_means(group: list[Run]) -> dict[str, float]:
    """Means (ms) of the Ferry processes' own histograms over a group's runs."""
    names = {"ferry_inference_seconds": "worker_step_mean_ms",
             "ferry_engine_step_seconds": "worker_engine_compute_mean_ms",
             "ferry_inter_token_latency_seconds": "worker_itl_mean_ms",
             "ferry_time_to_first_token_seconds": "worker_ttft_from_created_mean_ms",
             "ferry_queue_wait_seconds": "worker_queue_wait_mean_ms",
             "ferry_gateway_time_to_first_token_seconds": "gateway_ttft_mean_ms",
             "ferry_gateway_inter_token_latency_seconds": "gateway_itl_mean_ms"}
    out = {}
    for metric, label in names.items():
        total = sum(r.server.get(f"{metric}_sum", 0.0) for r in group)
        count = sum(r.server.get(f"{metric}_count", 0.0) for r in group)
        if count:
            out[label] = total / count * 1000
    return out


def ratios(rows: list[dict], runs: list[Run]) -> list[dict]:
    """The headline comparisons, each with its goal where the issue sets one."""
    def row(phase: str, system: str) -> dict | None:
        return next((r for r in rows if r["phase"] == phase and r["system"] == system), None)

    out = []

    def compare(what: str, phase: str, a: str, b: str, metric: str, goal: str | None = None,
                ok=None) -> None:
        ra, rb = row(phase, a), row(phase, b)
        if ra is None or rb is None or ra[metric] is None or rb[metric] is None:
            return
        va, vb = ra[metric], rb[metric]
        entry = {"what": what, "phase": phase, "a": a, "b": b, "metric": metric,
                 "a_value": va, "b_value": vb, "ratio": va / vb, "diff": va - vb,
                 "goal": goal}
        if ok is not None:
            entry["meets_goal"] = bool(ok(va, vb))
        out.append(entry)

    low, sat = "1 client", f"{CONCURRENCY} clients"
    compare("TTFT p50, path vs prefill", low, "ferry", "engine", "ttft_p50_ms",
            "<= prefill + 15 ms", lambda a, b: a - b <= 15)
    compare("TTFT p99, path vs prefill", low, "ferry", "engine", "ttft_p99_ms")
    compare("TTFT p50, path vs engine", sat, "ferry", "engine", "ttft_p50_ms")
    compare("TTFT p99, path vs engine", sat, "ferry", "engine", "ttft_p99_ms")
    compare("TTFT p50, Ferry vs vLLM", low, "ferry", "vllm", "ttft_p50_ms")
    compare("TTFT p99, Ferry vs vLLM", low, "ferry", "vllm", "ttft_p99_ms")
    compare("TTFT p50, Ferry vs vLLM", sat, "ferry", "vllm", "ttft_p50_ms")
    compare("TTFT p99, Ferry vs vLLM", sat, "ferry", "vllm", "ttft_p99_ms")
    for phase in (low, sat):
        compare("ITL p50, path vs engine", phase, "ferry", "engine", "itl_p50_ms",
                "<= engine + 5 ms", lambda a, b: a - b <= 5)
        compare("ITL p99, path vs engine", phase, "ferry", "engine", "itl_p99_ms")
        compare("ITL p50, Ferry vs vLLM", phase, "ferry", "vllm", "itl_p50_ms")
        compare("ITL p99, Ferry vs vLLM", phase, "ferry", "vllm", "itl_p99_ms")
    compare("tok/s, streaming / not streaming", sat, "ferry", "ferry-nostream", "tok_s",
            ">= 0.9", lambda a, b: a / b >= 0.9)
    compare("tok/s, path (streaming) / engine", sat, "ferry", "engine", "tok_s")
    compare("tok/s, Ferry / vLLM (both streaming)", sat, "ferry", "vllm", "tok_s")
    # Per round: streaming / not streaming from the two runs of the same round.
    per_round = []
    def tok_s(r: int, system: str) -> float | None:
        run = next((x for x in runs if x.round == r and x.phase == sat and x.system == system),
                   None)
        return None if run is None else sum(s.completion_tokens for s in run.samples) / run.wall

    for r in sorted({run.round for run in runs}):
        a, b = tok_s(r, "ferry"), tok_s(r, "ferry-nostream")
        if a and b:
            per_round.append(a / b)
    for entry in out:
        if entry["metric"] == "tok_s" and entry["b"] == "ferry-nostream":
            entry["per_round_ratios"] = per_round
    return out


def print_tables(rows: list[dict], comparisons: list[dict], info: dict) -> None:
    def f(v: float | None, width: int = 8, digits: int = 1) -> str:
        return f"{v:>{width}.{digits}f}" if v is not None else f"{'-':>{width}}"

    print(f"\n{info['describe']}\n")
    print(f"{'phase':<12}{'system':<16}{'req':>5}{'tok/s':>8}{'TTFT50':>8}{'TTFT99':>8}"
          f"{'ITL50':>8}{'ITL99':>8}{'e2e50':>8}{'chunks':>7}{'step@C':>8}")
    for r in rows:
        print(f"{r['phase']:<12}{r['system']:<16}{r['requests']:>5}{f(r['tok_s'])}"
              f"{f(r['ttft_p50_ms'])}{f(r['ttft_p99_ms'])}{f(r['itl_p50_ms'])}"
              f"{f(r['itl_p99_ms'])}{f(r['e2e_p50_ms'])}{f(r['chunks_per_request'], 7)}"
              f"{f(r['pure_decode_step_p50_ms'])}")
    print("(ms; TTFT/ITL/e2e percentiles over all rounds; chunks: text chunks per request; "
          "step@C: engine steps with all C rows decoding, no prefill)\n")
    print(f"{'comparison':<38}{'phase':<12}{'a':>9}{'b':>9}{'a/b':>7}{'a-b':>9}  goal")
    for c in comparisons:
        diff = "" if c["metric"] == "tok_s" else f"{c['diff']:>+9.1f}"
        goal = c["goal"] or ""
        if "meets_goal" in c:
            goal += "  MET" if c["meets_goal"] else "  NOT MET"
        extra = ""
        if c.get("per_round_ratios"):
            extra = "  rounds: " + " ".join(f"{x:.2f}" for x in c["per_round_ratios"])
        print(f"{c['what']:<38}{c['phase']:<12}{f(c['a_value'], 9)}{f(c['b_value'], 9)}"
              f"{c['ratio']:>6.2f}x{diff:>9}  {goal}{extra}")
    print("(a, b: the two systems named in the comparison, values in ms or tok/s)")
    print("\nwhere Ferry's time goes (means, ms; gateway/worker: their own histograms over "
          "the same runs)")
    print(f"{'phase':<12}{'system':<16}{'TTFT:':>6}{'client':>8}{'gateway':>8}{'worker':>8}"
          f"{'engine':>8}{'ITL:':>6}{'client':>8}{'gateway':>8}{'worker':>8}{'engine':>8}"
          f"{'step:':>7}{'worker':>8}{'compute':>8}{'engine@C':>9}")
    for r in rows:
        if not r["system"].startswith("ferry"):
            continue
        eng = next(x for x in rows if x["phase"] == r["phase"] and x["system"] == "engine")
        print(f"{r['phase']:<12}{r['system']:<16}{'':>6}{f(r['ttft_mean_ms'])}"
              f"{f(r.get('gateway_ttft_mean_ms'))}{f(r.get('worker_ttft_from_created_mean_ms'))}"
              f"{f(eng['ttft_mean_ms'])}{'':>6}{f(r['itl_mean_ms'])}"
              f"{f(r.get('gateway_itl_mean_ms'))}{f(r.get('worker_itl_mean_ms'))}"
              f"{f(eng['itl_mean_ms'])}{'':>7}{f(r.get('worker_step_mean_ms'))}"
              f"{f(r.get('worker_engine_compute_mean_ms'))}"
              f"{f(eng['pure_decode_step_p50_ms'], 9)}")
    print("(client: request sent -> first text chunk read; gateway: body read -> first text "
          "written; worker: request created -> first token sampled; engine: in-process. "
          "worker step: every engine step in the worker, prefills included, as its loop sees "
          "it; compute: the same steps timed in the engine thread; engine@C: "
          "in-process steps with all C rows decoding, p50)")


def main() -> None:
    if "--gateway-child" in sys.argv:
        gateway_child(sys.argv[1:])
        return
    from tests.bench.common import kafka_and_tmp, router_process, write_results

    began = time.monotonic()
    LOGS.mkdir(parents=True, exist_ok=True)
    s = shape()
    describe = (f"model: Llama hidden {s['hidden_size']} x {s['num_hidden_layers']} layers, "
                f"{s['num_attention_heads']} heads / {s['num_key_value_heads']} kv, "
                f"intermediate {s['intermediate_size']}, vocab {s['vocab_size']}, {DTYPE}; "
                f"{ROUNDS} rounds; 1 client: {SEQUENTIAL} sequential requests, "
                f"{CONCURRENCY} clients: {CONCURRENT} requests, per system per round; "
                f"prompts ~{PROMPT_TOKENS} tokens, {MAX_TOKENS} completion tokens; torch "
                f"threads {THREADS}; {os.cpu_count()} cores"
                + (f"; worker pinned to cpus {sorted(WORKER_CPUS)}, the rest to "
                   f"{sorted(OTHER_CPUS)}" if WORKER_CPUS else ""))
    print(describe, flush=True)
    model_dir = ensure_checkpoint()
    vllm = Vllm(model_dir, LOGS / "vllm.log") if VLLM else None
    if vllm is not None:  # it loads while the rest starts
        vllm.start()
    info: dict[str, Any] = {"describe": describe}
    try:
        with kafka_and_tmp() as (bootstrap, tmp), router_process(bootstrap, tmp) as router:
            worker = WorkerProcess(model_dir, bootstrap, LOGS / "worker.log")
            gateway = None
            try:
                gateway = GatewayProcess(bootstrap, router.ingress, LOGS / "gateway.log")
                engine = load_engine(model_dir)
                t0 = time.monotonic()
                prompts, info["prompts"] = pick_prompts(engine, max(SEQUENTIAL, CONCURRENT, 8))
                print(f"prompts: {info['prompts']} ({time.monotonic() - t0:.0f}s)", flush=True)
                if vllm is not None and not vllm.wait_ready():
                    print(f"vllm: skipped: {vllm.failure}", flush=True)
                if vllm is not None:
                    vllm.pause()
                runs = asyncio.run(measure(bootstrap, router.ingress, engine, prompts,
                                           gateway, worker,
                                           vllm if vllm and vllm.failure is None else None))
            finally:
                if gateway is not None:
                    gateway.stop()
                worker.stop()
                shutil.copy(router.log, LOGS / "router.log")
    finally:
        if vllm is not None:
            vllm.stop()
    rows = summarize(runs)
    comparisons = ratios(rows, runs)
    print_tables(rows, comparisons, info)
    total = time.monotonic() - began
    print(f"\ntotal wall time {total:.0f}s")
    vllm_info: dict[str, Any] = {"enabled": VLLM}
    if vllm is not None:
        vllm_info.update(version=vllm.version, started_in_s=vllm.started_s,
                         unavailable=vllm.failure,
                         command=" ".join(getattr(vllm, "command", [])) or None,
                         settings="its own scheduling defaults; prefix caching off; "
                                  "ignore_eos; paused (SIGSTOP) outside its turns")
    write_results(RESULTS, describe=describe, model_shape=s, dtype=DTYPE, rounds=ROUNDS,
                  sequential=SEQUENTIAL, concurrency=CONCURRENCY, concurrent=CONCURRENT,
                  max_tokens=MAX_TOKENS, prompt_tokens=PROMPT_TOKENS, threads=THREADS,
                  engine_budgets={**ENGINE_BUDGETS, "enable_prefix_caching": False},
                  broker="KAFKA_BOOTSTRAP" if os.environ.get("KAFKA_BOOTSTRAP") else "own",
                  prompts=info.get("prompts"), vllm=vllm_info, rows=rows,
                  comparisons=comparisons, total_wall_s=total)


if __name__ == "__main__":
    main()
