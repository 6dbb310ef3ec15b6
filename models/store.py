"""The model store: versioned checkpoints on a shared volume, laid out as STORE/NAME/VERSION/.

Weights never live in an image: `push` uploads a checkpoint directory into the store and
workers load it back by NAME/VERSION through `open_version`. A version is published when its
directory holds `manifest.json` (every file's path, size and sha256, plus config.json and
sharding.json when the source has them). Uploads go to `NAME/.VERSION.partial/`, with one
completion record per finished file under `.done/` so an interrupted push resumes where it
stopped, and become visible only through one atomic rename once every byte is on disk.

Why one long module: upload, resume, verify and open share the manifest format and the
locking rules of one store layout.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT = 1
MANIFEST = "manifest.json"
DONE_DIR = ".done"
BLOCK = 4 << 20  # read/write unit: large enough for throughput, small enough for memory
Progress = Callable[[int, int], None]  # (bytes done, bytes total)
_COMPONENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")  # no leading dot: those are ours


class StoreError(Exception):
    """A store operation failed; the message names the offending file or path."""


@dataclass
class ManifestFile:
    path: str  # relative, '/'-separated
    size: int
    sha256: str


@dataclass
class Manifest:
    name: str
    version: str
    files: list[ManifestFile]
    config: dict[str, Any] | None
    sharding: dict[str, Any] | None
    created_at: float

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, **asdict(self)}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parse and validate; paths must stay inside the version directory."""
        data = json.loads(text)
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {FORMAT}")
        files = [ManifestFile(str(f["path"]), int(f["size"]), str(f["sha256"]))
                 for f in data["files"]]
        for f in files:
            if Path(f.path).is_absolute() or ".." in Path(f.path).parts:
                raise ValueError(f"file path {f.path!r} leaves the version directory")
        return cls(str(data["name"]), str(data["version"]), files, data.get("config"),
                   data.get("sharding"), float(data["created_at"]))


def parse_target(target: str | Path) -> tuple[Path, str, str]:
    """"STORE/NAME/VERSION" -> (store, name, version); NAME and VERSION are one component."""
    parts = Path(target).parts
    if len(parts) < 3:
        raise StoreError(f"{target}: expected STORE/NAME/VERSION")
    _check_component(parts[-2], "name", target)
    _check_component(parts[-1], "version", target)
    return Path(*parts[:-2]), parts[-2], parts[-1]


def _check_component(value: str, what: str, target: str | Path) -> None:
    if not _COMPONENT.fullmatch(value):
        raise StoreError(f"{target}: {what} {value!r} must match {_COMPONENT.pattern}")


# --- push -----------------------------------------------------------------------------------

def push(src: Path, target: str | Path, *, parallel: int = 4, chunk_bytes: int = 64 << 20,
         progress: Progress | None = None) -> Manifest:
    """Upload checkpoint directory `src` as STORE/NAME/VERSION and publish it atomically.

    Files go up `parallel` at a time, files larger than `chunk_bytes` in chunks. Re-running
    after an interruption skips the files already finished. Pushing identical content to a
    published version is a no-op that returns its manifest; different content is an error.
    """
    if parallel < 1 or chunk_bytes < 1:
        raise ValueError(f"parallel={parallel} and chunk_bytes={chunk_bytes} must be >= 1")
    src = Path(src)
    store, name, version = parse_target(target)
    sources = _source_files(src)
    final = store / name / version
    with _push_lock(store / name, version):
        if final.exists():
            return _same_as_published(final, src, sources, parallel)
        staging = store / name / f".{version}.partial"
        files = _upload(src, staging, sources, parallel, chunk_bytes, progress)
        manifest = Manifest(name, version, files, _optional_json(staging / "config.json"),
                            _optional_json(staging / "sharding.json"), time.time())
        _publish(staging, final, manifest)
        return manifest


def _source_files(src: Path) -> dict[str, os.stat_result]:
    """Relative path -> stat of every file to upload; dot-files (.git, .cache) stay behind."""
    if not src.is_dir():
        raise StoreError(f"{src}: not a directory")
    found = {}
    for root, dirs, names in os.walk(src):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for n in sorted(names):
            path = Path(root) / n
            if not n.startswith(".") and path.is_file():  # follows HF cache symlinks
                found[path.relative_to(src).as_posix()] = path.stat()
    if MANIFEST in found:
        raise StoreError(f"{src / MANIFEST}: reserved name, the store writes its own")
    if not found:
        raise StoreError(f"{src}: no files to push")
    return found


@contextmanager
def _push_lock(name_dir: Path, version: str) -> Iterator[None]:
    """One pusher per version: two would write the same staging files."""
    name_dir.mkdir(parents=True, exist_ok=True)
    lock = name_dir / f".{version}.lock"
    with open(lock, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(f"{lock}: another push of this version is running") from None
        yield


def _same_as_published(final: Path, src: Path, sources: dict[str, os.stat_result],
                       parallel: int) -> Manifest:
    if not (final / MANIFEST).is_file():
        raise StoreError(f"{final}: exists but is not published (no {MANIFEST}); remove it")
    manifest = _read_manifest(final)
    theirs = {f.path: (f.size, f.sha256) for f in manifest.files}
    differ = sorted(rel for rel in sources.keys() | theirs.keys()
                    if rel not in sources or rel not in theirs
                    or sources[rel].st_size != theirs[rel][0])
    if not differ:  # same names and sizes: only the hashes can tell
        hashes = _sha256_many([src / rel for rel in sources], parallel)
        differ = sorted(rel for rel, h in zip(sources, hashes) if h != theirs[rel][1])
    if differ:
        raise StoreError(f"{final}: already published with different content "
                         f"({', '.join(differ[:5])}{' ...' if len(differ) > 5 else ''})")
    return manifest


@dataclass
class _Upload:
    """One file on its way into staging: its tasks still running and its hash once known."""
    rel: str
    src: Path
    dst: Path
    record: Path  # .done/<rel>.json, written once the file is complete and durable
    stat: os.stat_result
    pending: int = 0
    sha256: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Counter:
    """Bytes done across threads, reported in order through the caller's callback."""

    def __init__(self, total: int, callback: Progress | None) -> None:
        self.done, self.total, self.callback = 0, total, callback
        self.lock = threading.Lock()

    def add(self, n: int) -> None:
        with self.lock:
            self.done += n
            if self.callback:
                self.callback(self.done, self.total)


def _upload(src: Path, staging: Path, sources: dict[str, os.stat_result], parallel: int,
            chunk_bytes: int, progress: Progress | None) -> list[ManifestFile]:
    _drop_strays(staging, set(sources))
    uploads = [_Upload(rel, src / rel, staging / rel, staging / DONE_DIR / f"{rel}.json", st)
               for rel, st in sources.items()]
    for up in uploads:
        up.sha256 = _completed_hash(up)
    counter = _Counter(sum(st.st_size for st in sources.values()), progress)
    counter.add(sum(up.stat.st_size for up in uploads if up.sha256 is not None))
    todo = sorted((up for up in uploads if up.sha256 is None), key=lambda u: -u.stat.st_size)
    with ThreadPoolExecutor(parallel, thread_name_prefix="ferry-push") as pool:
        futures = [f for up in todo for f in _schedule(pool, up, chunk_bytes, counter)]
        try:
            for future in as_completed(futures):  # biggest files were queued first: less tail
                future.result()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # finish running chunks, start none
            raise
    return [ManifestFile(up.rel, up.stat.st_size, str(up.sha256)) for up in uploads]


def _drop_strays(staging: Path, wanted: set[str]) -> None:
    """Files an earlier run left that the source no longer has would fail verify later."""
    if staging.is_dir():
        for rel in _all_files(staging) - wanted:
            if not rel.startswith(f"{DONE_DIR}/"):
                (staging / rel).unlink()


def _completed_hash(up: _Upload) -> str | None:
    """The recorded sha256 if an earlier run finished this very file (same size and mtime)."""
    try:
        record = json.loads(up.record.read_text())
        same = (record["size"], record["mtime_ns"]) == (up.stat.st_size, up.stat.st_mtime_ns)
        return record["sha256"] if same and up.dst.stat().st_size == up.stat.st_size else None
    except (OSError, ValueError, KeyError, TypeError):  # absent or torn by a crash: redo
        return None


def _schedule(pool: ThreadPoolExecutor, up: _Upload, chunk_bytes: int,
              counter: _Counter) -> list[Future[None]]:
    """Small files copy and hash in one pass; large ones copy in chunks beside a hash pass."""
    size = up.stat.st_size
    _preallocate(up.dst, size)
    if size <= chunk_bytes:
        up.pending = 1
        return [pool.submit(_copy_whole, up, counter)]
    offsets = range(0, size, chunk_bytes)
    up.pending = 1 + len(offsets)
    return [pool.submit(_hash_source, up)] + [
        pool.submit(_copy_chunk, up, o, min(chunk_bytes, size - o), counter) for o in offsets]


def _preallocate(dst: Path, size: int) -> None:
    """Reserve the blocks up front, so a full volume fails before the copy, not midway."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, size)
        if size:
            os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise  # ENOSPC and friends are real; some network filesystems just can't
    finally:
        os.close(fd)


def _copy_whole(up: _Upload, counter: _Counter) -> None:
    hasher = hashlib.sha256()
    _copy_range(up.src, up.dst, 0, up.stat.st_size, counter.add, hasher)
    up.sha256 = hasher.hexdigest()
    _task_done(up)


def _copy_chunk(up: _Upload, offset: int, length: int, counter: _Counter) -> None:
    _copy_range(up.src, up.dst, offset, length, counter.add, None)
    _task_done(up)


def _hash_source(up: _Upload) -> None:
    """sha256 is sequential, so one streaming pass over the source runs beside the chunks."""
    up.sha256 = _sha256_file(up.src)
    _task_done(up)


def _copy_range(src: Path, dst: Path, offset: int, length: int, report: Callable[[int], None],
                hasher: Any | None) -> None:
    """Copy bytes [offset, offset+length) of `src` to the same place in `dst`."""
    view = memoryview(bytearray(min(max(length, 1), BLOCK)))
    src_fd, dst_fd = os.open(src, os.O_RDONLY), os.open(dst, os.O_WRONLY)
    try:
        end = offset + length
        while offset < end:
            n = os.preadv(src_fd, [view[:min(BLOCK, end - offset)]], offset)
            if n == 0:
                raise StoreError(f"{src}: shrank while being uploaded")
            if hasher is not None:
                hasher.update(view[:n])
            written = 0
            while written < n:
                written += os.pwrite(dst_fd, view[written:n], offset + written)
            offset += n
            report(n)
    finally:
        os.close(src_fd)
        os.close(dst_fd)


def _task_done(up: _Upload) -> None:
    """The last task of a file makes it durable and records it, so a re-run skips it."""
    with up.lock:
        up.pending -= 1
        if up.pending:
            return
    now = up.src.stat()
    if (now.st_size, now.st_mtime_ns) != (up.stat.st_size, up.stat.st_mtime_ns):
        raise StoreError(f"{up.src}: changed while being uploaded")
    _fsync(up.dst)
    up.record.parent.mkdir(parents=True, exist_ok=True)
    up.record.write_text(json.dumps({"size": up.stat.st_size, "sha256": up.sha256,
                                     "mtime_ns": up.stat.st_mtime_ns}))


def _publish(staging: Path, final: Path, manifest: Manifest) -> None:
    """manifest.json last, everything fsynced, then one rename makes the version visible."""
    shutil.rmtree(staging / DONE_DIR, ignore_errors=True)
    (staging / MANIFEST).write_text(manifest.to_json())
    _fsync(staging / MANIFEST)
    for root, _, _ in os.walk(staging, topdown=False):
        _fsync(Path(root))
    try:
        os.rename(staging, final)
    except OSError as exc:
        raise StoreError(f"{final}: cannot publish ({exc.strerror})") from None
    _fsync(final.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _optional_json(file: Path) -> dict[str, Any] | None:
    try:
        return json.loads(file.read_text()) if file.is_file() else None
    except json.JSONDecodeError as exc:
        raise StoreError(f"{file}: not valid JSON ({exc})") from None


# --- read side: verify, open, list ----------------------------------------------------------

def verify(version_dir: str | Path, *, full: bool = True) -> Manifest:
    """Check every listed file's size and, with `full`, its sha256; unlisted files fail too."""
    root = Path(version_dir)
    manifest = _read_manifest(root)
    problems, sized = [], []
    for f in manifest.files:
        path = root / f.path
        if not path.is_file():
            problems.append(f"{f.path}: missing")
        elif (size := path.stat().st_size) != f.size:
            problems.append(f"{f.path}: size {size} != {f.size}")
        else:
            sized.append(f)
    if full:
        hashes = _sha256_many([root / f.path for f in sized], 4)
        problems += [f"{f.path}: sha256 mismatch" for f, h in zip(sized, hashes) if h != f.sha256]
    listed = {f.path for f in manifest.files} | {MANIFEST}
    problems += [f"{rel}: not in manifest" for rel in sorted(_all_files(root) - listed)]
    if problems:
        raise StoreError(f"{root}: " + "; ".join(problems))
    return manifest


def open_version(store: str | Path, name: str, version: str, *,
                 verify_hashes: bool = False) -> Path:
    """The directory of a published, intact version, for a worker to load from."""
    _check_component(name, "name", f"{name}/{version}")
    _check_component(version, "version", f"{name}/{version}")
    root = Path(store) / name / version
    if not (root / MANIFEST).is_file():
        raise StoreError(f"{name}/{version} is not published (no {MANIFEST}) in {store}")
    manifest = verify(root, full=verify_hashes)
    if (manifest.name, manifest.version) != (name, version):
        raise StoreError(f"{root / MANIFEST}: describes {manifest.name}/{manifest.version}")
    return root


def list_versions(store: str | Path, name: str) -> list[str]:
    """Published versions of `name`, sorted; staging and unpublished directories are hidden."""
    name_dir = Path(store) / name
    if not name_dir.is_dir():
        return []
    return sorted(d.name for d in name_dir.iterdir()
                  if not d.name.startswith(".") and (d / MANIFEST).is_file())


def _read_manifest(root: Path) -> Manifest:
    file = root / MANIFEST
    try:
        return Manifest.from_json(file.read_text())
    except FileNotFoundError:
        raise StoreError(f"{root}: not published (no {MANIFEST})") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StoreError(f"{file}: invalid manifest ({exc})") from None


def _all_files(root: Path) -> set[str]:
    return {(Path(r) / n).relative_to(root).as_posix()
            for r, _, names in os.walk(root) for n in names}


def _sha256_many(paths: list[Path], parallel: int) -> list[str]:
    """hashlib drops the GIL on large updates, so threads hash files side by side."""
    with ThreadPoolExecutor(max(1, parallel), thread_name_prefix="ferry-hash") as pool:
        return list(pool.map(_sha256_file, paths))


def _sha256_file(path: Path) -> str:
    hasher = hashlib.sha256()
    view = memoryview(bytearray(BLOCK))
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(view):
            hasher.update(view[:n])
    return hasher.hexdigest()
