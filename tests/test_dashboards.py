"""Grafana dashboards as code: the committed JSON is what compose/grafana/dashboards.py
builds (Grafana's Foundation SDK), and each dashboard is sane for Grafana's file provisioning.
Every panel's query runs against a real Prometheus in tests/test_prometheus.py."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
GRAFANA = ROOT / "compose" / "grafana"


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ferry_dashboards", GRAFANA / "dashboards.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def committed() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((GRAFANA / "dashboards").glob("*.json"))}


def test_committed_json_is_what_the_generator_builds() -> None:
    assert committed() == generator().render(), \
        "dashboards drifted: run `.venv/bin/python compose/grafana/dashboards.py`"


def _panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in board["panels"] if p["type"] != "row"]


def test_dashboards_are_sane_for_grafana() -> None:
    source = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml")
                            .read_text())["datasources"][0]
    boards = {name: json.loads(text) for name, text in committed().items()}
    assert set(boards) == {"ferry-overview.json", "ferry-rollout.json", "ferry-shadow.json",
                           "ferry-tenants.json"}
    uids = [b["uid"] for b in boards.values()]
    assert len(set(uids)) == len(uids) and all(len(u) <= 40 for u in uids)
    for name, board in boards.items():
        assert board["title"] and board["schemaVersion"] >= 36, name
        ids = [p["id"] for p in board["panels"]]
        assert len(set(ids)) == len(ids) and 0 not in ids, f"{name}: panel ids {ids}"
        assert board["panels"][0]["type"] == "row", name
        for panel in _panels(board):
            where = f"{name}: {panel['title']}"
            assert panel["type"] in ("timeseries", "stat", "table"), where
            assert panel["datasource"] == {"type": "prometheus", "uid": source["uid"]}, where
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, where
            refs = [t["refId"] for t in panel["targets"]]
            assert panel["targets"] and len(set(refs)) == len(refs) and all(refs), where
            for target in panel["targets"]:
                assert target["expr"].strip(), where
        # Panels do not overlap.
        cells = set()
        for panel in board["panels"]:
            g = panel["gridPos"]
            mine = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                    for y in range(g["y"], g["y"] + g["h"])}
            assert not cells & mine, f"{name}: {panel['title']} overlaps"
            cells |= mine


def test_every_panel_query_is_one_the_prometheus_test_runs() -> None:
    exprs = {t["expr"] for text in committed().values() for p in _panels(json.loads(text))
             for t in p["targets"]}
    assert exprs == set(generator().queries())
    # The overview covers what the issue lists; vLLM's names where vLLM has the series.
    overview = json.loads(committed()["ferry-overview.json"])
    text = " ".join(t["expr"] for p in _panels(overview) for t in p["targets"])
    for series in ("vllm:request_success_total", "vllm:generation_tokens_total",
                   "vllm:time_to_first_token_seconds_bucket",
                   "vllm:time_per_output_token_seconds_bucket",
                   "vllm:e2e_request_latency_seconds_bucket", "vllm:num_requests_waiting",
                   "ferry_consumer_lag", "ferry_batch_size", "vllm:kv_cache_usage_perc",
                   "ferry_errors_total", "ferry_dead_letters_total"):
        assert series in text, series


def renderer() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ferry_dashboard_render",
                                                  GRAFANA / "render.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_png_renderer_lays_panels_out_on_grafanas_grid() -> None:
    """compose/grafana/render.py (the PNGs in the README): every panel inside the figure,
    below the header, none overlapping, and widths in proportion to the 24-column grid."""
    render = renderer()
    for name, text in committed().items():
        board = json.loads(text)
        size = render.figure_size(board)
        boxes = [(p["title"], p["gridPos"], render.grid_box(p["gridPos"], size))
                 for p in board["panels"]]
        for title, grid, box in boxes:
            assert 0 <= box.left and box.left + box.width <= 1, f"{name}: {title}"
            assert 0 <= box.bottom and box.bottom + box.height <= 1, f"{name}: {title}"
            assert box.bottom + box.height <= 1 - render.HEADER_IN / size[1], f"{name}: {title}"
            full = render.grid_box({"x": 0, "y": 0, "w": 24, "h": grid["h"]}, size)
            assert abs(box.width - full.width * grid["w"] / 24) < 0.01, f"{name}: {title}"
        for i, (a, _, one) in enumerate(boxes):
            for b, _, two in boxes[i + 1:]:
                apart = (one.left + one.width <= two.left or two.left + two.width <= one.left
                         or one.bottom + one.height <= two.bottom
                         or two.bottom + two.height <= one.bottom)
                assert apart, f"{name}: {a} overlaps {b}"
    assert render.legend("p99 {{model_name}}", {"model_name": "llama"}) == "p99 llama"
    assert render.legend("", {"__name__": "up", "job": "x"}) == '{job="x"}'
    assert render.fmt_value(0.25, "s") == "250 ms" and render.fmt_value(0.5, "percentunit") \
        == "50%" and render.fmt_value(3 * 2**30, "bytes") == "3 GiB"
