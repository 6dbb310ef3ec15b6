"""Model store: push, resume, atomic publish, verify, open and list; no broker needed."""

from __future__ import annotations

import fcntl
import hashlib
import json
from pathlib import Path

import pytest

from models import store as model_store
from models.factory import build_tiny_checkpoint
from models.store import (
    Manifest, StoreError, list_versions, open_version, parse_target, push, verify,
)

SHARD = "model-00001-of-00002.safetensors"


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return build_tiny_checkpoint(tmp_path / "src", seed=0, shards=2)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def published(src: Path, store: Path, **kwargs) -> Path:
    push(src, store / "tiny" / "v1", **kwargs)
    return store / "tiny" / "v1"


def test_push_publishes_byte_identical_files(src: Path, store: Path) -> None:
    version = published(src, store)
    copied = files_of(version)
    manifest = json.loads(copied.pop("manifest.json"))
    assert copied == files_of(src)
    assert manifest["format"] == 1 and (manifest["name"], manifest["version"]) == ("tiny", "v1")
    assert manifest["config"] == json.loads((src / "config.json").read_text())
    assert manifest["sharding"] is None
    assert verify(version).version == "v1"
    assert list_versions(store, "tiny") == ["v1"]
    assert open_version(store, "tiny", "v1", verify_hashes=True) == version
    assert not (store / "tiny" / ".v1.partial").exists()


def test_manifest_lists_every_file_with_its_sha256(src: Path, store: Path) -> None:
    manifest = push(src, store / "tiny" / "v1")
    expected = {rel: (len(data), hashlib.sha256(data).hexdigest())
                for rel, data in files_of(src).items()}
    assert {f.path: (f.size, f.sha256) for f in manifest.files} == expected
    text = (store / "tiny" / "v1" / "manifest.json").read_text()
    assert Manifest.from_json(text) == manifest


def test_chunked_upload_is_byte_identical_and_reports_progress(
        src: Path, store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hashed: list[Path] = []
    real_hash = model_store._sha256_file
    monkeypatch.setattr(model_store, "_sha256_file",
                        lambda path: (hashed.append(path), real_hash(path))[1])
    seen: list[tuple[int, int]] = []
    version = published(src, store, chunk_bytes=4096, parallel=4,
                        progress=lambda done, total: seen.append((done, total)))
    copied = files_of(version)
    copied.pop("manifest.json")
    assert copied == files_of(src)
    total = sum(len(b) for b in copied.values())
    assert len(seen) > total // 4096  # chunks, not whole files
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert seen[-1] == (total, total)
    assert hashed and all(src in path.parents for path in hashed)  # the source, not the copy


def test_interrupted_push_resumes_without_resending_finished_files(
        src: Path, store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_copy = model_store._copy_range
    finished: list[str] = []

    def fail_on_third_file(source: Path, *args, **kwargs) -> None:
        if len(finished) == 2:
            raise OSError("volume went away")
        real_copy(source, *args, **kwargs)
        finished.append(source.name)

    monkeypatch.setattr(model_store, "_copy_range", fail_on_third_file)
    with pytest.raises(OSError, match="volume went away"):
        push(src, store / "tiny" / "v1", parallel=1)
    first_run = set(finished)
    assert len(first_run) == 2

    finished.clear()
    monkeypatch.setattr(model_store, "_copy_range", lambda source, *a, **k: (
        finished.append(source.name), real_copy(source, *a, **k)))
    manifest = push(src, store / "tiny" / "v1", parallel=1)
    assert first_run.isdisjoint(finished)
    assert first_run | set(finished) == set(files_of(src))
    assert {f.path for f in manifest.files} == set(files_of(src))
    verify(store / "tiny" / "v1")


def test_resume_after_progress_callback_aborts(src: Path, store: Path) -> None:
    sizes = sorted((len(b) for b in files_of(src).values()), reverse=True)
    total = sum(sizes)

    def abort_after_first_file(done: int, _: int) -> None:
        if done > sizes[0]:  # parallel=1 copies the biggest file first
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        push(src, store / "tiny" / "v1", parallel=1, progress=abort_after_first_file)
    seen: list[int] = []
    push(src, store / "tiny" / "v1", parallel=1, progress=lambda done, _: seen.append(done))
    assert seen[0] == sizes[0]  # the finished file counted as done, not sent again
    assert seen[-1] == total
    verify(store / "tiny" / "v1")


def test_resume_recopies_a_finished_file_that_changed_since(
        src: Path, store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_copy = model_store._copy_range

    def fail_after_first(source: Path, *args, **kwargs) -> None:
        if (store / "tiny" / ".v1.partial" / ".done").exists():
            raise OSError("interrupted")
        real_copy(source, *args, **kwargs)

    monkeypatch.setattr(model_store, "_copy_range", fail_after_first)
    with pytest.raises(OSError):
        push(src, store / "tiny" / "v1", parallel=1)
    [record] = (store / "tiny" / ".v1.partial" / ".done").iterdir()
    changed = src / record.name.removesuffix(".json")
    data = bytearray(changed.read_bytes())
    data[-1] ^= 0xFF
    changed.write_bytes(bytes(data))  # same size, new content and mtime
    monkeypatch.setattr(model_store, "_copy_range", real_copy)
    push(src, store / "tiny" / "v1")
    assert (store / "tiny" / "v1" / changed.name).read_bytes() == bytes(data)
    verify(store / "tiny" / "v1")


def test_second_concurrent_push_of_a_version_is_refused(src: Path, store: Path) -> None:
    (store / "tiny").mkdir(parents=True)
    with open(store / "tiny" / ".v1.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(StoreError, match=r"\.v1\.lock: another push"):
            push(src, store / "tiny" / "v1")
    push(src, store / "tiny" / "v1")


def test_half_uploaded_version_is_invisible(src: Path, store: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_publish(*_) -> None:
        raise OSError("crash before publish")

    monkeypatch.setattr(model_store, "_publish", broken_publish)
    with pytest.raises(OSError):
        push(src, store / "tiny" / "v1")
    assert (store / "tiny" / ".v1.partial" / SHARD).is_file()
    assert list_versions(store, "tiny") == []
    with pytest.raises(StoreError, match=r"tiny/v1 is not published \(no manifest.json\)"):
        open_version(store, "tiny", "v1")


def test_version_dir_without_manifest_is_not_published(src: Path, store: Path) -> None:
    version = published(src, store)
    (version / "manifest.json").unlink()
    assert list_versions(store, "tiny") == []
    with pytest.raises(StoreError, match="not published"):
        verify(version)
    with pytest.raises(StoreError, match="exists but is not published"):
        push(src, store / "tiny" / "v1")


def test_verify_names_a_corrupted_file(src: Path, store: Path) -> None:
    version = published(src, store)
    data = bytearray((version / SHARD).read_bytes())
    data[-1] ^= 0xFF
    (version / SHARD).write_bytes(bytes(data))
    with pytest.raises(StoreError, match=f"{SHARD}: sha256 mismatch"):
        verify(version)
    verify(version, full=False)  # the size is unchanged
    open_version(store, "tiny", "v1")
    with pytest.raises(StoreError, match=f"{SHARD}: sha256 mismatch"):
        open_version(store, "tiny", "v1", verify_hashes=True)


def test_verify_names_truncated_missing_and_extra_files(src: Path, store: Path) -> None:
    version = published(src, store)
    size = (version / SHARD).stat().st_size
    with open(version / SHARD, "r+b") as f:
        f.truncate(12)
    with pytest.raises(StoreError, match=f"{SHARD}: size 12 != {size}"):
        verify(version, full=False)
    with pytest.raises(StoreError, match=f"{SHARD}: size 12 != {size}"):
        open_version(store, "tiny", "v1")
    (version / "tokenizer.json").unlink()
    (version / "stray.bin").write_bytes(b"x")
    with pytest.raises(StoreError) as err:
        verify(version)
    assert "tokenizer.json: missing" in str(err.value)
    assert "stray.bin: not in manifest" in str(err.value)


def test_push_same_content_is_a_noop_and_different_content_an_error(
        src: Path, store: Path) -> None:
    first = push(src, store / "tiny" / "v1")
    assert push(src, store / "tiny" / "v1") == first
    (src / "tokenizer_config.json").write_text("{}")
    with pytest.raises(StoreError, match="different content.*tokenizer_config.json"):
        push(src, store / "tiny" / "v1")
    assert push(src, store / "tiny" / "v2").version == "v2"
    assert list_versions(store, "tiny") == ["v1", "v2"]


def test_sharded_source_keeps_rank_directories_and_sharding(tmp_path: Path,
                                                            store: Path) -> None:
    src = tmp_path / "tp"
    for rank in range(2):
        build_tiny_checkpoint(src / f"rank-{rank:02d}-of-02", seed=rank)
    sharding = {"tp_size": 2, "ranks": ["rank-00-of-02", "rank-01-of-02"]}
    (src / "sharding.json").write_text(json.dumps(sharding))
    manifest = push(src, store / "tiny" / "tp2", chunk_bytes=64 << 10)
    assert manifest.sharding == sharding and manifest.config is None
    assert "rank-01-of-02/model.safetensors" in {f.path for f in manifest.files}
    verify(store / "tiny" / "tp2")


def test_manifest_paths_must_stay_inside_the_version(src: Path, store: Path) -> None:
    version = published(src, store)
    manifest = json.loads((version / "manifest.json").read_text())
    manifest["files"][0]["path"] = "../../etc/passwd"
    (version / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="manifest.json: invalid manifest.*leaves"):
        verify(version)


def test_parse_target() -> None:
    assert parse_target("/mnt/models/llama-3-8b/2024.06") == (
        Path("/mnt/models"), "llama-3-8b", "2024.06")
    assert parse_target(Path("store/tiny/v1/")) == (Path("store"), "tiny", "v1")


@pytest.mark.parametrize("target", ["tiny/v1", "v1", "", "store/tiny/.v1",
                                    "store/../v1", "store/tiny/v 1"])
def test_parse_target_rejects_malformed(target: str) -> None:
    with pytest.raises(StoreError, match="STORE/NAME/VERSION|must match"):
        parse_target(target)
