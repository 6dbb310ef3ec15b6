"""Train a small Llama-architecture model on the CPU, writing a checkpoint every N steps.

For the "deploy every checkpoint" demo: each `out_dir/checkpoint-<step>/` is a complete
Hugging Face layout directory (config, tokenizer, `model.safetensors`, plus
`trainer_state.json`) that `workers.loader` and `Engine.from_dir` load unchanged. Files are
written in place, weights last, then an empty `COMPLETE` marker, as real training jobs do:
a deployer treats a directory as finished once `COMPLETE` exists (or after a settle time).

The corpus is offline and deterministic: `model_factory.CORPUS` plus the docstrings of a
fixed list of standard-library modules (identical for a given Python version). Every 20th
chunk of the token stream is held out for validation. With the same seed, thread count and
versions, the weights are identical.

    python -m models.trainer OUT --steps 300 --every 100
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.factory import CORPUS, build_tiny_checkpoint, write_weights
from workers.checkpoint_files import COMPLETE, SINGLE_FILE
from workers.loader import read_config
from workers.model import Transformer
from workers.tokenizer import load_tokenizer

DOC_MODULES = ("json", "asyncio", "collections", "functools", "itertools", "pathlib",
               "argparse", "logging", "statistics", "textwrap", "string", "random", "heapq",
               "bisect", "dataclasses", "enum", "typing", "re", "unittest")
STATE_FILE = "trainer_state.json"
VAL_EVERY = 20  # every 20th chunk is validation: 5%, spread over the whole corpus


@dataclass(frozen=True)
class CheckpointInfo:
    """One written checkpoint."""

    step: int
    path: Path
    train_loss: float   # mean over the steps since the previous checkpoint
    val_loss: float     # mean over the whole held-out slice
    seconds: float      # since training started (setup excluded)


@dataclass(frozen=True)
class Data:
    """Token streams: random training windows come from `train`, validation is fixed."""

    train: Tensor       # (N,) the training chunks, concatenated
    val: Tensor         # (M, seq_len) the held-out chunks
    bos: int


def stdlib_docs() -> str:
    """Docstrings of DOC_MODULES, their public classes and functions and those classes'
    public methods, in a fixed order, each once. Needs nothing but the interpreter."""
    docs: dict[str, None] = {}  # ordered set: inherited and re-exported docs appear once
    with warnings.catch_warnings():  # typing.io / typing.re warn when touched
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in DOC_MODULES:
            module = importlib.import_module(name)
            for obj in [module, *_public_members(module, name)]:
                for doc in [obj.__doc__, *_method_docs(obj)]:
                    if isinstance(doc, str) and (doc := inspect.cleandoc(doc)):
                        docs[doc] = None
    return "\n\n".join(docs) + "\n"


def _public_members(module: object, name: str) -> Iterator[object]:
    for attr in sorted(dir(module)):
        obj = getattr(module, attr)
        if (not attr.startswith("_") and (inspect.isclass(obj) or inspect.isroutine(obj))
                and (getattr(obj, "__module__", None) or "").split(".")[0] == name):
            yield obj


def _method_docs(obj: object) -> Iterator[str | None]:
    if inspect.isclass(obj):
        for attr, value in sorted(vars(obj).items()):
            if not attr.startswith("_") and inspect.isroutine(value):
                yield getattr(value, "__doc__", None)


def make_data(ids: list[int], bos: int, seq_len: int) -> Data:
    """Cut the stream into seq_len chunks; hold out every VAL_EVERY-th one."""
    chunks = torch.tensor(ids[:len(ids) // seq_len * seq_len]).view(-1, seq_len)
    is_val = torch.arange(len(chunks)) % VAL_EVERY == VAL_EVERY // 2
    if not is_val.any() or (~is_val).sum() < 2:
        raise ValueError(f"corpus too small: {len(ids)} tokens give no validation slice "
                         f"at seq_len {seq_len}")
    return Data(train=chunks[~is_val].flatten(), val=chunks[is_val], bos=bos)


def train(out_dir: str | Path, *, steps: int, every: int, seq_len: int = 128,
          batch_size: int = 16, lr: float = 3e-3, seed: int = 0, corpus: str | None = None,
          vocab_size: int = 1024, hidden_size: int = 128, intermediate_size: int = 384,
          num_hidden_layers: int = 4, num_attention_heads: int = 4,
          num_key_value_heads: int = 2, complete_marker: bool = True,
          progress: Callable[[CheckpointInfo], None] | None = None) -> list[CheckpointInfo]:
    """Train for `steps` AdamW steps; write `checkpoint-<step>` every `every` steps and at
    the end. corpus: text appended to `CORPUS` (default: `stdlib_docs()`); the tokenizer is
    trained on the same text. Refuses an `out_dir` that already holds checkpoints, since a
    deployer may have served them."""
    if steps < 1 or every < 1:
        raise ValueError("steps and every must be >= 1")
    out = Path(out_dir)
    if any(out.glob("checkpoint-*")):
        raise FileExistsError(f"{out}: already holds checkpoints")
    out.mkdir(parents=True, exist_ok=True)
    extra = stdlib_docs() if corpus is None else corpus
    with tempfile.TemporaryDirectory() as tmp:
        # The factory writes config, generation config and tokenizer exactly as the loader
        # expects; every checkpoint copies them and brings its own weights.
        template = build_tiny_checkpoint(
            Path(tmp) / "template", vocab_size=vocab_size, hidden_size=hidden_size,
            intermediate_size=intermediate_size, num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
            max_position_embeddings=max(256, seq_len), seed=seed, corpus=extra)
        (template / SINGLE_FILE).unlink()  # random weights: never copied
        tokenizer = load_tokenizer(template)
        assert tokenizer is not None and tokenizer.bos_id is not None
        ids = tokenizer.encode(CORPUS + extra, add_special_tokens=False)  # the tokenizer's text
        data = make_data(ids, tokenizer.bos_id, seq_len)
        gen = torch.Generator().manual_seed(seed)
        model = init_model(Transformer(read_config(template)), gen)
        return _loop(model, data, template, out, gen, steps=steps, every=every,
                     seq_len=seq_len, batch_size=batch_size, lr=lr,
                     complete_marker=complete_marker, progress=progress)


def init_model(model: Transformer, gen: torch.Generator) -> Transformer:
    """GPT-style init N(0, 0.02) from `gen`, residual outputs scaled down by depth so the
    residual stream does not grow with the layer count; norms start at one."""
    residual_std = 0.02 / math.sqrt(2 * len(model.model.layers))
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            nn.init.ones_(p)
        else:
            std = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
            nn.init.normal_(p, std=std, generator=gen)
    return model


def _loop(model: Transformer, data: Data, template: Path, out: Path, gen: torch.Generator,
          *, steps: int, every: int, seq_len: int, batch_size: int, lr: float,
          complete_marker: bool,
          progress: Callable[[CheckpointInfo], None] | None) -> list[CheckpointInfo]:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    positions = torch.arange(seq_len).expand(batch_size, seq_len)
    infos: list[CheckpointInfo] = []
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(step, steps)
        starts = torch.randint(0, len(data.train) - seq_len + 1, (batch_size,), generator=gen)
        inputs, targets = windows(data.train, starts, seq_len, data.bos)
        model.train()
        loss = F.cross_entropy(model(inputs, positions).flatten(0, 1), targets.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % every == 0 or step == steps:
            info = CheckpointInfo(step, out / f"checkpoint-{step}", sum(losses) / len(losses),
                                  val_loss(model, data, batch_size),
                                  time.perf_counter() - start)
            write_checkpoint(model, template, info, complete_marker)
            infos.append(info)
            losses.clear()
            if progress is not None:
                progress(info)
    return infos


def lr_factor(step: int, steps: int) -> float:
    """Linear warmup over the first 10% (at most 20 steps), then cosine down to 10%."""
    warmup = max(1, min(20, steps // 10))
    if step <= warmup:
        return step / warmup
    done = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * done))


def windows(stream: Tensor, starts: Tensor, seq_len: int, bos: int) -> tuple[Tensor, Tensor]:
    """Inputs are `<s>` plus the first seq_len - 1 tokens of each window, targets the
    seq_len tokens: every window starts like an encoded prompt does."""
    tokens = stream[starts[:, None] + torch.arange(seq_len)]
    return _after_bos(tokens, bos), tokens


def _after_bos(tokens: Tensor, bos: int) -> Tensor:
    return torch.cat([torch.full_like(tokens[:, :1], bos), tokens[:, :-1]], dim=1)


@torch.no_grad()
def val_loss(model: Transformer, data: Data, batch_size: int) -> float:
    """Mean next-token cross-entropy over every held-out chunk."""
    model.eval()
    seq_len = data.val.shape[1]
    total = 0.0
    for batch in data.val.split(batch_size * 4):
        logits = model(_after_bos(batch, data.bos), torch.arange(seq_len).expand_as(batch))
        total += F.cross_entropy(logits.flatten(0, 1), batch.flatten(), reduction="sum").item()
    return total / data.val.numel()


def write_checkpoint(model: Transformer, template: Path, info: CheckpointInfo,
                     complete_marker: bool) -> None:
    """Write in place, weights last, then the empty COMPLETE marker as the very last act."""
    info.path.mkdir()
    for file in sorted(template.iterdir()):
        shutil.copyfile(file, info.path / file.name)
    state = {"step": info.step, "train_loss": info.train_loss, "val_loss": info.val_loss}
    (info.path / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    write_weights(info.path, model.state_dict(), shards=1)
    if complete_marker:
        (info.path / COMPLETE).touch()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.trainer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice); fix it to reproduce "
                        "weights across machines")
    p.add_argument("--no-complete-marker", action="store_true",
                   help=f"skip the {COMPLETE} file (deployers then rely on a settle time)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    def report(info: CheckpointInfo) -> None:
        print(f"step {info.step:5d}  train {info.train_loss:.3f}  val {info.val_loss:.3f}  "
              f"{info.seconds:6.1f}s  {info.path}", flush=True)

    train(args.out_dir, steps=args.steps, every=args.every, seq_len=args.seq_len,
          batch_size=args.batch_size, lr=args.lr, seed=args.seed,
          complete_marker=not args.no_complete_marker, progress=report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
