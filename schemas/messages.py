"""Request, result, delta, cancel and dead-letter records: the wire contract of Ferry's
request path."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from schemas.chat import ChatMessage
from schemas.codec import decode
from schemas.errors import ErrorCode, SchemaError
from schemas.fields import from_dict, spec
from schemas.topics import reply_topic_problem

SCHEMA_VERSION = 1
DEFAULT_REPLY_TO = "ferry.results"
TOPIC_PATTERN = r"^[a-zA-Z0-9._-]{1,249}$"  # anchored: JSON Schema patterns search
MAX_CONTEXT_TOKENS = 1 << 20
REST_OF_CONTEXT = 0  # max_new_tokens: as many as the model's context leaves after the prompt

FinishReason = Literal["stop", "length", "error"]
MAX_LOGIT_BIAS = 1024  # entries of one request's logit_bias


MAX_LOGPROBS = 20  # top alternatives per token


@dataclass(frozen=True)
class TopLogprob:
    """One of the most likely tokens at a position."""

    token_id: int = field(metadata=spec("Token id.", minimum=0))
    logprob: float = field(metadata=spec("Its log-probability (-9999 stands for -inf)."))
    text: str | None = field(default=None, metadata=spec(
        "The token decoded alone (unset without a tokenizer; a token that is part of a UTF-8 "
        "character decodes to U+FFFD)."))


@dataclass(frozen=True)
class TokenLogprob:
    """A generated (or prompt) token's log-probability and the top alternatives at its
    position, under the model's raw distribution (before penalties, biases, temperature and
    cuts; vLLM's default)."""

    token_id: int = field(metadata=spec("Token id.", minimum=0))
    logprob: float = field(metadata=spec("Its log-probability (-9999 stands for -inf)."))
    text: str | None = field(default=None, metadata=spec("The token decoded alone."))
    top: list[TopLogprob] = field(default_factory=list, metadata=spec(
        "The most likely tokens at this position, most likely first [logprobs]."))


MAX_SAMPLES = 128  # n and best_of


@dataclass(frozen=True)
class Choice:
    """One sample of a request with n > 1 (or best_of)."""

    index: int = field(metadata=spec("0, 1, ... n - 1 (with best_of: most likely first).",
                                     minimum=0))
    output_ids: list[int] = field(default_factory=list, metadata=spec(
        "Its generated token ids."))
    text: str = field(default="", metadata=spec("Its text (empty without a tokenizer)."))
    finish_reason: Literal["stop", "length"] = field(default="length", metadata=spec(
        "stop: end-of-sequence, a stop token or string; length: max_new_tokens."))
    logprobs: list[TokenLogprob] | None = field(default=None, metadata=spec(
        "If the request asked (logprobs): one entry per output token."))


@dataclass(frozen=True)
class LogitBias:
    """One entry of `Request.logit_bias`."""

    token: int = field(metadata=spec("Token id (checked against the model's vocabulary).",
                                     minimum=0))
    bias: float = field(metadata=spec("Added to the token's logit before sampling; -100 bans "
                                      "it, 100 all but forces it.", minimum=-100.0,
                                      maximum=100.0))


@dataclass(frozen=True)
class Request:
    """A generation request, posted to `ferry.requests.<deployment>` keyed by its batch key."""

    id: str = field(metadata=spec("Unique request id; the result is keyed by it.",
                                  minLength=1, maxLength=256))
    model: str = field(metadata=spec("Deployment (or, through the router, alias) to run on.",
                                     minLength=1, maxLength=200))
    prompt: str | None = field(default=None, metadata=spec(
        "Text prompt; exactly one of prompt, input_ids and messages is set."))
    input_ids: list[int] | None = field(default=None, metadata=spec(
        "Token ids of the prompt [prompt_tokens].", items={"minimum": 0}))
    messages: list[ChatMessage] | None = field(default=None, metadata=spec(
        "Chat messages (OpenAI's shape); the worker renders them into the prompt with its "
        "model's chat template and the generation prompt, as transformers' "
        "apply_chat_template does. A deployment without a template answers "
        "invalid_request.", minItems=1))
    max_new_tokens: int = field(default=16, metadata=spec(
        "Most tokens to generate; 0 = the rest of the model's context after the prompt "
        "(the OpenAI gateway's default for chat, as vLLM's).", minimum=0,
        maximum=MAX_CONTEXT_TOKENS))
    temperature: float = field(default=0.0, metadata=spec(
        "0 = greedy; above 0 samples from softmax(logits / temperature).",
        minimum=0.0, maximum=100.0))
    top_p: float = field(default=1.0, metadata=spec(
        "Nucleus sampling mass.", exclusiveMinimum=0.0, maximum=1.0))
    top_k: int = field(default=0, metadata=spec(
        "Sample among the k most likely tokens only; 0 = off.", minimum=0,
        maximum=MAX_CONTEXT_TOKENS))
    min_p: float = field(default=0.0, metadata=spec(
        "Drop tokens whose probability is below min_p times the top token's (after "
        "temperature); 0 = off.", minimum=0.0, maximum=1.0))
    presence_penalty: float = field(default=0.0, metadata=spec(
        "OpenAI's: subtracted from the logit of every token the completion already holds.",
        minimum=-2.0, maximum=2.0))
    frequency_penalty: float = field(default=0.0, metadata=spec(
        "OpenAI's: subtracted from a token's logit once per time the completion holds it.",
        minimum=-2.0, maximum=2.0))
    repetition_penalty: float = field(default=1.0, metadata=spec(
        "transformers': the logit of every token in the prompt or completion is divided by "
        "it when positive, multiplied when negative; 1 = off.", exclusiveMinimum=0.0,
        maximum=100.0))
    logit_bias: list[LogitBias] = field(default_factory=list, metadata=spec(
        "Biases added to token logits (greedy rows too).", maxItems=MAX_LOGIT_BIAS))
    stop_token_ids: list[int] = field(default_factory=list, metadata=spec(
        "Token ids that end the completion (finish_reason stop) like end-of-sequence; the "
        "stop token is not part of the output.", maxItems=256, items={"minimum": 0}))
    min_tokens: int = field(default=0, metadata=spec(
        "End-of-sequence and stop_token_ids cannot be generated before this many tokens "
        "(stop strings still apply); at most max_new_tokens.", minimum=0,
        maximum=MAX_CONTEXT_TOKENS))
    ignore_eos: bool = field(default=False, metadata=spec(
        "Keep generating past end-of-sequence tokens (they are output like any other)."))
    logprobs: int | None = field(default=None, metadata=spec(
        "Return every generated token's log-probability and this many top alternatives "
        "(0..20); unset: none.", minimum=0, maximum=MAX_LOGPROBS))
    prompt_logprobs: int | None = field(default=None, metadata=spec(
        "The same for the prompt's tokens (the first has none); computes the whole prompt "
        "(no prefix-cache hits).", minimum=0, maximum=MAX_LOGPROBS))
    n: int = field(default=1, metadata=spec(
        "Samples to return (Result.choices); they share one prefill of the prompt. Streamed, "
        "each sample's deltas carry its index (Delta.choice).", minimum=1,
        maximum=MAX_SAMPLES))
    best_of: int | None = field(default=None, metadata=spec(
        "Samples to draw (>= n); the n with the highest cumulative log-probability (raw "
        "model) are returned, most likely first. Needs stream_to unset (which samples are "
        "returned is known only at the end).", minimum=1, maximum=MAX_SAMPLES))
    seed: int | None = field(default=None, metadata=spec(
        "Sampling seed: the same seed gives the same tokens whatever the batch (with n > 1, "
        "sample 0 uses it and sample j a seed derived from (seed, j)).",
        minimum=0, maximum=2**63 - 1))
    stop: list[str] = field(default_factory=list, metadata=spec(
        "Stop sequences; the text ends before the first one found.",
        maxItems=16, items={"minLength": 1, "maxLength": 256}))
    deadline: float | None = field(default=None, metadata=spec(
        "Unix time (seconds) after which the request is answered with deadline_exceeded.",
        minimum=0.0))
    reply_to: str = field(default=DEFAULT_REPLY_TO, metadata=spec(
        "Topic the result is published to, keyed by request id: ferry.results, a "
        "ferry.replies.* topic, or a topic of the producer's own outside ferry.* (a request "
        "naming another internal topic is dead-lettered, never answered there).",
        pattern=TOPIC_PATTERN))
    stream_to: str | None = field(default=None, metadata=spec(
        "Stream: while the request decodes, `Delta` records (keyed by request id) carry its "
        "new tokens and text to this topic; the result on reply_to stays the answer of "
        "record. ferry.deltas, a ferry.replies.* topic or one of the producer's own; never "
        "reply_to itself (results may be transactional, deltas never wait on a transaction). "
        "Unset: no deltas.", pattern=TOPIC_PATTERN))
    batch_key: str | None = field(default=None, metadata=spec(
        "Kafka key on the deployment's topic: equal keys land on one partition, hence one "
        "replica and its prefix cache. Computed when absent: the deployment and a hash of "
        "the prompt's first 256 tokens (any requests of a deployment may share a running "
        "batch, whatever their lengths and sampling).", maxLength=256))
    created_at: float | None = field(default=None, metadata=spec(
        "Unix time (seconds) the producer created the request; used for queue timing.",
        minimum=0.0))
    score_ids: list[int] | None = field(default=None, metadata=spec(
        "Teacher-forced scoring: instead of generating, the result's score is the model's "
        "mean log-probability per token of these ids following the prompt [score_tokens].",
        items={"minimum": 0}))
    schema_version: int = field(default=SCHEMA_VERSION, metadata=spec(
        "Version of this schema.", minimum=1, maximum=SCHEMA_VERSION))

    def __post_init__(self) -> None:
        if [self.prompt, self.input_ids, self.messages].count(None) != 2:
            raise SchemaError("prompt", "exactly one of prompt, input_ids and messages must "
                                        "be set")
        if self.messages is not None and not self.messages:
            raise SchemaError("messages", "must not be empty")
        if self.input_ids is not None and not self.input_ids:
            raise SchemaError("input_ids", "must not be empty")
        if self.score_ids is not None and not self.score_ids:
            raise SchemaError("score_ids", "must not be empty")
        if self.best_of is not None and self.best_of < self.n:
            raise SchemaError("best_of", f"must be >= n ({self.n}), got {self.best_of}")
        if (self.best_of or 1) > 1 and self.stream_to is not None:
            raise SchemaError("best_of", "a streamed request (stream_to) returns every sample "
                                         "it draws, in the order drawn: leave best_of unset")
        if self.max_new_tokens != REST_OF_CONTEXT and self.min_tokens > self.max_new_tokens:
            raise SchemaError("min_tokens", f"must be <= max_new_tokens "
                                            f"({self.max_new_tokens}), got {self.min_tokens}")

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = field(metadata=spec("Tokens in the prompt.", minimum=0))
    completion_tokens: int = field(metadata=spec("Tokens generated.", minimum=0))


@dataclass(frozen=True)
class Timings:
    queued_ms: float = field(metadata=spec(
        "From the request's creation (or its append to Kafka) to the start of its batch."))
    inference_ms: float = field(metadata=spec("Model time of the batch that served it."))


@dataclass(frozen=True)
class ErrorInfo:
    code: ErrorCode = field(metadata=spec("Machine-readable error code."))
    message: str = field(metadata=spec("What went wrong, naming the field where one is to blame."))
    retry_after_s: float | None = field(default=None, metadata=spec(
        "Set on quota_exceeded and overloaded: seconds after which a retry can succeed.",
        minimum=0.0))


@dataclass(frozen=True)
class Result:
    """The one answer to a request: generated tokens, or an error that says why."""

    id: str = field(metadata=spec("Id of the request this answers.", minLength=1))
    model: str = field(metadata=spec("Deployment that produced the answer (or was asked)."))
    output_ids: list[int] = field(default_factory=list, metadata=spec(
        "Generated token ids [completion_tokens]."))
    text: str = field(default="", metadata=spec("Generated text (empty without a tokenizer)."))
    finish_reason: FinishReason = field(default="length", metadata=spec(
        "stop: end-of-sequence or stop string; length: max_new_tokens; error: see error."))
    usage: Usage = field(default_factory=lambda: Usage(0, 0), metadata=spec("Token counts."))
    timings: Timings = field(default_factory=lambda: Timings(0.0, 0.0), metadata=spec(
        "Where the time went."))
    error: ErrorInfo | None = field(default=None, metadata=spec("Set when the request failed."))
    score: float | None = field(default=None, metadata=spec(
        "For a scoring request (score_ids): mean log-probability per scored token."))
    logprobs: list[TokenLogprob] | None = field(default=None, metadata=spec(
        "If the request asked (logprobs): one entry per output token [completion_tokens]."))
    prompt_logprobs: list[TokenLogprob | None] | None = field(default=None, metadata=spec(
        "If the request asked (prompt_logprobs): one entry per prompt token, the first null "
        "[prompt_tokens]."))
    choices: list[Choice] | None = field(default=None, metadata=spec(
        "With n > 1 (or best_of): the n samples; output_ids, text, finish_reason and "
        "logprobs above are choices[0]'s, usage counts the tokens of all n."))
    schema_version: int = field(default=SCHEMA_VERSION, metadata=spec(
        "Version of this schema.", minimum=1))

    @classmethod
    def failure(cls, request_id: str, model: str, code: ErrorCode, message: str,
                retry_after_s: float | None = None) -> Result:
        return cls(id=request_id, model=model, finish_reason="error",
                   error=ErrorInfo(code=code, message=message, retry_after_s=retry_after_s))


@dataclass(frozen=True)
class DeadLetter:
    """A message no component could process, with where it came from and why."""

    reason: str = field(metadata=spec("Why the message was rejected."))
    bad_field: str = field(metadata=spec('The offending field ("$" = the whole message).'))
    source_topic: str = field(metadata=spec("Topic the message was read from."))
    partition: int = field(metadata=spec("Partition it was read from."))
    offset: int = field(metadata=spec("Its offset there."))
    component: str = field(metadata=spec("Which component rejected it (e.g. worker:NAME)."))
    key: str | None = field(default=None, metadata=spec("Message key, as UTF-8 (replaced)."))
    value: str | None = field(default=None, metadata=spec(
        "Message value, as UTF-8 (undecodable bytes replaced)."))
    timestamp: float = field(default=0.0, metadata=spec("Unix time of the rejection."))
    schema_version: int = field(default=SCHEMA_VERSION, metadata=spec("Version of this schema."))


@dataclass(frozen=True)
class Delta:
    """New tokens of a streaming request, published to its `stream_to` after each engine step.

    Deltas of one source (one worker's run of the request) arrive in `seq` order; text is
    never cut inside a UTF-8 character, and text that a stop string could still remove is
    held back, so a source's deltas concatenate to a prefix of the result's text (and, for a
    request with n > 1, one choice's deltas to a prefix of Result.choices[choice]). A request
    served twice (a worker died, a retry) streams again from seq 0 under another source."""

    id: str = field(metadata=spec("Id of the request.", minLength=1))
    model: str = field(metadata=spec("Deployment producing it."))
    source: str = field(metadata=spec(
        "This run of the request (worker instance and admission); seq counts per source.",
        minLength=1))
    seq: int = field(metadata=spec("0, 1, 2, ... per source.", minimum=0))
    index: int = field(metadata=spec(
        "Completion tokens (of this choice) before this delta's first token.", minimum=0))
    token_ids: list[int] = field(default_factory=list, metadata=spec(
        "New completion token ids [delta_tokens]."))
    text: str = field(default="", metadata=spec("Their text (empty without a tokenizer)."))
    choice: int = field(default=0, metadata=spec(
        "Which sample of a request with n > 1 (its index in Result.choices); 0 otherwise. "
        "Each sample streams on its own: seq and index count per source and choice.",
        minimum=0, maximum=MAX_SAMPLES - 1))
    logprobs: list[TokenLogprob] | None = field(default=None, metadata=spec(
        "If the request asked (logprobs): one entry per token of token_ids [delta_tokens]."))
    prompt_logprobs: list[TokenLogprob | None] | None = field(default=None, metadata=spec(
        "If the request asked (prompt_logprobs): the prompt's, as in Result.prompt_logprobs "
        "(the first null), in a delta of its own with no tokens: choice 0's first, published "
        "before any sample's tokens."))
    finish_reason: Literal["stop", "length"] | None = field(default=None, metadata=spec(
        "Set on the last delta of a choice (of this source), the moment that choice stops: "
        "stop (end-of-sequence, a stop token or string) or length (max_new_tokens), as "
        "Result.choices[choice].finish_reason; it flushes any text held back, so the "
        "choice's deltas then concatenate to its whole text (it may carry no tokens). A "
        "choice of n > 1 that ends before the others is known done before the result."))
    schema_version: int = field(default=SCHEMA_VERSION, metadata=spec(
        "Version of this schema.", minimum=1))

    def to_dict(self) -> dict[str, Any]:
        """The record as published: unset fields (no logprobs asked, choice 0, no finish yet)
        are left out, so a plain delta costs what it did before they existed."""
        out = {k: v for k, v in vars(self).items() if v is not None}
        if not self.choice:
            del out["choice"]
        return out


@dataclass(frozen=True)
class Cancel:
    """Stop a request: the worker running it drops its row at the next engine step and answers
    it with a `cancelled` error (one still queued is answered so when it is read)."""

    id: str = field(metadata=spec("Id of the request to cancel.", minLength=1, maxLength=256))
    model: str | None = field(default=None, metadata=spec(
        "Only on this deployment (a retried request may be running elsewhere too); unset: "
        "every deployment."))
    reason: str = field(default="cancelled by the caller", metadata=spec(
        "Why, for the error message.", maxLength=256))
    schema_version: int = field(default=SCHEMA_VERSION, metadata=spec(
        "Version of this schema.", minimum=1, maximum=SCHEMA_VERSION))


def decode_request(raw: bytes | None) -> Request:
    """Parse and validate a request; SchemaError names the first offending field."""
    return from_dict(Request, decode(raw))


def decode_result(raw: bytes | None) -> Result:
    return from_dict(Result, decode(raw))


def decode_delta(raw: bytes | None) -> Delta:
    return from_dict(Delta, decode(raw))


def decode_cancel(raw: bytes | None) -> Cancel:
    return from_dict(Cancel, decode(raw))


def salvage_reply_address(raw: bytes | None) -> tuple[str, str, str] | None:
    """(id, model, reply_to) of an invalid request when they are readable, so it can still be
    answered with an error result; None when there is nobody to answer."""
    try:
        data = decode(raw)
    except SchemaError:
        return None
    if not isinstance(data, dict):
        return None
    rid, reply_to = data.get("id"), data.get("reply_to", DEFAULT_REPLY_TO)
    model = data.get("model") if isinstance(data.get("model"), str) else ""
    if not isinstance(rid, str) or not rid or not isinstance(reply_to, str):
        return None
    if reply_topic_problem(reply_to) is not None:
        return None
    return rid, model, reply_to
