"""Text <-> token ids through a Hugging Face `tokenizer.json` (the `tokenizers` library).

A model directory without `tokenizer.json` is served without text: `load_tokenizer` returns
None, requests must then carry `input_ids`, and results carry `text == ""`. The tokenizer
also carries the model's chat template and special tokens (`workers/chat_template.py`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from workers.chat_template import ChatTemplate, load_chat_template, special_tokens


class Tokenizer:
    """A fast tokenizer plus the bos/eos ids named by `tokenizer_config.json`."""

    def __init__(self, tokenizer: HFTokenizer, bos_id: int | None = None,
                 eos_id: int | None = None, special_tokens: dict[str, str] | None = None,
                 chat_template: ChatTemplate | None = None) -> None:
        self.tokenizer = tokenizer
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.special_tokens = special_tokens or {}  # bos_token -> "<s>", ... for templates
        self.chat_template = chat_template

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; the tokenizer's post-processor may add bos (as Llama's does)."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def load_tokenizer(path: str | Path) -> Tokenizer | None:
    """The tokenizer of a model directory, or None when it has no `tokenizer.json`."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        return None
    tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
    special: dict[str, Any] = {}
    if (cfg := path / "tokenizer_config.json").is_file():
        special = json.loads(cfg.read_text())
    return Tokenizer(tok, _token_id(tok, special.get("bos_token")),
                     _token_id(tok, special.get("eos_token")), special_tokens(path, special),
                     load_chat_template(path, special))


def _token_id(tok: HFTokenizer, token: str | dict[str, Any] | None) -> int | None:
    # tokenizer_config.json writes special tokens as strings or as AddedToken dicts.
    if isinstance(token, dict):
        token = token.get("content")
    return tok.token_to_id(token) if isinstance(token, str) else None
