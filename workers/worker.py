"""The worker: a thin Kafka loop around the batcher (decides) and the engine (executes).

read → admit (validate, tokenise) → batcher → engine → publish → commit. Offsets are
committed only after every answer of the offsets before them is acknowledged by the broker
(`OffsetTracker`), so killing a worker loses no request. Every message ends as exactly one
thing: a result on its `reply_to`, or a dead letter on `ferry.dlq` (plus an error result
when the bad message still says where to answer). A shadow candidate (`shadow=True`) answers
on its `ferry.shadow-results.<deployment>` instead, never to the client; a primary copies its
results of mirrored requests to `ferry.primary-results` for the comparator. Each delivered
batch also sends one telemetry record (latency and error per result) for canaries.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import (
    CommitFailedError, IllegalStateError, KafkaError, MessageSizeTooLargeError,
)
from aiokafka.structs import ConsumerRecord
from prometheus_client import CollectorRegistry, start_http_server

from schemas import (
    DLQ_TOPIC, RESULTS_TOPIC, DeadLetter, ErrorCode, Request, Result, SchemaError, Timings,
    Usage, batch_key,
    decode_request, encode, salvage_reply_address,
)
from schemas.topics import (
    MIRRORED_HEADER, PRIMARY_HEADER, PRIMARY_RESULTS_TOPIC, TELEMETRY_TOPIC,
    reply_topic_problem, shadow_results_topic,
)
from workers.batcher import Batcher
from workers.config import WorkerConfig
from workers.engine import Engine, EngineDown, GenerationInput, GenerationOutput, SamplingParams
from workers.metrics import WorkerMetrics
from workers.offsets import OffsetTracker
from workers.telemetry import TELEMETRY_PARTITIONS, TelemetrySender
from workers.topic_admin import ensure_topics

log = logging.getLogger("ferry.worker")

# Kafka's per-record framing on top of key and value; results are checked against the
# limit with this margin so the broker never has to reject one.
_RECORD_OVERHEAD = 512
# How often an idle worker checks that its engine (all its ranks) can still serve.
_HEALTH_EVERY_S = 1.0
# Longest one result may take to reach its reply topic (creating it included) before it is
# dead-lettered instead.
_REPLY_TIMEOUT_S = 10.0
# Longest a stopping worker waits on the broker for each shutdown step.
_SHUTDOWN_STEP_S = 15.0


@dataclass
class Job:
    """An admitted request waiting in the batcher."""

    tp: TopicPartition
    offset: int
    request: Request
    input_ids: list[int]     # [prompt_tokens]
    created: float           # unix seconds: producer's created_at, else the record timestamp
    dest: Destination


@dataclass(frozen=True)
class Destination:
    """Where a request's result goes: its reply topic, copies, and the headers they carry."""

    reply_to: str | None
    also: tuple[str, ...] = ()
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass
class Answer:
    """What one consumed message becomes: a result, a dead letter, or both."""

    tp: TopicPartition
    offset: int
    result: Result | None = None
    dest: Destination = Destination(None)
    dead_letter: DeadLetter | None = None
    created: float | None = None  # unix seconds the request was made, for telemetry


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        if revoked:
            await self._worker._release(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        log.info("assigned partitions %s", sorted(tp.partition for tp in assigned))


class Worker:
    def __init__(self, config: WorkerConfig, engine: Engine,
                 registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.engine = engine
        self.registry = registry or CollectorRegistry()
        self.metrics = WorkerMetrics.create(self.registry)
        self._batcher: Batcher[Job] = Batcher(config.max_batch, config.max_wait_ms / 1000)
        self._offsets = OffsetTracker()
        self._arrived = asyncio.Event()   # the batcher got work
        self._space = asyncio.Event()     # the batcher has room again
        self._batch_lock = asyncio.Lock()  # held while a batch runs and is delivered
        self._commit_lock = asyncio.Lock()
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self.ready = asyncio.Event()      # set once the consumer has joined the group
        self._topics_ready: set[str] = set()
        self._delivery: asyncio.Task | None = None  # the last batch's publish-and-commit
        self._telemetry: TelemetrySender | None = None

    # ---- lifecycle -------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until cancelled; a failure in either loop stops the worker loudly."""
        log.info("worker starting: %s", self.config.describe())
        if self.config.metrics_port is not None:
            start_http_server(self.config.metrics_port, registry=self.registry)
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.config.bootstrap, acks="all", enable_idempotence=True,
            max_request_size=self.config.max_message_bytes + _RECORD_OVERHEAD, linger_ms=2)
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.config.bootstrap, group_id=self.config.group,
            enable_auto_commit=False, auto_offset_reset="earliest",  # serve what came first
            max_poll_interval_ms=600_000)
        # Everything from here on is inside the try: a worker stopped while it is still
        # starting leaves the group at once instead of lingering until its session expires.
        try:
            await self._start_clients()
            loops = [asyncio.create_task(self._consume_loop(), name="consume"),
                     asyncio.create_task(self._serve_loop(), name="serve")]
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
                                                    TELEMETRY_TOPIC: TELEMETRY_PARTITIONS})
        self._topics_ready.update({DLQ_TOPIC, RESULTS_TOPIC, PRIMARY_RESULTS_TOPIC, *answers_to})
        self._consumer.subscribe([self.config.topic], listener=_Rebalance(self))
        await self._producer.start()
        await self._consumer.start()
        self._telemetry = TelemetrySender(self._producer, self.config.deployment)

    async def _shutdown(self) -> None:
        # Queued requests are not answered here: their offsets stay uncommitted, so the
        # group's next owner of the partition serves them.
        assert self._producer is not None and self._consumer is not None
        try:
            # Bounded: with the group coordinator unreachable a commit retries for ever, and
            # what stays uncommitted is only served again, never lost.
            async with asyncio.timeout(_SHUTDOWN_STEP_S):
                async with self._batch_lock:
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
            await self._producer.stop()
            log.info("worker stopped: deployment=%s", self.config.deployment)

    async def _release(self, revoked: set[TopicPartition]) -> None:
        dropped = self._batcher.drop(lambda job: job.tp in revoked)
        async with self._batch_lock:  # let a running batch finish and commit first
            await self._delivered()
            await self._commit()
        self._offsets.forget(revoked)
        self.metrics.queue_depth.labels(self.config.deployment).set(len(self._batcher))
        log.info("revoked partitions %s, %d queued requests left for their next owner",
                 sorted(tp.partition for tp in revoked), len(dropped))

    # ---- read and admit --------------------------------------------------------------

    async def _consume_loop(self) -> None:
        assert self._consumer is not None
        while True:
            room = self.config.max_queued - len(self._batcher)
            if room <= 0:
                self._space.clear()
                await self._space.wait()
                continue
            records = await self._consumer.getmany(timeout_ms=200, max_records=room)
            if not self.ready.is_set() and self._consumer.assignment():
                self.ready.set()
            rejected = [a for tp, msgs in records.items() for msg in msgs
                        if (a := self._admit(tp, msg)) is not None]
            if rejected:
                await self._deliver(rejected)
            if len(self._batcher):
                self._arrived.set()

    def _admit(self, tp: TopicPartition, msg: ConsumerRecord) -> Answer | None:
        """Queue a valid request; return the answer for one that can't be served."""
        self._offsets.started(tp, msg.offset)
        try:
            request = decode_request(msg.value)
        except SchemaError as exc:
            return self._reject(tp, msg, exc)
        created = request.created_at or msg.timestamp / 1000
        if not self.config.shadow and (problem := reply_topic_problem(request.reply_to)):
            # Nowhere safe to answer: the dead letter is this request's one answer.
            return self._reject(tp, msg, SchemaError("reply_to", problem.partition(": ")[2]))
        dest = self._destination(request.reply_to, msg)
        try:
            input_ids = self._validate(request)
        except _Refused as refusal:
            return Answer(tp, msg.offset, dest=dest, created=created,
                          result=Result.failure(request.id, request.model, refusal.code,
                                                refusal.message))
        key = request.batch_key or (msg.key.decode(errors="replace") if msg.key else None)
        key = key or batch_key(request, self.config.deployment)
        self._batcher.add(key, Job(tp, msg.offset, request, input_ids, created, dest),
                          time.monotonic())
        self.metrics.queue_depth.labels(self.config.deployment).set(len(self._batcher))
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
                         (("ferry-deployment", self.config.deployment.encode()),))
        return Destination(reply_to)

    def _validate(self, request: Request) -> list[int]:
        if request.model != self.config.deployment:
            raise _Refused(ErrorCode.UNKNOWN_MODEL,
                           f"model: {request.model!r} is not served here "
                           f"(this is {self.config.deployment!r})")
        if request.deadline is not None and request.deadline < time.time():
            raise _Refused(ErrorCode.DEADLINE_EXCEEDED, "deadline: passed before it was read")
        if request.stop and self.engine.tokenizer is None:
            raise _Refused(ErrorCode.INVALID_REQUEST,
                           "stop: this deployment has no tokenizer to match stop text against")
        if request.score_ids is not None:
            self._check_scoring(request.score_ids)
        if request.input_ids is not None:
            vocab = self.engine.config.vocab_size
            if (bad := next((t for t in request.input_ids if t >= vocab), None)) is not None:
                raise _Refused(ErrorCode.INVALID_REQUEST,
                               f"input_ids: token {bad} is outside the vocabulary ({vocab})")
            input_ids = request.input_ids
        else:
            try:
                input_ids = self.engine.encode(request.prompt or "")
            except ValueError as exc:
                raise _Refused(ErrorCode.INVALID_REQUEST, f"prompt: {exc}") from None
            if not input_ids:
                raise _Refused(ErrorCode.INVALID_REQUEST, "prompt: encodes to no tokens")
        extra = len(request.score_ids) if request.score_ids else request.max_new_tokens
        if len(input_ids) + extra > self.engine.max_context:
            raise _Refused(ErrorCode.PROMPT_TOO_LONG,
                           f"prompt: {len(input_ids)} tokens + max_new_tokens "
                           f"{request.max_new_tokens} exceed the context of "
                           f"{self.engine.max_context}")
        return input_ids

    def _check_scoring(self, score_ids: list[int]) -> None:
        if not isinstance(self.engine, Engine):
            raise _Refused(ErrorCode.INVALID_REQUEST,
                           "score_ids: scoring is not supported by a sharded deployment yet")
        vocab = self.engine.config.vocab_size
        if (bad := next((t for t in score_ids if t >= vocab), None)) is not None:
            raise _Refused(ErrorCode.INVALID_REQUEST,
                           f"score_ids: token {bad} is outside the vocabulary ({vocab})")

    # ---- batch and execute -----------------------------------------------------------

    async def _serve_loop(self) -> None:
        while True:
            self._arrived.clear()  # before looking, so an arrival after the look wakes us
            if self._delivery is not None and self._delivery.done():
                await self._delivered()  # surfaces a failed delivery even when idle
            now = time.monotonic()
            picked = self._batcher.next_batch(now)
            if picked is None:
                if not self.engine.healthy:
                    raise EngineDown("engine reports unhealthy (a tensor-parallel rank failed)")
                ready_in = self._batcher.seconds_until_ready(now)
                wait = _HEALTH_EVERY_S if ready_in is None else min(ready_in, _HEALTH_EVERY_S)
                try:
                    await asyncio.wait_for(self._arrived.wait(), wait)
                except TimeoutError:
                    pass
                continue
            self._space.set()
            async with self._batch_lock:
                answers = await self._run_batch(picked[1])
                # Publish this batch while the next one computes; one delivery in flight.
                await self._delivered()
                self._delivery = asyncio.create_task(self._deliver(answers))
                self._delivery.add_done_callback(lambda _: self._arrived.set())

    async def _delivered(self) -> None:
        """Wait for the batch delivery in flight, re-raising its failure."""
        if self._delivery is not None:
            delivery, self._delivery = self._delivery, None
            await delivery

    async def _run_batch(self, jobs: list[Job]) -> list[Answer]:
        dep = self.config.deployment
        self.metrics.queue_depth.labels(dep).set(len(self._batcher))
        start = time.time()
        answers, live = [], []
        for job in jobs:
            if job.request.deadline is not None and job.request.deadline < start:
                answers.append(self._failed(job, ErrorCode.DEADLINE_EXCEEDED,
                                            "deadline: passed while queued"))
            else:
                live.append(job)
        if not live:
            return answers
        scoring = [job for job in live if job.request.score_ids is not None]
        live = [job for job in live if job.request.score_ids is None]
        if scoring:
            answers += await self._score(scoring)
        if not live:
            return answers
        inputs = [GenerationInput(job.input_ids, _sampling(job.request)) for job in live]
        try:
            outputs = await asyncio.to_thread(self.engine.generate, inputs)
        except EngineDown:
            raise  # stop unanswered: the group's other replicas serve these requests
        except Exception as exc:  # one bad batch must not kill the worker
            log.exception("batch of %d failed", len(live))
            return answers + [self._failed(j, ErrorCode.INFERENCE_FAILED, str(exc)) for j in live]
        elapsed = time.time() - start
        self.metrics.batch_size.labels(dep).observe(len(live))
        self.metrics.inference.labels(dep).observe(elapsed)
        for job, out in zip(live, outputs):
            self.metrics.queue_wait.labels(dep).observe(max(0.0, start - job.created))
            answers.append(self._succeeded(job, out, start, elapsed))
        return answers

    async def _score(self, jobs: list[Job]) -> list[Answer]:
        """Teacher-forced scores, one forward pass each (the comparator's quality signal)."""
        assert isinstance(self.engine, Engine)
        answers = []
        for job in jobs:
            start = time.time()
            target = job.request.score_ids or []
            try:
                score = await asyncio.to_thread(self.engine.score, job.input_ids, target)
            except Exception as exc:  # one bad request must not kill the worker
                answers.append(self._failed(job, ErrorCode.INFERENCE_FAILED, str(exc)))
                continue
            elapsed = time.time() - start
            result = Result(id=job.request.id, model=self.config.deployment,
                            finish_reason="stop", score=score,
                            usage=Usage(len(job.input_ids) + len(target), 0),
                            timings=Timings(max(0.0, start - job.created) * 1000, elapsed * 1000))
            answers.append(Answer(job.tp, job.offset, result=result, dest=job.dest,
                                  created=job.created))
        return answers

    def _succeeded(self, job: Job, out: GenerationOutput, start: float, elapsed: float) -> Answer:
        dep = self.config.deployment
        self.metrics.tokens_generated.labels(dep).inc(len(out.output_ids))
        self.metrics.prompt_tokens.labels(dep).inc(out.prompt_tokens)
        result = Result(
            id=job.request.id, model=dep, output_ids=out.output_ids, text=out.text,
            finish_reason=out.finish_reason,  # type: ignore[arg-type]
            usage=Usage(out.prompt_tokens, len(out.output_ids)),
            timings=Timings(queued_ms=max(0.0, start - job.created) * 1000,
                            inference_ms=elapsed * 1000))
        return Answer(job.tp, job.offset, result=result, dest=job.dest, created=job.created)

    def _failed(self, job: Job, code: ErrorCode, message: str) -> Answer:
        result = Result.failure(job.request.id, job.request.model, code, message)
        return Answer(job.tp, job.offset, result=result, dest=job.dest, created=job.created)

    # ---- publish and commit ----------------------------------------------------------

    async def _deliver(self, answers: list[Answer]) -> None:
        """Publish every answer, wait for the broker's acks, then commit what is complete."""
        acks = [ack for a in answers for ack in await self._send(a)]
        await asyncio.gather(*acks)
        await self._send_telemetry(answers)
        for answer in answers:
            self._offsets.finished(answer.tp, answer.offset)
        await self._commit()

    async def _send_telemetry(self, answers: list[Answer]) -> None:
        assert self._telemetry is not None
        await self._telemetry.send([
            (a.created if a.created is not None else time.time(),
             a.result.error.code.value if a.result.error is not None else None)
            for a in answers if a.result is not None])

    async def _send(self, answer: Answer) -> list[asyncio.Future]:
        assert self._producer is not None
        acks = []
        if answer.dead_letter is not None:
            acks.append(await self._producer.send(DLQ_TOPIC, encode(answer.dead_letter)))
        if answer.result is not None and answer.dest.reply_to is not None:
            for topic in (answer.dest.reply_to, *answer.dest.also):
                acks.append(asyncio.ensure_future(self._send_result(answer, topic)))
        return acks

    async def _send_result(self, answer: Answer, reply_to: str) -> None:
        """Publish the answer's result, or a dead letter saying why it could not be: a reply
        topic that the broker refuses must not stop the worker nor hold its partition."""
        try:
            async with asyncio.timeout(_REPLY_TIMEOUT_S):
                await self._publish_result(answer, reply_to)
        except (KafkaError, TimeoutError) as exc:
            await self._undeliverable(answer, reply_to, exc)

    async def _undeliverable(self, answer: Answer, reply_to: str, exc: BaseException) -> None:
        assert self._producer is not None and answer.result is not None
        reason = f"reply_to: result not delivered to {reply_to!r}: {exc!r}"
        log.warning("dead letter from %s[%d]@%d: %s", answer.tp.topic, answer.tp.partition,
                    answer.offset, reason)
        self.metrics.dead_letters.labels(self.config.deployment, "reply_to").inc()
        letter = DeadLetter(
            reason=reason, bad_field="reply_to", source_topic=answer.tp.topic,
            partition=answer.tp.partition, offset=answer.offset,
            component=f"worker:{self.config.deployment}", key=answer.result.id,
            value=encode(answer.result).decode(), timestamp=time.time())
        # A DLQ that cannot be written is the broker's failure, not the input's: raise.
        await (await self._producer.send(DLQ_TOPIC, encode(letter)))

    async def _publish_result(self, answer: Answer, reply_to: str) -> None:
        """Publish the answer's result; one replaced as too large is kept on the answer, so
        telemetry reports what was sent."""
        assert self._producer is not None and answer.result is not None
        result = answer.result
        if reply_to not in self._topics_ready:
            # Create a new reply topic and wait for its leaders: a record sent to a topic
            # that the broker auto-creates can sit leaderless until it expires.
            await ensure_topics(self.config.bootstrap, {reply_to: self.config.partitions})
            self._topics_ready.add(reply_to)
        value, key = encode(result), result.id.encode()
        # Error results are small and bounded, so only a success can be over the limit.
        if result.error is None and len(value) + len(key) > self.config.max_message_bytes:
            result = answer.result = self._too_large(result, len(value))
            value = encode(result)
        headers = list(answer.dest.headers) or None
        try:
            await (await self._producer.send(reply_to, value, key=key, headers=headers))
        except MessageSizeTooLargeError:  # the topic's own limit is below ours
            result = answer.result = self._too_large(result, len(value))
            await (await self._producer.send(reply_to, encode(result), key=key, headers=headers))
        if reply_to == answer.dest.reply_to:  # copies are not counted twice
            self._count(result)

    def _too_large(self, result: Result, size: int) -> Result:
        log.warning("result %s is %d bytes, over the message limit", result.id, size)
        return Result.failure(
            result.id, result.model, ErrorCode.RESULT_TOO_LARGE,
            f"result: {size} bytes exceed the message limit of {self.config.max_message_bytes}; "
            "lower max_new_tokens")

    def _count(self, result: Result) -> None:
        dep = self.config.deployment
        self.metrics.results.labels(dep, result.finish_reason).inc()
        if result.error is not None:
            self.metrics.errors.labels(dep, result.error.code.value).inc()

    async def _commit(self) -> None:
        """The commit point: only offsets whose answers (and all before) are acknowledged."""
        assert self._consumer is not None
        async with self._commit_lock:
            points = self._offsets.to_commit()
            if not points:
                return
            try:
                await self._consumer.commit(points)
            except (CommitFailedError, IllegalStateError) as exc:
                # Lost the partitions in a rebalance: their new owner re-serves from the last
                # commit (a duplicate answer, never a lost one).
                log.warning("commit failed, partitions moved: %s", exc)
                return
            self._offsets.committed(points)


class _Refused(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def _sampling(request: Request) -> SamplingParams:
    return SamplingParams(max_new_tokens=request.max_new_tokens, temperature=request.temperature,
                          top_p=request.top_p, seed=request.seed, stop=tuple(request.stop))
