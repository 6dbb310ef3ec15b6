"""The message contract: validation names the field, encoding round-trips, the JSON Schemas
and the AsyncAPI document are in sync with the code."""

from __future__ import annotations

import jsonschema
import orjson
import pytest

from schemas import (
    ErrorCode, Request, Result, SchemaError, Timings, Usage, batch_key, decode_request,
    decode_result, encode, salvage_reply_address,
)
from schemas import topics
from schemas.export import ASYNCAPI_FILE, JSON_DIR, RECORDS, schema_files
from schemas.fields import from_dict


def test_request_round_trip_and_defaults() -> None:
    req = Request(id="a", model="m", prompt="hi", stop=["\n"], seed=3)
    back = decode_request(encode(req.to_dict()))
    assert back == req and back.reply_to == "ferry.results" and back.max_new_tokens == 16


def test_result_round_trip_with_error() -> None:
    ok = Result(id="a", model="m", output_ids=[1, 2], text="xy", finish_reason="stop",
                usage=Usage(3, 2), timings=Timings(1.5, 2.5))
    assert decode_result(encode(ok)) == ok
    failed = Result.failure("a", "m", ErrorCode.UNKNOWN_MODEL, "model: nope")
    assert decode_result(encode(failed)).error.code is ErrorCode.UNKNOWN_MODEL


@pytest.mark.parametrize("raw, field, reason", [
    (b"{", "$", "not valid JSON"),
    (b"[1]", "$", "must be an object"),
    (b'{"model": "m", "prompt": "x"}', "id", "is required"),
    (b'{"id": "a", "model": "m"}', "prompt", "exactly one of prompt, input_ids and messages"),
    (b'{"id": "a", "model": "m", "prompt": "x", "input_ids": [1]}', "prompt", "exactly one"),
    (b'{"id": "a", "model": "m", "input_ids": []}', "input_ids", "must not be empty"),
    (b'{"id": "a", "model": "m", "input_ids": [1, -1]}', "input_ids[1]", "must be >= 0"),
    (b'{"id": "a", "model": "m", "prompt": "x", "max_new_tokens": -1}', "max_new_tokens", ">= 0"),
    (b'{"id": "a", "model": "m", "prompt": "x", "max_new_tokens": 1.5}', "max_new_tokens",
     "must be integer"),
    (b'{"id": "a", "model": "m", "prompt": "x", "temperature": "hot"}', "temperature",
     "must be a number"),
    (b'{"id": "a", "model": "m", "prompt": "x", "top_p": 0}', "top_p", "must be > 0"),
    (b'{"id": "a", "model": "m", "prompt": "x", "stop": [""]}', "stop[0]", "at least 1"),
    (b'{"id": "a", "model": "m", "prompt": "x", "reply_to": "no spaces"}', "reply_to", "match"),
    (b'{"id": "a", "model": "m", "prompt": "x", "max_tokens": 5}', "max_tokens", "unknown field"),
    (b'{"id": "a", "model": "m", "prompt": "x", "schema_version": 99}', "schema_version", "<= 1"),
])
def test_validation_names_the_field(raw: bytes, field: str, reason: str) -> None:
    with pytest.raises(SchemaError) as err:
        decode_request(raw)
    assert err.value.field == field
    assert reason in err.value.reason


def test_salvage_reply_address() -> None:
    assert salvage_reply_address(b'{"id": "a", "model": "m", "reply_to": "t"}') == ("a", "m", "t")
    assert salvage_reply_address(b'{"id": "a"}') == ("a", "", "ferry.results")
    assert salvage_reply_address(b'{"id": 5}') is None
    assert salvage_reply_address(b"junk") is None
    assert salvage_reply_address(b'{"id": "a", "reply_to": "bad topic"}') is None


def test_batch_key_groups_requests_of_one_template() -> None:
    template = "You are a careful assistant. Examples: " * 40  # > PREFIX_TOKENS tokens of text
    a = Request(id="1", model="m", prompt=template + "Q: one?", max_new_tokens=8)
    b = Request(id="2", model="m", prompt=template + "Q: two, longer?", temperature=0.7)
    other = Request(id="3", model="m", prompt="Another template entirely. " * 40)
    assert batch_key(a, "d") == batch_key(b, "d")  # lengths and sampling no longer split
    assert batch_key(a, "d").startswith("d|") and batch_key(other, "d") != batch_key(a, "d")
    assert batch_key(a, "e") != batch_key(a, "d")
    ids = list(range(300))
    assert batch_key(Request(id="4", model="m", input_ids=ids), "d") == batch_key(
        Request(id="5", model="m", input_ids=ids + [7, 8]), "d")
    assert batch_key(Request(id="6", model="m", input_ids=[1, 2]), "d") != batch_key(
        Request(id="7", model="m", input_ids=[1, 3]), "d")
    assert batch_key(Request(id="8", model="m", prompt="x", batch_key="mine"), "d") == "mine"


def test_exported_json_schemas_match_the_code() -> None:
    for name, data in schema_files().items():
        committed = (JSON_DIR / name).read_bytes()
        assert committed == data, f"schemas/json/{name} is stale: run `ferry schemas export`"


def test_json_schema_agrees_with_validation() -> None:
    schema = orjson.loads((JSON_DIR / "request.schema.json").read_bytes())
    good = Request(id="a", model="m", input_ids=[1, 2], stop=["x"], deadline=1.0).to_dict()
    jsonschema.validate(good, schema)
    for bad in ({**good, "max_new_tokens": -1}, {**good, "extra": 1}, {**good, "top_p": 0},
                {**good, "reply_to": "a b"}, {**good, "input_ids": [-1]}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
        with pytest.raises(SchemaError):
            decode_request(orjson.dumps(bad))
    result_schema = orjson.loads((JSON_DIR / "result.schema.json").read_bytes())
    failure = orjson.loads(encode(Result.failure("a", "m", ErrorCode.INTERNAL, "boom")))
    jsonschema.validate(failure, result_schema)


# ---- chat messages ------------------------------------------------------------------------

def chat(*messages: object) -> bytes:
    return orjson.dumps({"id": "a", "model": "m", "messages": list(messages)})


USER = {"role": "user", "content": "hi"}
CALL = {"id": "call_1", "type": "function",
        "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}
AGENT_TURN = [  # what agent frameworks send back: a tool call, then its answer
    {"role": "developer", "content": "Use tools."},
    {"role": "user", "content": [{"type": "text", "text": "Weather"},
                                 {"type": "text", "text": "in Oslo?"}]},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "content": "12 C", "tool_call_id": "call_1"},
]

BAD_MESSAGES = [
    ([], "messages", "at least 1 items"),
    ([USER, {"role": "banana", "content": "x"}], "messages[1].role", "must be one of"),
    ([{"content": "x"}], "messages[0].role", "is required"),
    ([{"role": "user"}], "messages[0].content", "is required"),
    ([{"role": "user", "content": None}], "messages[0].content", "null only on an assistant"),
    ([{"role": "assistant", "content": None}], "messages[0].content", "is required"),
    ([{"role": "user", "content": 5}], "messages[0].content",
     "must be string or array or null, got integer"),
    ([{"role": "user", "content": []}], "messages[0].content", "must not be an empty array"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     "messages[0].content[0].type", "must be one of ['text']"),
    ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0].text",
     "is required"),
    ([{"role": "user", "content": "x", "tool_calls": [CALL]}], "messages[0].tool_calls",
     "only assistant messages"),
    ([{"role": "assistant", "content": None, "tool_calls": []}], "messages[0].tool_calls",
     "at least 1 items"),
    ([{"role": "assistant", "content": None, "tool_calls": [{**CALL, "type": "code"}]}],
     "messages[0].tool_calls[0].type", "must be one of ['function']"),
    ([{"role": "assistant", "content": None,
       "tool_calls": [{**CALL, "function": {"name": "f", "arguments": {"x": 1}}}]}],
     "messages[0].tool_calls[0].function.arguments", "must be string"),
    ([{"role": "tool", "content": "12 C"}], "messages[0].tool_call_id", "is required"),
    ([{"role": "user", "content": "x", "tool_call_id": "c"}], "messages[0].tool_call_id",
     "only tool messages"),
    ([{"role": "user", "content": "x", "refusal": "no"}], "messages[0].refusal",
     "unknown field"),
    (["hi"], "messages[0]", "must be an object"),
]


def test_chat_messages_round_trip() -> None:
    req = decode_request(chat(*AGENT_TURN))
    assert [m.role for m in req.messages] == ["developer", "user", "assistant", "tool"]
    assert req.messages[1].text == "Weather\nin Oslo?"
    assert req.messages[2].tool_calls[0].function.arguments == '{"city": "Oslo"}'
    assert decode_request(encode(req)) == req == decode_request(encode(req.to_dict()))
    assert Request(id="b", model="m", messages=req.messages).prompt is None


@pytest.mark.parametrize("messages, field, reason", BAD_MESSAGES)
def test_chat_message_validation_names_the_field(messages: list, field: str,
                                                 reason: str) -> None:
    with pytest.raises(SchemaError) as err:
        decode_request(chat(*messages))
    assert (err.value.field, reason in err.value.reason) == (field, True), err.value


def test_exactly_one_prompt_source() -> None:
    for extra in ({"prompt": "x"}, {"input_ids": [1]}):
        raw = orjson.dumps({"id": "a", "model": "m", "messages": [USER], **extra})
        with pytest.raises(SchemaError, match="exactly one of prompt, input_ids and messages"):
            decode_request(raw)


def test_json_schema_agrees_on_chat_messages() -> None:
    schema = orjson.loads((JSON_DIR / "request.schema.json").read_bytes())
    jsonschema.validate(orjson.loads(chat(*AGENT_TURN)), schema)
    for messages, field, _ in BAD_MESSAGES:
        body = orjson.loads(chat(*messages))
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(body, schema)


def test_batch_key_of_chats_follows_the_conversation_start() -> None:
    system = {"role": "system", "content": "You are a careful assistant. " * 60}
    a = Request(id="1", model="m", messages=decode_request(chat(system, USER)).messages)
    b = Request(id="2", model="m", messages=decode_request(
        chat(system, {"role": "user", "content": "other"})).messages)
    c = Request(id="3", model="m", messages=decode_request(chat(USER)).messages)
    assert batch_key(a, "d") == batch_key(b, "d") != batch_key(c, "d")


# ---- every other record: both validators refuse the same bad values ----------------------

GOOD: dict[str, dict] = {
    "route": {"alias": "chat", "weights": {"a": 90, "b": 0}, "updated_at": 1.0},
    "shadow": {"candidates": ["c"], "percent": 25},
    "api_key": {"tenant": "acme", "sha256": "0" * 64, "created_at": 1.0},
    "tenant": {"rpm": 5, "tpm": None},
    "deployment": {"name": "llm", "version": "step-1", "store_path": "/m/llm/step-1",
                   "status": "rendered", "times": {"pending": 1.0, "rendered": 2}},
    "quota_state": {"at": 1.0, "r": 4.5},
    "checkpoint_event": {"action": "deploy", "model": "llm", "path": "/run/step-1"},
    "telemetry": {"deployment": "d", "at": 1.0, "latencies_ms": [1.5, 2],
                  "errors": [None, "internal"]},
    "comparison": {"id": "r", "primary": "a", "candidate": "b", "exact_match": False,
                   "common_prefix": 2, "overlap": 0.5, "length_diff": -1,
                   "primary_latency_ms": 3.0, "candidate_latency_ms": 4.0,
                   "latency_diff_ms": 1.0, "at": 1.0, "candidate_error": "internal"},
}
DROP = object()  # a field left out
BAD_RECORDS = [
    ("route", {"weights": {"a": -1}}, "weights.a"),
    ("route", {"weights": {"a b": 1}}, "weights.a b"),
    ("route", {"weights": {"a": True}}, "weights.a"),
    ("route", {"weights": {}}, "weights"),
    ("route", {"alias": ""}, "alias"),
    ("shadow", {"candidates": []}, "candidates"),
    ("shadow", {"candidates": ["a@b"]}, "candidates[0]"),
    ("shadow", {"percent": 0}, "percent"),
    ("shadow", {"percent": 100.5}, "percent"),
    ("api_key", {"sha256": "not hex"}, "sha256"),
    ("api_key", {"tenant": DROP}, "tenant"),
    ("tenant", {"rpm": 0}, "rpm"),
    ("tenant", {"reply_prefix": "a b"}, "reply_prefix"),
    ("deployment", {"status": "gone"}, "status"),
    ("deployment", {"times": {"ready": "now"}}, "times.ready"),
    ("deployment", {"replicas": 0}, "replicas"),
    ("quota_state", {"at": "x"}, "at"),
    ("checkpoint_event", {"action": "retrain"}, "action"),
    ("checkpoint_event", {"path": DROP}, "path"),  # deploy what?
    ("checkpoint_event", {"store_path": "/s/llm/v"}, "path"),  # both
    ("checkpoint_event", {"action": "undeploy", "path": DROP}, "id"),
    ("checkpoint_event", {"action": "undeploy", "path": DROP, "id": "llm"}, "id"),
    ("telemetry", {"latencies_ms": [-1.0, 2.0]}, "latencies_ms[0]"),
    ("telemetry", {"errors": [None, 5]}, "errors[1]"),
    ("comparison", {"overlap": 1.5}, "overlap"),
    ("comparison", {"primary_error": "oops"}, "primary_error"),
    ("comparison", {"exact_match": DROP}, "exact_match"),
    *((name, {"extra": 1}, "extra") for name in GOOD),
]


def _with(name: str, changes: dict) -> dict:
    value = {**GOOD[name], **changes}
    return {k: v for k, v in value.items() if v is not DROP}


def _schema(name: str) -> dict:
    return orjson.loads((JSON_DIR / f"{name}.schema.json").read_bytes())


@pytest.mark.parametrize("name", sorted(GOOD))
def test_record_round_trips_and_its_schema_accepts_it(name: str) -> None:
    record = from_dict(RECORDS[name], GOOD[name])
    assert from_dict(RECORDS[name], orjson.loads(encode(record))) == record
    jsonschema.validate(orjson.loads(encode(record)), _schema(name))
    jsonschema.validate(GOOD[name], _schema(name))


@pytest.mark.parametrize("name, changes, field", BAD_RECORDS)
def test_schema_and_validator_refuse_the_same_values(name: str, changes: dict,
                                                     field: str) -> None:
    bad = _with(name, changes)
    with pytest.raises(SchemaError) as err:
        from_dict(RECORDS[name], bad)
    assert err.value.field == field, err.value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, _schema(name))


def test_telemetry_needs_one_error_per_latency() -> None:
    """The one rule JSON Schema cannot say (equal lengths); its description says it."""
    with pytest.raises(SchemaError, match="one entry per latency"):
        from_dict(RECORDS["telemetry"], _with("telemetry", {"errors": [None]}))
    assert "latencies_ms[i] and errors[i]" in _schema("telemetry")["description"]


def test_every_record_is_exported_and_nothing_else() -> None:
    on_disk = {p.name for p in JSON_DIR.iterdir()}
    assert on_disk == set(schema_files()), "run `ferry schemas export` (and delete leftovers)"
    assert set(GOOD) | {"request", "result", "delta", "cancel", "dead_letter"} == set(RECORDS)


# ---- the AsyncAPI document ---------------------------------------------------------------

def _topic_names() -> dict[str, str]:
    """Every topic, topic family and topic suffix schemas/topics.py spells."""
    return {name: value for name, value in vars(topics).items()
            if isinstance(value, str) and name.endswith(("_TOPIC", "_PREFIX", "_SUFFIX"))
            and "GROUP" not in name}


def _spells(address: str, value: str) -> bool:
    return address == value or address.startswith(value + "{") or address.endswith("}" + value)


def test_asyncapi_has_a_channel_for_every_topic_and_no_other() -> None:
    doc = orjson.loads((JSON_DIR / ASYNCAPI_FILE).read_bytes())
    assert doc["asyncapi"] == "3.0.0"
    addresses = [c["address"] for c in doc["channels"].values()]
    names = _topic_names()
    for name, value in names.items():
        assert any(_spells(a, value) for a in addresses), f"topics.{name} has no channel"
    for address in addresses:
        assert any(_spells(address, v) for v in names.values()), f"{address}: not in topics"


def test_asyncapi_messages_headers_and_operations_resolve() -> None:
    doc = orjson.loads((JSON_DIR / ASYNCAPI_FILE).read_bytes())
    headers = {v for k, v in vars(topics).items() if k.endswith("_HEADER")}
    seen: set[str] = set()
    for name, channel in doc["channels"].items():
        kafka = channel["bindings"]["kafka"]
        assert kafka["topicConfiguration"]["cleanup.policy"] in (["compact"], ["delete"])
        assert isinstance(kafka.get("partitions"), int), name
        for message in channel["messages"].values():
            assert (JSON_DIR / message["payload"]["$ref"]).is_file()
            assert message["bindings"]["kafka"]["key"]["description"]
            seen.update(message.get("headers", {}).get("properties", {}))
    assert seen == headers  # every header is documented where it travels, and only those
    for op_id, op in doc["operations"].items():
        assert op["action"] in ("send", "receive"), op_id
        _, channels, channel, *rest = op["channel"]["$ref"].split("/")
        assert channels == "channels" and channel in doc["channels"] and not rest
        for ref in op["messages"]:
            *_, message = ref["$ref"].split("/")
            assert message in doc["channels"][channel]["messages"]
    # What reads ferry.telemetry and who writes ferry.routes, for instance.
    assert {"canary_receive_telemetry", "ferry_route_send_routes",
            "deployer_receive_checkpoints"} <= set(doc["operations"])



def test_every_error_code_has_one_fault_and_retries_are_server_faults() -> None:
    from schemas.errors import RETRYABLE, SERVER_FAULTS, Fault, fault
    assert {fault(code) for code in ErrorCode} <= set(Fault)  # a new code must be classified
    assert RETRYABLE <= SERVER_FAULTS
    assert fault(ErrorCode.INVALID_REQUEST) is Fault.CALLER
    assert fault(ErrorCode.INFERENCE_FAILED) is Fault.SERVER
