"""The previous static-batch engine, kept only so the engine benchmark can compare against it.

Not used in serving (see `workers.engine`). One batch of token prompts in, one completion
per prompt out.

Kafka-agnostic. A batch runs together: prompts are left-padded so their last tokens line
up, one prefill fills the KV cache, then one token per step for every row until each row
has finished (eos, a stop string, or its own `max_new_tokens`). A row's result does not
depend on its batch mates: greedy rows take the argmax, sampled rows draw from their own
seeded generator, and padding is masked out of attention and of the RoPE positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from workers.engine import GenerationInput, GenerationOutput, SamplingParams
from workers.loader import load_model
from workers.model import ModelConfig, Transformer
from workers.tokenizer import Tokenizer, load_tokenizer


@dataclass
class _Row:
    """One request's progress through a batch."""

    params: SamplingParams
    prompt_tokens: int
    generator: torch.Generator | None
    ids: list[int] = field(default_factory=list)
    text: str | None = None          # set once the stop check has cut it
    finish_reason: str | None = None


class StaticEngine:
    """Static-batch generation with a `Transformer`; see the module docstring."""

    def __init__(self, model: Transformer, config: ModelConfig, tokenizer: Tokenizer | None,
                 device: str | torch.device = "cpu") -> None:
        self.model = model
        self.config = config
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.max_context: int = config.max_position_embeddings
        eos = config.eos_token_ids  # config.json, overridden by generation_config.json
        if not eos and tokenizer is not None and tokenizer.eos_id is not None:
            eos = (tokenizer.eos_id,)
        self.eos_ids = frozenset(eos)

    @classmethod
    def from_dir(cls, path: str | Path, device: str | torch.device = "cpu",
                 dtype: torch.dtype | str | None = None) -> StaticEngine:
        """Model and tokenizer from a Hugging Face layout directory (see `load_model`)."""
        model, config = load_model(path, device=device, dtype=dtype)
        return cls(model, config, load_tokenizer(path), device)

    @property
    def healthy(self) -> bool:
        """A single-process engine stays usable; a ranked one reports its ranks' state."""
        return True

    def encode(self, prompt: str) -> list[int]:
        """Prompt text to ids (bos included if the tokenizer adds it)."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer.json: send input_ids instead of text")
        return self.tokenizer.encode(prompt)

    @torch.inference_mode()
    def generate(self, batch: list[GenerationInput]) -> list[GenerationOutput]:
        """Complete every prompt of `batch` together; outputs are in the same order.

        Raises ValueError (before any compute) for an empty prompt, a token outside the
        vocabulary, prompt + max_new_tokens over `max_context`, or bad sampling params.
        """
        for i, item in enumerate(batch):
            self._check(i, item)
        rows = [_Row(x.params, len(x.input_ids), self._generator(x.params)) for x in batch]
        steps = max((x.params.max_new_tokens for x in batch), default=0)
        for row in rows:
            if row.params.max_new_tokens == 0:
                row.finish_reason = "length"
        if steps > 0:
            self._run(batch, rows, steps)
        return [self._output(row) for row in rows]

    @torch.inference_mode()
    def score(self, prompt_ids: list[int], target_ids: list[int]) -> float:
        """Mean log-probability per token of `target_ids` following `prompt_ids`, teacher-
        forced in one forward pass (how likely this model finds another model's answer)."""
        if not prompt_ids or not target_ids:
            raise ValueError("score: prompt and target must both be non-empty")
        if len(prompt_ids) + len(target_ids) > self.max_context:
            raise ValueError(f"score: {len(prompt_ids) + len(target_ids)} tokens exceed the "
                             f"context of {self.max_context}")
        ids = torch.tensor([prompt_ids + target_ids], device=self.device)
        positions = torch.arange(ids.shape[1], device=self.device)[None]
        # Logits at position t predict token t + 1: the last len(target) predictions score it.
        logits = self.model(ids, positions, logits_to_keep=len(target_ids) + 1)[0, :-1]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        target = torch.tensor(target_ids, device=self.device)
        return float(logprobs.gather(-1, target[:, None]).mean())

    def _check(self, i: int, item: GenerationInput) -> None:
        ids, p = item.input_ids, item.params
        if not ids:
            raise ValueError(f"batch[{i}]: input_ids is empty")
        if min(ids) < 0 or max(ids) >= self.config.vocab_size:
            raise ValueError(f"batch[{i}]: input_ids outside the vocabulary "
                             f"[0, {self.config.vocab_size})")
        if p.max_new_tokens < 0:
            raise ValueError(f"batch[{i}]: max_new_tokens must be >= 0")
        if len(ids) + p.max_new_tokens > self.max_context:
            raise ValueError(f"batch[{i}]: {len(ids)} prompt tokens + max_new_tokens "
                             f"{p.max_new_tokens} exceed the context of {self.max_context}")
        if p.temperature < 0 or not 0 < p.top_p <= 1:
            raise ValueError(f"batch[{i}]: need temperature >= 0 and 0 < top_p <= 1")

    def _generator(self, params: SamplingParams) -> torch.Generator | None:
        if params.temperature == 0:
            return None
        gen = torch.Generator(device=self.device)
        if params.seed is None:
            gen.seed()
        else:
            gen.manual_seed(params.seed)
        return gen

    def _run(self, batch: list[GenerationInput], rows: list[_Row], steps: int) -> None:
        B, L = len(batch), max(len(x.input_ids) for x in batch)
        # Slots: L prompt columns, then one per decode step (the last token is not fed back).
        total = L + steps - 1
        ids = torch.zeros(B, L, dtype=torch.long)
        valid = torch.ones(B, total, dtype=torch.bool)
        for i, x in enumerate(batch):
            ids[i, L - len(x.input_ids):] = torch.tensor(x.input_ids)
            valid[i, :L - len(x.input_ids)] = False
        ids, valid = ids.to(self.device), valid.to(self.device)
        pos = (valid.cumsum(-1) - 1).clamp(min=0)  # each row's positions start at 0
        slots = torch.arange(total, device=self.device)
        cache = self.model.new_cache(B, total)

        # Prefill: causal and not padding; padded queries see themselves (no all-masked rows).
        causal = torch.ones(L, L, dtype=torch.bool, device=self.device).tril()
        eye = torch.eye(L, dtype=torch.bool, device=self.device)
        mask = (causal & valid[:, None, None, :L]) | eye
        logits = self.model(ids, pos[:, :L], cache, mask, slots[:L], logits_to_keep=1)
        for step in range(steps):
            tokens = self._sample(logits[:, -1], rows)
            for row, token in zip(rows, tokens.tolist()):
                if row.finish_reason is None:
                    self._advance(row, token)
            if step == steps - 1 or all(row.finish_reason for row in rows):
                break
            s = L + step
            logits = self.model(tokens[:, None], pos[:, s:s + 1], cache,
                                valid[:, None, None, :s + 1], slots[s:s + 1], logits_to_keep=1)

    def _sample(self, logits: Tensor, rows: list[_Row]) -> Tensor:
        """Next token per row (B,): argmax, or a draw from the row's own generator."""
        logits = logits.float()
        tokens = logits.argmax(-1)
        for i, row in enumerate(rows):
            if row.generator is not None and row.finish_reason is None:
                tokens[i] = _sample_top_p(logits[i], row.params, row.generator)
        return tokens

    def _advance(self, row: _Row, token: int) -> None:
        if token in self.eos_ids:
            row.finish_reason = "stop"
            return
        row.ids.append(token)
        if row.params.stop and self.tokenizer is not None and self._cut_at_stop(row):
            row.finish_reason = "stop"
        elif len(row.ids) >= row.params.max_new_tokens:
            row.finish_reason = "length"

    def _cut_at_stop(self, row: _Row) -> bool:
        """If the completion now contains a stop string, cut text and ids before it.

        Decodes the whole completion each step, but only for rows that have stop strings.
        output_ids keeps the longest prefix whose decoding fits before the stop, so a token
        that straddles the stop is dropped whole (approximate at multi-byte boundaries).
        """
        assert self.tokenizer is not None
        text = self.tokenizer.decode(row.ids)
        hits = [i for i in (text.find(s) for s in row.params.stop if s) if i >= 0]
        if not hits:
            return False
        row.text = text[:min(hits)]
        keep = len(row.ids)
        while keep > 0 and len(self.tokenizer.decode(row.ids[:keep])) > len(row.text):
            keep -= 1
        del row.ids[keep:]
        return True

    def _output(self, row: _Row) -> GenerationOutput:
        text = row.text
        if text is None:
            text = self.tokenizer.decode(row.ids) if self.tokenizer is not None else ""
        return GenerationOutput(row.ids, text, row.finish_reason or "length", row.prompt_tokens)


def _sample_top_p(logits: Tensor, params: SamplingParams, gen: torch.Generator) -> Tensor:
    """One token from softmax(logits / T), restricted to the top_p nucleus."""
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p >= 1:
        return torch.multinomial(probs, 1, generator=gen)[0]
    probs, order = probs.sort(descending=True)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    probs[(probs.cumsum(-1) - probs) >= params.top_p] = 0
    return order[torch.multinomial(probs, 1, generator=gen)[0]]
