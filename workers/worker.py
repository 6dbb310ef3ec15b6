"""The worker: a thin Kafka loop that feeds a continuously batching engine.

read → admit (validate, tokenise) → engine (add; step after step it schedules, runs and
samples) → publish each result the moment its request finishes → commit. The engine
decides which requests share a step; the loop only adds what arrives, aborts what was
revoked or passed its deadline, and steps while anything is running. Offsets are
committed only after every answer of the offsets before them is acknowledged by the broker
(`OffsetTracker`; requests finish out of order), so killing a worker loses no request. Every message ends as exactly one
thing: a result on its `reply_to`, or a dead letter on `ferry.dlq` (plus an error result
when the bad message still says where to answer). A shadow candidate (`shadow=True`) answers
on its `ferry.shadow-results.<deployment>` instead, never to the client; a primary copies its
results of mirrored requests to `ferry.primary-results` for the comparator. Each delivered
batch also sends one telemetry record (latency and error per result) for canaries.

A request with `stream_to` also gets a `Delta` after each step that gave it text
(`workers/streaming.py`), published in order by one loop and never waited for. Every worker
reads `ferry.cancels` from its end: a cancelled request's row is dropped between two steps
and answered with a `cancelled` error.

Why one long module: the loops (consume, serve, stream, cancel, commit) share one offset
tracker and one set of in-flight jobs; their ordering is the delivery guarantee, so it
reads top to bottom in one place.
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import itertools
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from collections import OrderedDict
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError
from aiokafka.structs import ConsumerRecord
from prometheus_client import CollectorRegistry

from edge.kafka_clients import client_options
from edge.metrics_server import serve_metrics
from edge.reader import fair_getmany
from edge.topic_admin import ensure_topics, pin_to_end, start_producer, topic_partitions
from schemas import (
    DLQ_TOPIC, RESULTS_TOPIC, DeadLetter, Delta, ErrorCode, Request, Result, SchemaError, Timings,
    Usage, decode_cancel, decode_request, salvage_reply_address,
)
from schemas.topics import (
    CANCELS_PARTITIONS, CANCELS_TOPIC, MIRRORED_HEADER, PRIMARY_HEADER, PRIMARY_RESULTS_TOPIC,
    PRODUCED_BY_HEADER, TELEMETRY_TOPIC, reply_topic_problem, shadow_results_topic,
    stream_topic_problem,
)
from workers.admission import Refused, admit
from workers.chat_template import deployment_template
from workers.config import WorkerConfig
from workers.engine import Completion, Engine, EngineDown, EngineRequest, StepOutput, sample_of
from workers.logprobs import completion_tokens, result_fields
from workers.metrics import BacklogSampler, WorkerMetrics
from workers.offsets import OffsetTracker
from workers.publisher import Answer, Destination, Publisher
from workers.streaming import RequestStream
from workers.telemetry import TELEMETRY_PARTITIONS, TelemetrySender
from workers.transactions import Answered, PartitionTransactions

log = logging.getLogger("ferry.worker")

# Kafka's per-record framing on top of key and value; results are checked against the
# limit with this margin so the broker never has to reject one.
_RECORD_OVERHEAD = 512
# How often an idle worker checks that its engine (all its ranks) can still serve.
_HEALTH_EVERY_S = 1.0
# Longest a stopping worker waits on the broker for each shutdown step.
_SHUTDOWN_STEP_S = 15.0
# Cancels are remembered this long (and at most this many), for requests not yet read.
_CANCEL_MEMORY_S = 600.0
_CANCEL_MEMORY = 10_000


@dataclass
class Job:
    """An admitted request, in the engine until it finishes."""

    tp: TopicPartition
    offset: int
    request: Request
    created: float           # unix seconds: producer's created_at, else the record timestamp
    dest: Destination
    added: float = 0.0       # unix seconds it entered the engine
    first_token: float | None = None  # unix seconds its first token was sampled
    last_token: float | None = None   # unix seconds its latest token was sampled
    stream: RequestStream | None = None  # a streaming request's deltas (to request.stream_to)


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self._worker._adopted.clear()
        self._worker._revoked_in = self._worker._generation()
        if revoked:
            await self._worker._release(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        log.info("assigned partitions %s", sorted(tp.partition for tp in assigned))
        # The very next generation: nobody else owned this member's returning partitions in
        # between. A member dropped mid-rebalance rejoins generations later: start afresh.
        revoked_in, self._worker._revoked_in = self._worker._revoked_in, None
        straight_back = revoked_in is not None and self._worker._generation() == revoked_in + 1
        await self._worker._adopt(set(assigned), straight_back)


class Worker:
    def __init__(self, config: WorkerConfig, engine: Engine,
                 registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.engine = engine
        self.chat_template = deployment_template(engine.tokenizer, config.chat_template)
        self.registry = registry or CollectorRegistry()
        self.metrics = WorkerMetrics.create(self.registry)
        self._offsets = OffsetTracker()
        self._jobs: dict[str, Job] = {}    # engine id -> job, from admission to its answer
        self._new: list[EngineRequest] = []  # admitted, not yet handed to the engine
        self._deadlines: list[tuple[float, str]] = []  # heap of (deadline, engine id)
        self._arrived = asyncio.Event()   # work for the engine
        self._space = asyncio.Event()     # room for more admitted requests
        self._engine_lock = asyncio.Lock()  # one engine call at a time (steps run in a thread)
        # Every step on one thread of its own: torch's CPU thread pool (OpenMP) belongs to
        # the thread that calls into it, and asyncio.to_thread spread steps over the
        # loop's executor threads (seen with py-spy), each with a pool of its own.
        self._engine_thread = ThreadPoolExecutor(max_workers=1,
                                                 thread_name_prefix="ferry-engine")
        self._commit_lock = asyncio.Lock()
        self._dirty = asyncio.Event()     # answers acknowledged since the last commit
        self._deliveries: set[asyncio.Task] = set()
        self._delivery_error: BaseException | None = None  # a failed publish stops the worker
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self.ready = asyncio.Event()      # set once the consumer has joined the group
        self._topics_ready: set[str] = set()
        self._telemetry: TelemetrySender | None = None
        self._publisher: Publisher | None = None
        self._cancels: AIOKafkaConsumer | None = None
        self._txns: PartitionTransactions | None = None  # exactly-once delivery
        self._skip: dict[TopicPartition, Answered] = {}  # answered by previous owners
        # Exactly-once: records are admitted only once the current assignment is adopted
        # (aiokafka starts fetching before the rebalance listener has run).
        self._adopted = asyncio.Event()
        self._adopt_error: BaseException | None = None
        self._held: set[TopicPartition] = set()  # partitions whose requests the engine has
        self._revoked_in: int | None = None  # group generation whose partitions were revoked
        # request id -> (unix time, reason) of recent cancels, oldest first
        self._cancelled: OrderedDict[str, tuple[float, str]] = OrderedDict()
        # (stream topic, delta), published in the order they were made; None prepares a topic
        self._outbox: asyncio.Queue[tuple[str, Delta | None]] = asyncio.Queue()
        self._instance = uuid.uuid4().hex[:8]  # names this worker's runs in deltas
        self._runs = itertools.count()

    # ---- lifecycle -------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until cancelled; a failure in either loop stops the worker loudly."""
        log.info("worker starting: %s", self.config.describe())
        serve_metrics(self.config.metrics_port, self.registry)
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.config.bootstrap, **client_options(),
            acks="all", enable_idempotence=True,
            max_request_size=self.config.max_message_bytes + _RECORD_OVERHEAD, linger_ms=2)
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.config.bootstrap, **client_options(), group_id=self.config.group,
            enable_auto_commit=False, auto_offset_reset="earliest",  # serve what came first
            max_poll_interval_ms=600_000, session_timeout_ms=self.config.session_timeout_ms,
            heartbeat_interval_ms=min(self.config.heartbeat_interval_ms,
                                      self.config.session_timeout_ms // 3),
            # Static membership: a restarted worker with the same instance id takes its
            # partitions back without a rebalance (the others never stop).
            group_instance_id=self.config.group_instance_id,
            rebalance_timeout_ms=30_000, isolation_level="read_committed")
        # Everything from here on is inside the try: a worker stopped while it is still
        # starting leaves the group at once instead of lingering until its session expires.
        try:
            await self._start_clients()
            loops = [asyncio.create_task(self._consume_loop(), name="consume"),
                     asyncio.create_task(self._serve_loop(), name="serve"),
                     asyncio.create_task(self._commit_loop(), name="commit"),
                     asyncio.create_task(self._stream_loop(), name="stream"),
                     asyncio.create_task(self._cancel_loop(), name="cancel"),
                     asyncio.create_task(BacklogSampler(self.metrics, self.config.deployment)
                                         .run(self._consumer), name="backlog")]
            try:
                done, _ = await asyncio.wait(loops, return_when=asyncio.FIRST_EXCEPTION)
                for task in done:
                    task.result()  # re-raise the loop's failure
            finally:
                for task in loops:
                    task.cancel()
                await asyncio.gather(*loops, return_exceptions=True)
        finally:
            await self._shutdown()

    async def _start_clients(self) -> None:
        assert self._producer is not None and self._consumer is not None
        answers_to = ({shadow_results_topic(self.config.deployment): self.config.partitions}
                      if self.config.shadow else {})
        await ensure_topics(self.config.bootstrap, {**answers_to,
                                                    self.config.topic: self.config.partitions,
                                                    DLQ_TOPIC: self.config.partitions,
                                                    RESULTS_TOPIC: self.config.partitions,
                                                    PRIMARY_RESULTS_TOPIC: self.config.partitions,
                                                    TELEMETRY_TOPIC: TELEMETRY_PARTITIONS,
                                                    CANCELS_TOPIC: CANCELS_PARTITIONS})
        self._topics_ready.update({DLQ_TOPIC, RESULTS_TOPIC, PRIMARY_RESULTS_TOPIC, *answers_to})
        await start_producer(self._producer, [DLQ_TOPIC, RESULTS_TOPIC, PRIMARY_RESULTS_TOPIC,
                                              TELEMETRY_TOPIC, *answers_to])
        # Cancels: every partition, from now on (no group: every worker sees every cancel).
        self._cancels = AIOKafkaConsumer(bootstrap_servers=self.config.bootstrap, **client_options(),
                                         enable_auto_commit=False)
        await self._cancels.start()
        cancel_tps = await topic_partitions(self._cancels, CANCELS_TOPIC)
        self._cancels.assign(cancel_tps)
        await pin_to_end(self._cancels, cancel_tps)
        self._telemetry = TelemetrySender(self._producer, self.config.deployment)
        self._publisher = Publisher(self._producer, self.config, self.metrics,
                                    self._topics_ready)
        if self.config.exactly_once:
            self._txns = PartitionTransactions(
                self.config, self._publisher, self._offsets, _RECORD_OVERHEAD,
                commit_latency=self.metrics.commit_latency.labels(self.config.deployment))
            await self._txns.start()
        # Joining the group (and its first assignment) comes last: everything the rebalance
        # listener uses exists by then.
        self._consumer.subscribe([self.config.topic], listener=_Rebalance(self))
        await self._consumer.start()

    async def _shutdown(self) -> None:
        # Queued requests are not answered here: their offsets stay uncommitted, so the
        # group's next owner of the partition serves them.
        assert self._producer is not None and self._consumer is not None
        try:
            # Bounded: with the group coordinator unreachable a commit retries for ever, and
            # what stays uncommitted is only served again, never lost.
            async with asyncio.timeout(_SHUTDOWN_STEP_S):
                await self._delivered()
                await self._commit()
        except TimeoutError:
            log.warning("shutdown: last answers not committed within %gs; the group's next "
                        "owner serves them again", _SHUTDOWN_STEP_S)
        except Exception as exc:  # the last delivery failed: the next owner serves it again
            log.warning("shutdown: last answers not delivered (%r); the group's next owner "
                        "serves them again", exc)
        finally:
            try:
                async with asyncio.timeout(_SHUTDOWN_STEP_S):
                    await self._consumer.stop()  # leaves the group (also mid-start)
            except TimeoutError:
                log.warning("shutdown: leaving the group took over %gs; the broker expires "
                            "this member instead", _SHUTDOWN_STEP_S)
            # Each bounded too: a stop must end even when a client hangs on the broker.
            closes = [("cancels reader", self._cancels and self._cancels.stop),
                      ("transactional producers", self._txns and self._txns.close),
                      ("producer", self._producer.stop)]
            for what, close in closes:
                if close is None:
                    continue
                try:
                    async with asyncio.timeout(_SHUTDOWN_STEP_S):
                        await close()
                except TimeoutError:
                    log.warning("shutdown: closing the %s took over %gs; left to the broker",
                                what, _SHUTDOWN_STEP_S)
                except Exception as exc:  # the rest still closes
                    log.warning("shutdown: closing the %s failed: %r", what, exc)
            self._engine_thread.shutdown(wait=False)  # a step still running ends on its own
            log.info("worker stopped: deployment=%s", self.config.deployment)

    async def _release(self, revoked: set[TopicPartition]) -> None:
        """A rebalance began (eager: every partition is revoked): what was answered is
        delivered and committed, and the engine pauses (the serve loop waits for `_adopted`).
        Unanswered requests stay in the engine until the new assignment is known: most
        partitions come straight back, and their rows then continue where they were."""
        async with self._engine_lock:  # between two steps
            pass
        await self._delivered()
        await self._commit()
        if self._txns is not None:
            self._txns.revoke(revoked)
        log.info("revoked partitions %s (rebalance), %d requests held until it ends",
                 sorted(tp.partition for tp in revoked), len(self._jobs))

    def _generation(self) -> int:
        assert self._consumer is not None
        return self._consumer._coordinator.generation  # no public accessor in aiokafka

    async def _adopt(self, assigned: set[TopicPartition], straight_back: bool = False) -> None:
        """The rebalance ended: requests of partitions now owned elsewhere leave the engine
        (their new owner serves them from the last commit); exactly-once, fence the previous
        owners of new partitions and skip what they answered. Nobody else can have owned a
        partition that came straight back, so its rows go on. aiokafka logs and swallows a
        listener's exception: keep it to raise."""
        try:
            kept = assigned if straight_back else set()
            async with self._engine_lock:  # between two steps
                gone = [eid for eid, job in self._jobs.items() if job.tp not in kept]
                self._new = [r for r in self._new if r.id not in gone]
                for eid in gone:
                    self.engine.abort(eid)
                    del self._jobs[eid]
            lost = self._held - kept
            self._offsets.forget(lost)
            self._held = set(assigned)
            self._gauges()
            if gone or lost:
                log.info("partitions %s moved away, %d unanswered requests left for their "
                         "next owner", sorted(tp.partition for tp in lost), len(gone))
            # Reading goes on where it was on partitions that stay: from their commit point it
            # would read again what was answered since (and is not in the skip list below).
            for tp in kept:
                if (at := self._offsets.read_up_to(tp)) is not None:
                    self._consumer.seek(tp, at)
            if self._txns is not None:
                self._skip = await self._txns.adopt(assigned, keep_parked=straight_back)
        except Exception as exc:
            self._adopt_error = exc
        self._adopted.set()

    # ---- read and admit --------------------------------------------------------------

    async def _consume_loop(self) -> None:
        assert self._consumer is not None
        while True:
            room = self.config.max_queued - len(self._jobs)
            if room <= 0:
                self._space.clear()
                await self._space.wait()
                continue
            records = await fair_getmany(self._consumer, room, timeout_ms=200)
            if self._txns is not None:
                fetched_in = self._generation()
                await self._adopted.wait()
                if fetched_in != self._generation():
                    continue  # read before a rebalance: read again from the new positions
                if self._adopt_error is not None:
                    raise self._adopt_error  # not fenced: answering could duplicate
                owned = self._consumer.assignment()
                records = {tp: msgs for tp, msgs in records.items() if tp in owned}
            if not self.ready.is_set() and self._consumer.assignment():
                self.ready.set()
            rejected = [a for tp, msgs in records.items() for msg in msgs
                        if (a := self._admit(tp, msg)) is not None]
            if rejected:
                self._deliver_soon(rejected)
            if self._new:
                self._arrived.set()

    def _admit(self, tp: TopicPartition, msg: ConsumerRecord) -> Answer | None:
        """Hand a valid request to the engine; return the answer for one that can't be served."""
        # The engine knows a request by its Kafka position: ids are the client's to choose.
        engine_id = f"{tp.topic}/{tp.partition}@{msg.offset}"
        if engine_id in self._jobs or self._offsets.answered(tp, msg.offset):
            return None  # fetched twice around a rebalance: it is running or answered already
        self._offsets.started(tp, msg.offset)
        if tp in self._skip and msg.offset in self._skip[tp]:  # answered, and committed
            self._offsets.finished(tp, msg.offset)
            return None
        try:
            request = decode_request(msg.value)
        except SchemaError as exc:
            return self._reject(tp, msg, exc)
        created = request.created_at or msg.timestamp / 1000
        if not self.config.shadow and (problem := reply_topic_problem(request.reply_to)):
            # Nowhere safe to answer: the dead letter is this request's one answer.
            return self._reject(tp, msg, SchemaError("reply_to", problem.partition(": ")[2]))
        if (not self.config.shadow and request.stream_to is not None
                and (problem := stream_topic_problem(request.stream_to, request.reply_to))):
            return self._reject(tp, msg, SchemaError("stream_to", problem.partition(": ")[2]))
        dest = self._destination(request.reply_to, msg)
        if (why := self._was_cancelled(request.id)) is not None:
            return Answer(tp, msg.offset, dest=dest, created=created,
                          result=Result.failure(request.id, request.model, ErrorCode.CANCELLED,
                                                f"cancelled: {why}"))
        try:
            admitted = admit(request, engine_id, self.config.deployment, self.engine,
                             chat_template=self.chat_template)
        except Refused as refusal:
            return Answer(tp, msg.offset, dest=dest, created=created,
                          result=Result.failure(request.id, request.model, refusal.code,
                                                refusal.message))
        job = self._jobs[engine_id] = Job(tp, msg.offset, request, created, dest)
        # A shadow's answers never reach users: it streams nothing.
        if request.stream_to is not None and not self.config.shadow:
            job.stream = RequestStream(request, self.config.deployment,
                                       f"{self._instance}:{next(self._runs)}",
                                       self.engine.tokenizer)
            if request.stream_to not in self._topics_ready:  # prepare it while prefilling
                self._outbox.put_nowait((request.stream_to, None))
        self._new.append(admitted)
        if request.deadline is not None:
            heapq.heappush(self._deadlines, (request.deadline, engine_id))
        return None

    def _reject(self, tp: TopicPartition, msg: ConsumerRecord, exc: SchemaError) -> Answer:
        log.warning("dead letter from %s[%d]@%d: %s", tp.topic, tp.partition, msg.offset, exc)
        self.metrics.dead_letters.labels(self.config.deployment, exc.field).inc()
        letter = DeadLetter(
            reason=str(exc), bad_field=exc.field, source_topic=tp.topic, partition=tp.partition,
            offset=msg.offset, component=f"worker:{self.config.deployment}",
            key=msg.key.decode(errors="replace") if msg.key else None,
            value=msg.value.decode(errors="replace") if msg.value is not None else None,
            timestamp=time.time())
        answer = Answer(tp, msg.offset, dead_letter=letter, created=msg.timestamp / 1000)
        if (address := salvage_reply_address(msg.value)) is not None:
            rid, model, reply_to = address
            answer.dest = self._destination(reply_to, msg)
            answer.result = Result.failure(rid, model, ErrorCode.INVALID_REQUEST, str(exc))
        return answer

    def _destination(self, reply_to: str, msg: ConsumerRecord) -> Destination:
        """A shadow worker answers only on its shadow-results topic, never to the client; a
        primary copies results of mirrored requests for the comparator."""
        headers = dict(msg.headers or ())
        if self.config.shadow:
            return Destination(shadow_results_topic(self.config.deployment),
                         headers=((PRIMARY_HEADER, headers.get(PRIMARY_HEADER, b"")),))
        if MIRRORED_HEADER in headers:
            return Destination(reply_to, (PRIMARY_RESULTS_TOPIC,),
                         ((PRODUCED_BY_HEADER, self.config.deployment.encode()),))
        return Destination(reply_to)

    # ---- execute ---------------------------------------------------------------------

    async def _serve_loop(self) -> None:
        """Step the engine while it has work; each step's finished requests are published at
        once while the next step computes."""
        while True:
            self._arrived.clear()  # before looking, so an arrival after the look wakes us
            if len(self._jobs) < self.config.max_queued:
                self._space.set()  # answers (or failures) made room: read on
            if self._delivery_error is not None:
                raise self._delivery_error  # the broker failed us, not the input
            if not self._new and not self.engine.has_work():
                if not self.engine.healthy:
                    raise EngineDown("engine reports unhealthy (a tensor-parallel rank failed)")
                try:
                    await asyncio.wait_for(self._arrived.wait(), _HEALTH_EVERY_S)
                except TimeoutError:
                    pass
                continue
            if not self._adopted.is_set():  # a rebalance is under way: hold the rows
                try:
                    await asyncio.wait_for(self._adopted.wait(), _HEALTH_EVERY_S)
                except TimeoutError:
                    pass
                continue
            async with self._engine_lock:
                if not self._adopted.is_set():
                    continue
                new, self._new = self._new, []
                expired = self._expired()
                start = time.time()
                for request in new:
                    self._jobs[request.id].added = start
                try:
                    out, refused = await asyncio.get_running_loop().run_in_executor(
                        self._engine_thread, self._step, new, expired)
                except EngineDown:
                    raise  # stop unanswered: the group's other replicas serve these requests
                except Exception as exc:  # a failed step must not kill the worker
                    log.exception("engine step failed; failing its %d requests", len(self._jobs))
                    self._deliver_soon(self._fail_all(f"inference failed: {exc}"))
                    continue
            now = time.time()
            self.metrics.inference.labels(self.config.deployment).observe(now - start)
            answers = [self._failed(eid, ErrorCode.DEADLINE_EXCEEDED,
                                    "deadline: passed before it finished") for eid in expired]
            answers += [self._failed(eid, ErrorCode.INVALID_REQUEST, why) for eid, why in refused]
            self._tokens_out(out, now)
            answers += [self._finished(c, now) for c in out.finished]
            self._deliver_soon([a for a in answers if a is not None])
            self.metrics.batch_size.labels(self.config.deployment).observe(
                len(out.new_tokens) or 1)
            self._gauges()

    def _tokens_out(self, out: StepOutput, now: float) -> None:
        """Token timings of the step, and the deltas of streaming rows: a row that ended this
        step (its request finished, or one sample of n > 1) gets its last delta, which names
        its finish reason, the moment it ends."""
        dep = self.config.deployment
        ends = self._stream_ends(out)
        for eid, entries in out.prompt_logprobs.items():  # before any sample's tokens
            job = self._jobs.get(eid)
            if job is not None and job.stream is not None:
                self._publish_delta(job, job.stream.prompt(entries))
        for row, tokens in out.new_tokens.items():
            eid, choice = sample_of(row)  # sample j > 0 of a request with n > 1: its own row
            job = self._jobs.get(eid)
            if job is None or not tokens:
                continue
            if not choice:  # token timings follow the first sample
                if job.first_token is None:
                    job.first_token = now
                    self.metrics.ttft.labels(dep).observe(now - job.created)
                elif job.last_token is not None:
                    self.metrics.itl.labels(dep).observe(now - job.last_token)
                job.last_token = now
            if job.stream is not None and (eid, choice) not in ends:
                self._publish_delta(job, job.stream.push(choice, tokens, out.logprobs.get(row)))
        last = {sample_of(row): (tokens, out.logprobs.get(row))  # an ending row's last token,
                for row, tokens in out.new_tokens.items()}      # when its end kept one
        for (eid, choice), (ids, text, reason) in ends.items():
            stream = self._jobs[eid].stream
            assert stream is not None
            tokens, logprob = last.get((eid, choice), ((), None))
            self._publish_delta(self._jobs[eid], stream.finish(choice, ids, text, reason,
                                                                tokens, logprob))

    def _stream_ends(self, out: StepOutput) -> dict[tuple[str, int], tuple[list[int], str, str]]:
        """(request id, choice) -> (output ids, text, finish reason) of the streaming rows
        that ended this step (not those that failed or were aborted: their result says so)."""
        ends: dict[tuple[str, int], tuple[list[int], str, str]] = {}
        samples = [(*sample_of(row), c.output_ids, c.text, c.finish_reason)
                   for row, c in out.ended.items()]
        for done in out.finished:
            samples += ([(done.id, c.index, c.output_ids, c.text, c.finish_reason)
                         for c in done.choices] if done.choices is not None else
                        [(done.id, 0, done.output_ids, done.text, done.finish_reason)])
        for eid, choice, ids, text, reason in samples:
            job = self._jobs.get(eid)
            if job is not None and job.stream is not None and reason in ("stop", "length"):
                ends[eid, choice] = (ids, text, reason)
        return ends

    def _publish_delta(self, job: Job, delta: Delta | None) -> None:
        if delta is not None:
            assert job.request.stream_to is not None
            self._outbox.put_nowait((job.request.stream_to, delta))

    def _step(self, new: list[EngineRequest], expired: list[str]
              ) -> tuple[StepOutput, list[tuple[str, str]]]:
        """In the engine's thread: add what arrived, drop what expired, run one step. Returns
        the step's output and the requests the engine refused (engine id, why)."""
        refused = []
        for request in new:
            try:
                self.engine.add(request)
            except ValueError as exc:  # admission checked already; the engine has the last word
                refused.append((request.id, str(exc)))
        for eid in expired:
            self.engine.abort(eid)
        start = time.perf_counter()
        out = self.engine.step()
        self.metrics.engine_step.labels(self.config.deployment).observe(
            time.perf_counter() - start)
        return out, refused

    def _expired(self) -> list[str]:
        """Engine ids whose deadline passed (checked before every step, not once per batch)."""
        now, expired = time.time(), []
        while self._deadlines and self._deadlines[0][0] < now:
            _, eid = heapq.heappop(self._deadlines)
            if eid in self._jobs:
                expired.append(eid)
        return expired

    def _fail_all(self, message: str) -> list[Answer]:
        """After a failed step the engine's rows are in doubt: answer and drop every one."""
        answers = []
        for eid in list(self._jobs):
            try:
                self.engine.abort(eid)
            except Exception:  # the engine is already broken; the answer still goes out
                log.exception("abort of %s failed", eid)
            answers.append(self._failed(eid, ErrorCode.INFERENCE_FAILED, message))
        return answers

    def _finished(self, done: Completion, now: float) -> Answer | None:
        job = self._jobs.get(done.id)
        if job is None:
            return None  # revoked while its step ran: the new owner answers it
        dep = self.config.deployment
        if done.finish_reason == "error":
            return self._failed(done.id, ErrorCode.INFERENCE_FAILED,
                                done.error or "inference failed")
        if done.finish_reason == "abort":
            return self._failed(done.id, ErrorCode.INFERENCE_FAILED, "aborted by the engine")
        del self._jobs[done.id]
        self.metrics.tokens_generated.labels(dep).inc(len(done.output_ids))
        self.metrics.prompt_tokens.labels(dep).inc(done.prompt_tokens)
        self.metrics.queue_wait.labels(dep).observe(max(0.0, job.added - job.created))
        self.metrics.e2e.labels(dep).observe(max(0.0, now - job.created))
        if job.first_token is not None and len(done.output_ids) > 1:
            self.metrics.tpot.labels(dep).observe(
                (now - job.first_token) / (len(done.output_ids) - 1))
        result = Result(
            id=job.request.id, model=dep, output_ids=done.output_ids, text=done.text,
            finish_reason="stop" if done.score is not None else done.finish_reason,  # type: ignore[arg-type]
            usage=Usage(done.prompt_tokens, completion_tokens(done)),
            timings=Timings(queued_ms=max(0.0, job.added - job.created) * 1000,
                            inference_ms=max(0.0, now - job.added) * 1000),
            score=done.score, **result_fields(done, self.engine.tokenizer))
        return Answer(job.tp, job.offset, result=result, dest=job.dest, created=job.created)

    def _failed(self, eid: str, code: ErrorCode, message: str) -> Answer:
        job = self._jobs.pop(eid)
        result = Result.failure(job.request.id, job.request.model, code, message)
        return Answer(job.tp, job.offset, result=result, dest=job.dest, created=job.created)

    def _gauges(self) -> None:
        stats = self.engine.stats()
        dep = self.config.deployment
        self.metrics.queue_depth.labels(dep).set(stats.waiting + len(self._new))
        self.metrics.running.labels(dep).set(stats.running)
        self.metrics.kv_cache_usage.labels(dep).set(stats.kv_cache_usage)

    # ---- streams and cancels ---------------------------------------------------------

    async def _stream_loop(self) -> None:
        """Publish deltas in the order they were made; a stream topic that cannot be written
        loses deltas, never the result (the caller's stream then ends with the result)."""
        assert self._publisher is not None
        while True:
            topic, delta = await self._outbox.get()
            if await self._publisher.send_delta(topic, delta):
                self.metrics.deltas.labels(self.config.deployment).inc()

    async def _cancel_loop(self) -> None:
        """Drop the rows of cancelled requests (at the next step boundary) and answer them;
        remember cancels of requests not read yet."""
        assert self._cancels is not None
        async for msg in self._cancels:
            try:
                cancel = decode_cancel(msg.value)
            except SchemaError as exc:  # every worker reads every cancel: one log line each
                log.warning("unreadable cancel at %s[%d]@%d: %s", msg.topic, msg.partition,
                            msg.offset, exc)
                continue
            if cancel.model not in (None, self.config.deployment):
                continue
            self._remember_cancel(cancel.id, cancel.reason)
            await self._cancel(cancel.id, cancel.reason)

    def _remember_cancel(self, request_id: str, reason: str) -> None:
        now = time.time()
        self._cancelled[request_id] = (now, reason)
        self._cancelled.move_to_end(request_id)
        while self._cancelled and (len(self._cancelled) > _CANCEL_MEMORY or next(
                iter(self._cancelled.values()))[0] < now - _CANCEL_MEMORY_S):
            self._cancelled.popitem(last=False)

    def _was_cancelled(self, request_id: str) -> str | None:
        """Why a request read now was cancelled before it arrived, or None."""
        when, reason = self._cancelled.get(request_id, (0.0, ""))
        return reason if when >= time.time() - _CANCEL_MEMORY_S else None

    async def _cancel(self, request_id: str, reason: str) -> None:
        async with self._engine_lock:  # between two steps
            eids = [eid for eid, job in self._jobs.items() if job.request.id == request_id]
            if not eids:
                return
            self._new = [r for r in self._new if r.id not in eids]
            answers = []
            for eid in eids:
                done = self.engine.abort(eid)
                job = self._jobs.pop(eid)
                generated = len(done.output_ids) if done is not None else 0
                prompt = done.prompt_tokens if done is not None else 0
                result = dataclasses.replace(  # what it used, for whoever bills it
                    Result.failure(job.request.id, job.request.model, ErrorCode.CANCELLED,
                                   f"cancelled: {reason}"), usage=Usage(prompt, generated))
                answers.append(Answer(job.tp, job.offset, result=result, dest=job.dest,
                                      created=job.created))
                self.metrics.cancelled.labels(self.config.deployment).inc()
                self.metrics.tokens_generated.labels(self.config.deployment).inc(generated)
        log.info("request %s cancelled (%s) after its rows produced %s tokens", request_id,
                 reason, [a.result.usage.completion_tokens for a in answers if a.result])
        self._deliver_soon(answers)
        self._gauges()

    # ---- publish and commit ----------------------------------------------------------

    def _deliver_soon(self, answers: list[Answer]) -> None:
        """Publish in the background: the engine keeps stepping while the broker acks."""
        if not answers:
            return
        task = asyncio.create_task(self._deliver(answers))
        self._deliveries.add(task)
        task.add_done_callback(self._delivery_done)

    def _delivery_done(self, task: asyncio.Task) -> None:
        self._deliveries.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._delivery_error = task.exception()
            self._arrived.set()  # the serve loop re-raises it

    async def _delivered(self) -> None:
        """Wait for the deliveries in flight, re-raising a failure."""
        if self._deliveries:
            await asyncio.gather(*list(self._deliveries))

    async def _deliver(self, answers: list[Answer]) -> None:
        """Publish every answer, wait for the broker's acks, then mark them committable (or,
        exactly-once, commit them with their offsets in one transaction per partition)."""
        assert self._publisher is not None
        if self._txns is not None:
            await self._txns.deliver(answers)
            await self._send_telemetry(answers)
            return
        acks = [ack for a in answers for ack in await self._publisher.send(a)]
        await asyncio.gather(*acks)
        await self._send_telemetry(answers)
        for answer in answers:
            self._offsets.finished(answer.tp, answer.offset)
        self._dirty.set()

    async def _commit_loop(self) -> None:
        """One commit at a time, covering every answer acknowledged since the last one."""
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            await self._commit()

    async def _send_telemetry(self, answers: list[Answer]) -> None:
        assert self._telemetry is not None
        await self._telemetry.send([
            (a.created if a.created is not None else time.time(),
             a.result.error.code.value if a.result.error is not None else None)
            for a in answers if a.result is not None])

    async def _commit(self) -> None:
        """The commit point: only offsets whose answers (and all before) are acknowledged."""
        assert self._consumer is not None
        if self._txns is not None:
            return  # committed inside each partition's transactions
        async with self._commit_lock:
            points = self._offsets.to_commit()
            if not points:
                return
            try:
                with self.metrics.commit_latency.labels(self.config.deployment).time():
                    await self._consumer.commit(points)
            except (CommitFailedError, IllegalStateError) as exc:
                # Lost the partitions in a rebalance: their new owner re-serves from the last
                # commit (a duplicate answer, never a lost one).
                log.warning("commit failed, partitions moved: %s", exc)
                return
            self._offsets.committed(points)
