"""One replica across two "hosts": rank 0 in this network namespace, rank 1 in another one
joined by a veth pair, the ranks talking over that link only (gloo pinned to the veth)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from ferry.broker import free_port
from schemas import Request
from workers.engine import GenerationInput, SamplingParams

HOST0, HOST1 = "10.213.7.1", "10.213.7.2"  # the test's own hosts, inside its namespaces


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def second_host() -> Iterator[tuple[str, str, str]]:
    """(netns, our veth, its veth); skipped where namespaces can't be made."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to make a network namespace")
    tag = uuid.uuid4().hex[:6]
    ns, here, there = f"ferry-{tag}", f"fy{tag}a", f"fy{tag}b"
    try:
        _ip("netns", "add", ns)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"this machine does not allow network namespaces: {exc.stderr!r}")
    try:
        _ip("link", "add", here, "type", "veth", "peer", "name", there)
        _ip("link", "set", there, "netns", ns)
        _ip("addr", "add", f"{HOST0}/30", "dev", here)
        _ip("link", "set", here, "up")
        _ip("netns", "exec", ns, "ip", "addr", "add", f"{HOST1}/30", "dev", there)
        _ip("netns", "exec", ns, "ip", "link", "set", there, "up")
        _ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield ns, here, there
    finally:
        subprocess.run(["ip", "link", "del", here], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


async def test_replica_spans_two_hosts(second_host, client, kafka_bootstrap, tiny_model, engine,
                                       unique) -> None:
    ns, here, there = second_host
    dep, port = unique("2node"), free_port()
    common = ["-m", "ferry.cli", "worker", "--model", str(tiny_model), "--deployment", dep,
              "--bootstrap", kafka_bootstrap, "--nnodes", "2", "--master-addr", HOST0,
              "--master-port", str(port), "--tp-timeout", "20", "--metrics-port", "off"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    node0 = subprocess.Popen([sys.executable, *common, "--node-rank", "0"],
                             env={**env, "GLOO_SOCKET_IFNAME": here},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    node1 = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, *common,
                              "--node-rank", "1"], env={**env, "GLOO_SOCKET_IFNAME": there},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        prompts = ["Once upon a time", "Two hosts"]
        futures = [await client.submit(Request(id=f"m{i}", model=dep, prompt=p,
                                               max_new_tokens=8)) for i, p in enumerate(prompts)]
        results = await asyncio.wait_for(asyncio.gather(*futures), 120)
    finally:
        node0.terminate()  # rank 0 shuts down and releases its follower on the other host
        codes = [await asyncio.to_thread(p.wait, 60) for p in (node0, node1)]
    expected = engine.generate([GenerationInput(engine.encode(p), SamplingParams(max_new_tokens=8))
                                for p in prompts])
    assert [r.output_ids for r in results] == [e.output_ids for e in expected]
    assert codes == [0, 0]
