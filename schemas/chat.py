"""Chat messages as OpenAI's chat API sends them: the `messages` of a Request.

The gateway passes them through unrendered; the worker renders them with its model's chat
template (`workers/chat_template.py`), since only the worker knows the model. Validation here
is of shape only (roles, which fields a role may carry); what a template accepts is the
template's to say.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from schemas.errors import SchemaError
from schemas.fields import spec

Role = Literal["system", "user", "assistant", "developer", "tool"]


@dataclass(frozen=True)
class TextPart:
    """One part of a content array; only text parts exist in Ferry (no images or audio)."""

    type: Literal["text"] = field(metadata=spec("Part type."))
    text: str = field(metadata=spec("The text."))


@dataclass(frozen=True)
class FunctionCall:
    name: str = field(metadata=spec("Function the assistant called.", minLength=1))
    arguments: str = field(metadata=spec(
        "Its arguments as JSON text (as the model wrote them); templates receive the parsed "
        "object when the text is a JSON object."))


@dataclass(frozen=True)
class ToolCall:
    """A call an earlier assistant turn made, sent back so the model sees its own history."""

    id: str = field(metadata=spec("Call id; the tool message answering it names it.",
                                  minLength=1))
    function: FunctionCall = field(metadata=spec("What was called."))
    type: Literal["function"] = field(default="function", metadata=spec("Call type."))


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a conversation."""

    role: Role = field(metadata=spec(
        "Who speaks; developer is rendered as system by templates that do not know it."))
    content: str | list[TextPart] | None = field(default=None, metadata=spec(
        "Text, or an array of text parts (joined with newlines for templates that expect "
        "text); null only on an assistant message with tool_calls."))
    name: str | None = field(default=None, metadata=spec(
        "Optional name of the participant.", minLength=1))
    tool_calls: list[ToolCall] | None = field(default=None, metadata=spec(
        "Assistant only: the tool calls it made.", minItems=1))
    tool_call_id: str | None = field(default=None, metadata=spec(
        "Tool only (and required there): the call this message answers.", minLength=1))

    # What __post_init__ checks, for JSON Schema (schemas/fields.py).
    json_schema_rules: ClassVar[dict[str, Any]] = {"allOf": [
        {"if": {"required": ["tool_calls"],
                "properties": {"role": {"const": "assistant"}, "tool_calls": {"type": "array"}}},
         "else": {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}}},
        {"properties": {"content": {"if": {"type": "array"}, "then": {"minItems": 1}}}},
        {"if": {"properties": {"role": {"const": "assistant"}}},
         "else": {"properties": {"tool_calls": {"type": "null"}}}},
        {"if": {"properties": {"role": {"const": "tool"}}},
         "then": {"required": ["tool_call_id"],
                  "properties": {"tool_call_id": {"type": "string"}}},
         "else": {"properties": {"tool_call_id": {"type": "null"}}}},
    ]}

    def __post_init__(self) -> None:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise SchemaError("content", "is required (null only on an assistant message "
                                         "with tool_calls)")
        if isinstance(self.content, list) and not self.content:
            raise SchemaError("content", "must not be an empty array")
        if self.tool_calls is not None and self.role != "assistant":
            raise SchemaError("tool_calls", "only assistant messages carry tool_calls")
        if self.role == "tool" and self.tool_call_id is None:
            raise SchemaError("tool_call_id", "is required on a tool message")
        if self.role != "tool" and self.tool_call_id is not None:
            raise SchemaError("tool_call_id", "only tool messages carry tool_call_id")

    @property
    def text(self) -> str:
        """The message's text: content parts joined with newlines ("" for none)."""
        if isinstance(self.content, list):
            return "\n".join(part.text for part in self.content)
        return self.content or ""


def messages_text(messages: list[ChatMessage]) -> str:
    """Roles and texts of a conversation, for what must not wait for the template: quota
    estimates and the batch key's prefix hash (a shared system prompt comes first)."""
    return "".join(f"{m.role}\n{m.text}\n" for m in messages)
