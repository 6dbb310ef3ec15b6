"""Chat messages to prompt text with the model's own chat template, as transformers'
`apply_chat_template(messages, add_generation_prompt=True)` renders them.

The environment is transformers' (`utils/chat_template_utils.py`): a Jinja2
`ImmutableSandboxedEnvironment` with `trim_blocks` and `lstrip_blocks`, loop controls, a
`{% generation %}` block (rendered as its body), `raise_exception`, `strftime_now`, and a
`tojson` filter that neither escapes HTML nor forces ASCII. The template sees `messages`,
`tools` and `documents` (None), `add_generation_prompt=True` and the tokenizer's special
tokens (`bos_token`, `eos_token`, ...). The text is tokenised without adding special tokens:
a template writes bos itself.

Where a template comes from, as transformers loads it: `chat_template.jinja` in the model
directory, else `chat_template` in `tokenizer_config.json` (a string, or named templates of
which `default` is used). A deployment's `--chat-template FILE` takes the place of both.

Messages reach the template in OpenAI's shape (fields that are not set are absent), with
the adaptations vLLM makes so that OpenAI clients meet templates written for transformers:
text parts are joined with newlines unless the template loops over `message.content`
itself; tool-call arguments that are JSON object text are given as the object (templates
write them with `tojson`); and `developer`, OpenAI's new name for `system`, is rendered as
`system` by templates that never mention it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from schemas.chat import ChatMessage, ToolCall

if TYPE_CHECKING:
    from workers.tokenizer import Tokenizer

# The special tokens transformers hands a template (its SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                  "cls_token", "mask_token")
TEMPLATE_FILE = "chat_template.jinja"


class ChatTemplateError(ValueError):
    """A template that does not compile, or one that refused (or failed on) the messages."""


class ChatTemplate:
    """One deployment's template: its source, where it came from, the special tokens it sees."""

    def __init__(self, source: str, origin: str, special_tokens: Mapping[str, str]) -> None:
        self.source = source
        self.origin = origin  # a path (and key), for messages
        self.special_tokens = dict(special_tokens)

    def check(self) -> None:
        """Compile now (cached), so a broken template stops a worker at start."""
        _compile(self.source, self.origin)

    def render(self, messages: Sequence[ChatMessage]) -> str:
        """The prompt text for `messages`, ending with the assistant's generation prompt."""
        template, parts = _compile(self.source, self.origin), _loops_over_content(self.source)
        developer = "developer" in self.source  # the template knows the role by name
        chat = [_template_message(m, parts, developer) for m in messages]
        try:
            return template.render(messages=chat, tools=None, documents=None,
                                   add_generation_prompt=True, **self.special_tokens)
        except jinja2.TemplateError as exc:  # raise_exception(...), undefined, sandbox
            raise ChatTemplateError(str(exc)) from None
        except Exception as exc:  # a template failing on some input must not stop a worker
            raise ChatTemplateError(f"{type(exc).__name__}: {exc}") from None


# ---- where templates come from ----------------------------------------------------------

def load_chat_template(model_dir: str | Path, tokenizer_config: Mapping[str, Any]
                       ) -> ChatTemplate | None:
    """The model directory's own template (not compiled yet), or None when it has none."""
    model_dir = Path(model_dir)
    tokens = special_tokens(model_dir, tokenizer_config)
    if (path := model_dir / TEMPLATE_FILE).is_file():
        return ChatTemplate(path.read_text(encoding="utf-8"), str(path), tokens)
    template = tokenizer_config.get("chat_template")
    origin = f"{model_dir / 'tokenizer_config.json'} chat_template"
    if isinstance(template, list):  # named templates, as transformers saves several
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    if isinstance(template, dict):
        if not isinstance(template.get("default"), str):
            raise ChatTemplateError(f"{origin}: templates {sorted(map(str, template))} and "
                                    "none named 'default'")
        template, origin = template["default"], origin + "['default']"
    return ChatTemplate(template, origin, tokens) if isinstance(template, str) else None


def deployment_template(tokenizer: Tokenizer | None, template_file: Path | None
                        ) -> ChatTemplate | None:
    """The template a deployment renders chats with: `template_file` (`--chat-template`)
    in place of the model's own; compiled here, so a broken one stops the worker at start
    rather than failing every chat."""
    if template_file is not None:
        if tokenizer is None:
            raise ChatTemplateError(f"--chat-template {template_file}: the model has no "
                                    "tokenizer.json to tokenise rendered chats with")
        try:
            source = template_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ChatTemplateError(f"--chat-template {template_file}: {exc}") from None
        template: ChatTemplate | None = ChatTemplate(source, str(template_file),
                                                     tokenizer.special_tokens)
    else:
        template = tokenizer.chat_template if tokenizer is not None else None
    if template is not None:
        template.check()
    return template


def special_tokens(model_dir: Path, tokenizer_config: Mapping[str, Any]) -> dict[str, str]:
    """Special-token names -> their text, as transformers' `special_tokens_map` gives them
    to templates (a legacy `special_tokens_map.json` counts when the config lists no added
    tokens, as there)."""
    config = dict(tokenizer_config)
    legacy = model_dir / "special_tokens_map.json"
    if "added_tokens_decoder" not in config and legacy.is_file():
        config.update(json.loads(legacy.read_text(encoding="utf-8")))
    names = list(SPECIAL_TOKENS)
    if isinstance(config.get("extra_special_tokens"), dict):  # model-specific named tokens
        names += [n for n in config["extra_special_tokens"] if n not in names]
        config = {**config["extra_special_tokens"], **config}
    tokens = {name: _token_text(config.get(name)) for name in names}
    return {name: text for name, text in tokens.items() if text is not None}


def _token_text(token: Any) -> str | None:
    # tokenizer_config.json writes special tokens as strings or as AddedToken dicts.
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


# ---- messages as templates see them ----------------------------------------------------

def _template_message(message: ChatMessage, parts: bool, developer: bool) -> dict[str, Any]:
    role = "system" if message.role == "developer" and not developer else message.role
    out: dict[str, Any] = {"role": role}
    if isinstance(message.content, list) and parts:
        out["content"] = [{"type": p.type, "text": p.text} for p in message.content]
    elif message.content is not None:
        out["content"] = message.text
    if message.name is not None:
        out["name"] = message.name
    if message.tool_calls is not None:
        out["tool_calls"] = [_template_call(c) for c in message.tool_calls]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


def _template_call(call: ToolCall) -> dict[str, Any]:
    arguments: Any = call.function.arguments
    try:
        parsed = json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        parsed = None  # not JSON (models write such calls too): the template gets the text
    if isinstance(parsed, dict):
        arguments = parsed
    return {"id": call.id, "type": call.type,
            "function": {"name": call.function.name, "arguments": arguments}}


# ---- the environment -------------------------------------------------------------------

class _GenerationBlock(jinja2.ext.Extension):
    """transformers' `{% generation %}...{% endgeneration %}` marks assistant text for
    training masks; a prompt needs only the text."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters; templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


_ENV = _environment()


@lru_cache(maxsize=32)
def _compile(source: str, origin: str) -> jinja2.Template:
    try:
        return _ENV.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"{origin}: does not compile: line {exc.lineno}: "
                                f"{exc.message}") from None


@lru_cache(maxsize=32)
def _loops_over_content(source: str) -> bool:
    """Whether the template iterates over a message's content (`{% for part in
    message['content'] %}`): then it takes OpenAI's parts; otherwise it wants text."""
    def is_content(node: nodes.Node) -> bool:
        if isinstance(node, nodes.Filter):  # message['content'] | selectattr(...)
            return node.node is not None and is_content(node.node)
        if isinstance(node, nodes.Getattr):
            return node.attr == "content"
        if isinstance(node, nodes.Getitem):
            return isinstance(node.arg, nodes.Const) and node.arg.value == "content"
        return False

    tree = _ENV.parse(source)
    return any(is_content(loop.iter) for loop in tree.find_all(nodes.For))
