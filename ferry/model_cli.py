"""`ferry model ...` (checkpoints and the model store) and `ferry train`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    model = sub.add_parser("model", help="checkpoints")
    model.set_defaults(func=_model)
    msub = model.add_subparsers(dest="action", required=True)
    tiny = msub.add_parser("tiny", help="build a small random Llama checkpoint + tokenizer")
    tiny.add_argument("out", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--layers", type=int, default=2)
    tiny.add_argument("--hidden", type=int, default=64)

    push = msub.add_parser("push", help="upload a checkpoint to a model store, in parallel")
    push.add_argument("src", type=Path)
    push.add_argument("target", help="STORE/NAME/VERSION")
    push.add_argument("--parallel", type=int, default=4)
    push.add_argument("--chunk-mb", type=int, default=64)
    reshard = msub.add_parser("reshard", help="split a checkpoint into per-rank TP slices")
    reshard.add_argument("src", type=Path)
    reshard.add_argument("--tp", type=int, required=True)
    reshard.add_argument("--out", type=Path, required=True)
    merge = msub.add_parser("merge", help="per-rank TP partitions back to one HF checkpoint")
    merge.add_argument("src", type=Path)
    merge.add_argument("--out", type=Path, required=True)
    verify = msub.add_parser("verify", help="check every file of a stored version")
    verify.add_argument("target", help="STORE/NAME/VERSION")
    verify.add_argument("--sizes-only", action="store_true")

    # `ferry.cli.main` hands `ferry train ...` to models.trainer unparsed; listed for --help
    # (and reached here only after a global flag: `ferry --debug train ...`).
    train = sub.add_parser("train", help="train a tiny model, writing a checkpoint every N "
                                         "steps (ferry train OUT --steps 300 --every 100; "
                                         "--help for more)")
    train.add_argument("trainer_args", nargs=argparse.REMAINDER, help="models.trainer's")
    train.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    from models.trainer import main as train_main

    return train_main(args.trainer_args)


def _model(args: argparse.Namespace) -> int:
    from models.store import StoreError, parse_target, push, verify

    try:
        if args.action == "tiny":
            from models.factory import build_tiny_checkpoint

            print(build_tiny_checkpoint(args.out, seed=args.seed, num_hidden_layers=args.layers,
                                        hidden_size=args.hidden))
        elif args.action == "push":
            manifest = push(args.src, args.target, parallel=args.parallel,
                            chunk_bytes=args.chunk_mb << 20, progress=_progress_bar())
            size = sum(f.size for f in manifest.files)
            print(f"\npublished {args.target}: {len(manifest.files)} files, {size / 2**20:.1f} MiB")
        elif args.action == "reshard":
            from workers.reshard import reshard

            print(reshard(args.src, args.tp, args.out))
        elif args.action == "merge":
            from workers.reshard import merge

            print(merge(args.src, args.out))
        elif args.action == "verify":
            store, name, version = parse_target(args.target)
            manifest = verify(store / name / version, full=not args.sizes_only)
            print(f"ok {args.target}: {len(manifest.files)} files verified")
    except (StoreError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _progress_bar() -> Callable[[int, int], None]:
    def show(done: int, total: int) -> None:
        pct = 100 * done / total if total else 100
        print(f"\r{done / 2**20:8.1f} / {total / 2**20:.1f} MiB ({pct:5.1f}%)", end="",
              file=sys.stderr, flush=True)
    return show
