"""A local Prometheus server (Debian's `prometheus` package) run as a child process, for
tests/test_prometheus.py and the dashboard renderer (compose/grafana/render.py), which
replays the data a test run recorded."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


class LocalPrometheus:
    """`prometheus` on 127.0.0.1:`port` with `config`, its data under `home`/data (kept when
    it stops, so a later server on the same home serves what this one scraped)."""

    def __init__(self, config: dict[str, Any], port: int, home: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        home.mkdir(parents=True, exist_ok=True)
        (home / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = home / "prometheus.log"
        with self.log.open("w") as out:
            self.process = subprocess.Popen(
                [PROMETHEUS, f"--config.file={home / 'prometheus.yml'}",
                 f"--storage.tsdb.path={home / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                 "--log.level=warn"], stdout=out, stderr=subprocess.STDOUT)

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=30) as page:
            return json.loads(page.read())

    def ready(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"prometheus exited: {self.log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as page:
                return page.status == 200
        except OSError:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        answer = self.get("/api/v1/query", query=expr)
        assert answer["status"] == "success", (expr, answer)
        return answer["data"]["result"]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def has_data(result: list[dict[str, Any]]) -> bool:
    """At least one series with a number (a quantile of an empty window is NaN)."""
    return any(not math.isnan(float(r["value"][1])) for r in result)
