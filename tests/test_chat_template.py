"""Chat templates: real models' templates render token for token as transformers'
`apply_chat_template` does; where templates come from; a chat through the gateway and the
worker is prompted with its model's template."""

from __future__ import annotations

import asyncio
import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import openai
import orjson
import pytest
from prometheus_client import CollectorRegistry
from tokenizers import AddedToken
from transformers import AutoTokenizer

from models.factory import CORPUS, train_tokenizer
from schemas import Request, SchemaError, decode_request
from schemas.chat import ChatMessage
from streams.front.openai_format import parse_call, schema_error
from streams.shadow.comparator import score_request
from workers.chat_template import (
    ChatTemplate, ChatTemplateError, deployment_template, load_chat_template,
)
from workers.config import WorkerConfig
from workers.engine import Engine, GenerationInput, SamplingParams
from workers.tokenizer import Tokenizer, load_tokenizer
from workers.worker import Worker

TEMPLATES = Path(__file__).parent / "chat_templates"  # sources: chat_templates/SOURCES.md

LLAMA3 = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
          "<|eot_id|>", "<|eom_id|>", "<|python_tag|>")
CHATML = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
MISTRAL = ("[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
           "[TOOL_RESULTS]", "[/TOOL_RESULTS]")


@dataclass(frozen=True)
class Family:
    """A real template and the special tokens its model's tokenizer has."""

    file: str
    bos: str | None
    eos: str
    tokens: tuple[str, ...]


FAMILIES = {
    "llama-3": Family("llama-3-instruct.jinja", "<|begin_of_text|>", "<|eot_id|>", LLAMA3),
    "llama-3.1": Family("llama-3.1-instruct.jinja", "<|begin_of_text|>", "<|eot_id|>", LLAMA3),
    "qwen-2.5": Family("qwen-2.5-instruct.jinja", None, "<|im_end|>", CHATML),  # no bos
    "mistral-v0.1": Family("mistral-7b-instruct-v0.1.jinja", "<s>", "</s>", ()),
    "mixtral-v0.1": Family("mixtral-8x7b-instruct-v0.1.jinja", "<s>", "</s>", ()),
    "mistral-v0.3": Family("mistral-7b-instruct-v0.3.jinja", "<s>", "</s>", MISTRAL),
    "mistral-nemo": Family("mistral-nemo-instruct-2407.jinja", "<s>", "</s>", MISTRAL),
    "chatml": Family("chatml.jinja", "<s>", "<|im_end|>", CHATML),
    "chatml-dolphin": Family("chatml-dolphin-2.5-mixtral.jinja", "<s>", "<|im_end|>", CHATML),
}

SYSTEM = {"role": "system", "content": "You are a ferry timetable. Answer briefly."}
USER = {"role": "user", "content": "When does the first boat leave?"}
ASSISTANT = {"role": "assistant", "content": "At dawn, 06:10."}
ARGS = {"harbour": "Västra hamnen", "day": "monday"}
CALL_ID = "call00042"  # Mistral's templates want 9 alphanumeric characters


def tool_turns(arguments: Any) -> list[dict]:
    """An assistant tool call and the tool's answer, arguments as given."""
    call = {"id": CALL_ID, "type": "function",
            "function": {"name": "timetable", "arguments": arguments}}
    return [{"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": '{"first": "06:10"}', "tool_call_id": CALL_ID}]


def hf_tool_turns(arguments: dict = ARGS) -> list[dict]:
    """The same turns as transformers' docs write them: arguments an object, no content."""
    [call, answer] = tool_turns(arguments)
    del call["content"]
    return [call, answer]


# Each case: the OpenAI messages a client sends, and what a transformers user would pass.
CONVERSATIONS: dict[str, tuple[list[dict], list[dict]]] = {
    "system+user": ([SYSTEM, USER], [SYSTEM, USER]),
    "turns": ([USER, ASSISTANT, {"role": "user", "content": "And the last?"}],
              [USER, ASSISTANT, {"role": "user", "content": "And the last?"}]),
    "text parts": ([{"role": "user", "content": [{"type": "text", "text": "Two lines:"},
                                                  {"type": "text", "text": "when, where?"}]}],
                   [{"role": "user", "content": "Two lines:\nwhen, where?"}]),
    "developer": ([{**SYSTEM, "role": "developer"}, USER], [SYSTEM, USER]),
    "tool call": ([USER, *tool_turns(json.dumps(ARGS, ensure_ascii=False))],
                  [USER, *hf_tool_turns()]),
    "agent loop": ([SYSTEM, USER, *tool_turns(json.dumps(ARGS)), ASSISTANT,
                    {"role": "user", "content": "Thanks"}],
                   [SYSTEM, USER, *hf_tool_turns(), ASSISTANT,
                    {"role": "user", "content": "Thanks"}]),
}
# Conversations each template must render (the others may be refused: then transformers
# refuses them with the same message).
PLAIN = {"system+user", "turns", "text parts", "developer"}
RENDERS = {
    "llama-3": set(CONVERSATIONS), "llama-3.1": set(CONVERSATIONS),
    "qwen-2.5": set(CONVERSATIONS), "mistral-v0.3": set(CONVERSATIONS),
    "mistral-nemo": set(CONVERSATIONS),
    "chatml": PLAIN, "chatml-dolphin": PLAIN,  # no tool calls in ChatML
    "mistral-v0.1": {"turns", "text parts"}, "mixtral-v0.1": {"turns", "text parts"},
}


def ferry_messages(messages: list[dict]) -> list[ChatMessage]:
    """OpenAI messages as the worker receives them: validated by the schema layer."""
    request = decode_request(orjson.dumps({"id": "t", "model": "m", "messages": messages}))
    assert request.messages is not None
    return request.messages


def write_tokenizer_dir(path: Path, family: Family, template: str | None) -> Path:
    """A tokenizer directory as a Hub model has one: the tiny BPE plus the family's special
    tokens, and tokenizer_config.json naming bos/eos and holding the template."""
    path.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(CORPUS, 512)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in family.tokens])
    tok.save(str(path / "tokenizer.json"))
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast",
                              "eos_token": family.eos, "clean_up_tokenization_spaces": False}
    if family.bos is not None:
        config["bos_token"] = family.bos
    if template is not None:
        config["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("templates")
    return {name: write_tokenizer_dir(root / name, f, (TEMPLATES / f.file).read_text())
            for name, f in FAMILIES.items()}


def hf_render(hf: Any, messages: list[dict], **kwargs: Any) -> tuple[str | None, Any]:
    """transformers' rendering and tokens, or (None, its error message)."""
    try:
        text = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                      **kwargs)
        ids = hf.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
    except jinja2.TemplateError as exc:
        return None, str(exc)
    return text, list(ids["input_ids"])


# ---- real templates, token for token --------------------------------------------------

@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_real_templates_render_as_transformers_does(family: str, family_dirs) -> None:
    ours = load_tokenizer(family_dirs[family])
    hf = AutoTokenizer.from_pretrained(family_dirs[family])
    assert ours is not None and ours.chat_template is not None
    rendered = set()
    for name, (openai_messages, hf_messages) in CONVERSATIONS.items():
        text, ids_or_error = hf_render(hf, hf_messages)
        if text is None:
            with pytest.raises(ChatTemplateError) as refused:
                ours.chat_template.render(ferry_messages(openai_messages))
            assert str(refused.value) == ids_or_error, name
            continue
        ours_text = ours.chat_template.render(ferry_messages(openai_messages))
        assert ours_text == text, name
        assert ours.encode(ours_text, add_special_tokens=False) == ids_or_error, name
        rendered.add(name)
    assert rendered == RENDERS[family]


def test_special_tokens_are_tokens_and_bos_comes_once(family_dirs) -> None:
    ours = load_tokenizer(family_dirs["llama-3.1"])
    assert ours is not None and ours.chat_template is not None
    ids = ours.encode(ours.chat_template.render(ferry_messages([USER])),
                      add_special_tokens=False)
    bos, header = (ours.tokenizer.token_to_id(t) for t in LLAMA3[0:3:2])
    assert ids[0] == bos and ids.count(bos) == 1 and ids.count(header) == 3  # sys, user, gen
    assert ours.special_tokens == {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}


# ---- the environment: transformers' ------------------------------------------------------

ENVIRONMENT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.index0 > 1 %}{% break %}{% endif %}"
    "{% generation %}{{ message['content'] | tojson }}{% endgeneration %}\n"
    "{{ {'role': message.role, 'x': '<b>&'} | tojson(indent=2, sort_keys=true) }}\n"
    "{% endfor %}"
    "{{ strftime_now('%Y') }}|{{ bos_token }}|{{ eos_token }}|{{ tools }}|{{ documents }}"
    "{% if add_generation_prompt %}<gen>{% endif %}")


def test_environment_matches_transformers(family_dirs) -> None:
    hf = AutoTokenizer.from_pretrained(family_dirs["chatml"])
    messages = [USER, {"role": "assistant", "content": "Smörgås <3"}, ASSISTANT]
    want, _ = hf_render(hf, messages, chat_template=ENVIRONMENT_TEMPLATE)
    template = deployment_template(_with_template(family_dirs["chatml"], ENVIRONMENT_TEMPLATE),
                                   None)
    assert template is not None and template.render(ferry_messages(messages)) == want
    assert '"Smörgås <3"' in want and "<gen>" in want and "<b>&" in want  # no HTML escapes


@pytest.mark.parametrize("source, refusal", [
    ("{{ raise_exception('Only user and assistant roles are supported!') }}",
     "Only user and assistant roles are supported!"),
    ("{{ messages.append(1) }}", "attribute 'append' of 'list' object is unsafe"),  # sandbox
    ("{{ messages[0].content.__class__ }}", ""),                    # attributes too
    ("{{ 1 / 0 }}", "ZeroDivisionError"),                           # any failure is a refusal
])
def test_template_failures_are_refusals(source: str, refusal: str, family_dirs) -> None:
    template = deployment_template(_with_template(family_dirs["chatml"], source), None)
    assert template is not None
    if not refusal:  # rendered as undefined: nothing leaks
        assert template.render(ferry_messages([USER])) == ""
        return
    with pytest.raises(ChatTemplateError, match=refusal):
        template.render(ferry_messages([USER]))


def test_content_parts_reach_templates_that_loop_over_them(family_dirs) -> None:
    source = ("{% for m in messages %}{% if m.content is string %}{{ m.content }}{% else %}"
              "{% for part in m['content'] %}<{{ part.type }}:{{ part.text }}>{% endfor %}"
              "{% endif %};{% endfor %}")
    tokenizer = _with_template(family_dirs["chatml"], source)
    template = deployment_template(tokenizer, None)
    messages = [SYSTEM, {"role": "user", "content": [{"type": "text", "text": "a"},
                                                      {"type": "text", "text": "b"}]}]
    assert template is not None
    assert template.render(ferry_messages(messages)) == f"{SYSTEM['content']};<text:a><text:b>;"


def test_developer_role_reaches_templates_that_know_it(family_dirs) -> None:
    source = "{% for m in messages %}{{ m.role }}{% if m.role == 'developer' %}!{% endif %}" \
             "{% endfor %}"
    template = deployment_template(_with_template(family_dirs["chatml"], source), None)
    assert template is not None
    assert template.render(ferry_messages([{**SYSTEM, "role": "developer"}, USER])) == \
        "developer!user"


def test_tool_arguments_that_are_not_json_reach_the_template_as_text(family_dirs) -> None:
    source = "{% for m in messages %}{% for c in m.tool_calls or [] %}" \
             "{{ c.function.arguments | tojson }}{% endfor %}{% endfor %}"
    template = deployment_template(_with_template(family_dirs["chatml"], source), None)
    assert template is not None
    render = template.render
    assert render(ferry_messages(tool_turns('{"a": [1]}'))) == '{"a": [1]}'
    assert render(ferry_messages(tool_turns("not json"))) == '"not json"'
    assert render(ferry_messages(tool_turns(""))) == "{}"


def _with_template(model_dir: Path, source: str) -> Tokenizer:
    tokenizer = copy.copy(load_tokenizer(model_dir))
    assert tokenizer is not None and tokenizer.chat_template is not None
    tokenizer.chat_template = ChatTemplate(source, "test", tokenizer.special_tokens)
    return tokenizer


# ---- where templates come from ----------------------------------------------------------

def test_chat_template_jinja_comes_before_tokenizer_config(tmp_path: Path) -> None:
    model = write_tokenizer_dir(tmp_path / "m", FAMILIES["chatml"], "from the config")
    (model / "chat_template.jinja").write_text("from the file {{ bos_token }}")
    template = load_chat_template(model, json.loads((model / "tokenizer_config.json").read_text()))
    assert template is not None and template.source == "from the file {{ bos_token }}"
    assert template.source == AutoTokenizer.from_pretrained(model).chat_template
    assert template.origin.endswith("chat_template.jinja")


def test_named_templates_use_default_and_special_tokens_as_transformers_reads(
        tmp_path: Path) -> None:
    model = write_tokenizer_dir(tmp_path / "m", FAMILIES["chatml"], None)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "tools"},
                               {"name": "default", "template": "{{ bos_token }}{{ pad_token }}"}]
    config["bos_token"] = {"__type": "AddedToken", "content": "<|im_start|>", "lstrip": False,
                           "rstrip": False, "normalized": False, "single_word": False,
                           "special": True}
    config["pad_token"] = "<|endoftext|>"
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = load_tokenizer(model)
    assert tokenizer is not None and tokenizer.chat_template is not None
    hf = AutoTokenizer.from_pretrained(model)
    assert tokenizer.special_tokens == hf.special_tokens_map
    assert tokenizer.chat_template.render(ferry_messages([USER])) == hf.apply_chat_template(
        [USER], tokenize=False) == "<|im_start|><|endoftext|>"
    config["chat_template"] = [{"name": "tool_use", "template": "tools"}]
    with pytest.raises(ChatTemplateError, match="none named 'default'"):
        load_chat_template(model, config)


def test_a_deployment_template_replaces_the_model_one(tmp_path: Path, family_dirs) -> None:
    tokenizer = load_tokenizer(family_dirs["qwen-2.5"])
    own = tmp_path / "own.jinja"
    own.write_text("{% for m in messages %}{{ m.role }}={{ m.content }}{{ eos_token }}"
                   "{% endfor %}")
    template = deployment_template(tokenizer, own)
    assert template is not None and template.origin == str(own)
    assert template.render(ferry_messages([USER])) == f"user={USER['content']}<|im_end|>"
    assert deployment_template(tokenizer, None) is tokenizer.chat_template
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}\n{{ m.role }")
    with pytest.raises(ChatTemplateError, match=f"{broken}: does not compile: line 2"):
        deployment_template(tokenizer, broken)
    with pytest.raises(ChatTemplateError, match="missing.jinja"):
        deployment_template(tokenizer, tmp_path / "missing.jinja")
    with pytest.raises(ChatTemplateError, match="no tokenizer.json"):
        deployment_template(None, own)
    no_template = load_tokenizer(write_tokenizer_dir(tmp_path / "bare", FAMILIES["chatml"],
                                                     None))
    assert no_template is not None and deployment_template(no_template, None) is None
    assert deployment_template(no_template, own) is not None  # a default for it


# ---- the gateway passes messages on --------------------------------------------------------

def test_gateway_passes_messages_through_and_names_openai_fields() -> None:
    messages = [SYSTEM, *tool_turns("{}")]
    call = parse_call({"messages": messages, "max_tokens": 4}, chat=True, model="m",
                      prefer_async=False, deadline=1.0)
    assert call.request.prompt is None and call.request.messages == ferry_messages(messages)
    for body, param in (({"messages": [USER, {"role": "banana", "content": "x"}]},
                         "messages[1].role"),
                        ({"messages": [{"role": "user", "content": None}]},
                         "messages[0].content"),
                        ({"max_tokens": 3}, "messages"),
                        ({"messages": [USER], "max_tokens": 0}, "max_tokens")):
        with pytest.raises(SchemaError) as info:
            parse_call(body, chat=True, model="m", prefer_async=False, deadline=1.0)
        error = schema_error(info.value, "messages")
        assert (error.status, error.param) == (400, param)


# ---- through the broker -----------------------------------------------------------------

def tiny_chat_ids(model_dir: Path, messages: list[dict], **kwargs: Any) -> list[int]:
    """transformers' tokens for the tiny model's chat: what the worker must prompt with."""
    hf = AutoTokenizer.from_pretrained(model_dir)
    return list(hf.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
                ["input_ids"])


async def test_chat_through_gateway_and_worker_uses_the_model_template(
        start_worker, start_gateway, engine, tiny_model, tmp_path, unique,
        kafka_bootstrap) -> None:
    dep, own_dep, bare_dep = unique("chat"), unique("own"), unique("bare")
    own = tmp_path / "own.jinja"
    own.write_text("{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}"
                   "{% endfor %}")
    await start_worker(dep)
    await start_worker(own_dep, chat_template=own)
    bare_task = await _start_bare_worker(engine, tiny_model, bare_dep, kafka_bootstrap)
    gw = await start_gateway()
    messages = [{"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Name"},
                                             {"type": "text", "text": "a ship."}]},
                *tool_turns('{"q": "ships"}')]
    hf_messages = [{"role": "system", "content": "Be brief."},
                   {"role": "user", "content": "Name\na ship."}, *hf_tool_turns({"q": "ships"})]
    try:
        async with gw.openai() as client:
            chat = await client.chat.completions.create(model=dep, messages=messages,
                                                        max_tokens=5)
            want_ids = tiny_chat_ids(tiny_model, hf_messages)
            [want] = engine.generate([GenerationInput(want_ids, SamplingParams(max_new_tokens=5))])
            assert chat.usage.prompt_tokens == len(want_ids) == want.prompt_tokens
            assert chat.choices[0].message.content == want.text

            chat = await client.chat.completions.create(model=own_dep, messages=messages,
                                                        max_tokens=2)
            assert chat.usage.prompt_tokens == len(tiny_chat_ids(
                tiny_model, hf_messages, chat_template=own.read_text()))

            with pytest.raises(openai.BadRequestError) as refused:
                await client.chat.completions.create(model=bare_dep, messages=messages,
                                                     max_tokens=2)
            error = refused.value.body
            assert (error["code"], error["param"]) == ("invalid_request", "messages")
            assert "no chat template" in error["message"]
            completion = await client.completions.create(model=bare_dep, prompt="Hi",
                                                         max_tokens=2)
            assert completion.usage.completion_tokens == 2  # prompts still work there
    finally:
        bare_task.cancel()
        await asyncio.gather(bare_task, return_exceptions=True)


async def _start_bare_worker(engine: Engine, model_dir: Path, deployment: str,
                             bootstrap: str) -> asyncio.Task:
    """A worker whose model has no chat template (the tiny model's removed)."""
    tokenizer = copy.copy(engine.tokenizer)
    tokenizer.chat_template = None
    config = WorkerConfig(model_dir=model_dir, deployment=deployment, bootstrap=bootstrap)
    worker = Worker(config, Engine(engine.model, engine.config, tokenizer, engine.device,
                                   config.engine_config()), registry=CollectorRegistry())
    task = asyncio.create_task(worker.run())
    ready = asyncio.create_task(worker.ready.wait())
    done, _ = await asyncio.wait([ready, task], timeout=60, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
    assert ready in done, "worker did not join its group within 60s"
    return task


def test_scoring_a_chat_renders_the_same_messages() -> None:
    primary = Request(id="p", model="a", messages=ferry_messages([SYSTEM, USER]))
    scored = score_request(primary, "b", [5, 6], now=1.0)
    assert (scored.messages, scored.prompt, scored.score_ids) == (primary.messages, None, [5, 6])
