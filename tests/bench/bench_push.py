"""Model store push benchmark: `push` against a plain sequential copy of the same files.

Run: `python -m tests.bench.bench_push`. The source is 8 files of random bytes plus one file
as large as the eight together (BENCH_PUSH_MB in all, default 1024), written under a temp
directory and deleted afterwards; every mode copies it to the same disk, one mode after
another in one process, so the ratios are what to read. Each mode runs BENCH_REPEAT times
(default 2) and the best time counts.

What is compared: "sequential copy" is what a careful script does without the store,
shutil.copyfile one file after another, then sha256 of the source (a second read) and an
fsync per file, since push also hashes every byte and fsyncs before publishing. "copy only"
(no hash, no fsync) is the ceiling for the raw copy. The source is warm in the page cache in
every mode, so this measures writing to the volume plus hashing, not reading a cold disk.
Results go to tests/bench/results/push.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from models.store import push
from tests.bench.common import write_results

TOTAL_MB = int(os.environ.get("BENCH_PUSH_MB", "1024"))
REPEAT = int(os.environ.get("BENCH_REPEAT", "2"))
SMALL_FILES = 8
RESULTS = Path(__file__).parent / "results" / "push.json"


def make_source(root: Path) -> int:
    """8 files sharing half of TOTAL_MB, one big file the other half; returns bytes."""
    root.mkdir()
    small, big = (TOTAL_MB << 20) // 2 // SMALL_FILES, (TOTAL_MB << 20) // 2
    sizes = {f"model-{i:05d}.safetensors": small for i in range(SMALL_FILES)}
    sizes["consolidated.safetensors"] = big
    for name, size in sizes.items():
        with open(root / name, "wb") as f:
            for _ in range(0, size, 16 << 20):
                f.write(os.urandom(min(16 << 20, size - f.tell())))
    (root / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return sum(p.stat().st_size for p in root.iterdir())


def copy_only(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True)
    for file in sorted(src.iterdir()):
        shutil.copyfile(file, dst / file.name)


def sequential_copy(src: Path, dst: Path) -> None:
    """copyfile, then sha256 of the source and fsync, one file after another."""
    dst.mkdir(parents=True)
    for file in sorted(src.iterdir()):
        shutil.copyfile(file, dst / file.name)
        with open(file, "rb") as f:
            hashlib.file_digest(f, "sha256").hexdigest()
        fd = os.open(dst / file.name, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def store_push(parallel: int) -> Callable[[Path, Path], None]:
    return lambda src, dst: push(src, dst / "bench" / "v1", parallel=parallel)


def best_time(run: Callable[[Path, Path], None], src: Path, scratch: Path) -> float:
    """Best of REPEAT runs, each into a fresh directory deleted afterwards (disk space)."""
    times = []
    for _ in range(REPEAT):
        dst = scratch / "dst"
        start = time.perf_counter()
        run(src, dst)
        times.append(time.perf_counter() - start)
        shutil.rmtree(dst)
    return min(times)


def main() -> None:
    modes: dict[str, Callable[[Path, Path], None]] = {
        "sequential copy (+sha256, fsync)": sequential_copy,
        "copy only (no hash, no fsync)": copy_only,
        "push parallel=1": store_push(1),
        "push parallel=4": store_push(4),
        "push parallel=8": store_push(8),
    }
    with tempfile.TemporaryDirectory(prefix="ferry-bench-push-") as tmp:
        src = Path(tmp) / "src"
        total = make_source(src)
        rows = [{"mode": name, "seconds": best_time(run, src, Path(tmp))}
                for name, run in modes.items()]
    base = rows[0]["seconds"]
    for row in rows:
        row["mib_per_s"] = total / (1 << 20) / row["seconds"]
        row["ratio_vs_sequential_copy"] = base / row["seconds"]
    print(f"\n{total / (1 << 20):.0f} MiB in {SMALL_FILES + 2} files "
          f"(largest {TOTAL_MB // 2} MiB), best of {REPEAT}, {os.cpu_count()} CPUs")
    print(f"{'mode':<36}{'s':>8}{'MiB/s':>9}{'vs seq':>9}")
    for row in rows:
        print(f"{row['mode']:<36}{row['seconds']:>8.2f}{row['mib_per_s']:>9.0f}"
              f"{row['ratio_vs_sequential_copy']:>9.2f}")
    write_results(RESULTS, total_bytes=total, repeat=REPEAT, rows=rows)


if __name__ == "__main__":
    main()
