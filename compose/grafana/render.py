"""Draws each committed Grafana dashboard (compose/grafana/dashboards/*.json) as a PNG from a
Prometheus's data, with matplotlib: Grafana itself does not run where Ferry is built, so this
stands in for its renderer to show the dashboards on a real run (README: Dashboards).

    .venv/bin/python compose/grafana/render.py --data DIR [--out compose/grafana/png]
    .venv/bin/python compose/grafana/render.py --url http://127.0.0.1:9090 --since 900

`--data` replays a Prometheus data directory (what `make dashboard-pngs` records from the
stack and load of tests/test_prometheus.py) on a server of its own and draws the whole
recorded window; `--url` reads a running server over the last `--since` seconds. Each panel
is drawn where its gridPos puts it, with its title, unit and every target's legendFormat:
time series from query_range, stat and table panels from an instant query at the end.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout: this tree's ferry package

import matplotlib  # noqa: E402

matplotlib.use("Agg")  # no display: files only
import matplotlib.dates as mdates  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402
from PIL import Image  # noqa: E402  (matplotlib's own dependency)

BOARDS = Path(__file__).resolve().parent / "dashboards"
OUT = Path(__file__).resolve().parent / "png"

# Grafana's dark theme and classic palette, so the pictures read like the real thing.
BACKGROUND, PANEL, BORDER, TEXT, MUTED = "#111217", "#181b1f", "#2c3235", "#ccccdc", "#8e8e99"
PALETTE = ("#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9",
           "#705da0", "#37872d", "#fade2a", "#447ebc", "#c15c17")
WIDTH_IN, UNIT_IN, HEADER_IN, DPI = 16.0, 0.34, 0.55, 100  # 1600 px wide; a grid unit ~34 px
GRID_COLUMNS = 24


@dataclass(frozen=True)
class Box:
    """A rectangle in figure fractions (matplotlib's add_axes order)."""
    left: float
    bottom: float
    width: float
    height: float


def figure_size(board: dict[str, Any]) -> tuple[float, float]:
    """Inches: the board's grid height in units plus a header."""
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in board["panels"])
    return WIDTH_IN, HEADER_IN + rows * UNIT_IN


def grid_box(grid: dict[str, int], size: tuple[float, float], gap_in: float = 0.05) -> Box:
    """Where a gridPos (24 columns, y down from the top, in units) lies in the figure."""
    width_in, height_in = size
    column_in = width_in / GRID_COLUMNS
    left = grid["x"] * column_in + gap_in
    top = HEADER_IN + grid["y"] * UNIT_IN + gap_in
    w, h = grid["w"] * column_in - 2 * gap_in, grid["h"] * UNIT_IN - 2 * gap_in
    return Box(left / width_in, 1 - (top + h) / height_in, w / width_in, h / height_in)


# ---- Prometheus --------------------------------------------------------------------------

class Source:
    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=60) as page:
            answer = json.loads(page.read())
        if answer.get("status") != "success":
            raise RuntimeError(f"{path} {params}: {answer}")
        return answer["data"]

    def range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        return self.get("/api/v1/query_range", query=expr, start=str(start), end=str(end),
                        step=str(step))["result"]

    def instant(self, expr: str, at: float) -> list[dict[str, Any]]:
        return self.get("/api/v1/query", query=expr, time=str(at))["result"]

    def recorded_window(self) -> tuple[float, float]:
        """The first and last sample in the server's head block (a replayed recording)."""
        head = self.get("/api/v1/status/tsdb")["headStats"]
        if head["numSeries"] == 0:
            raise RuntimeError("the Prometheus data holds no series")
        return head["minTime"] / 1000, head["maxTime"] / 1000


def legend(fmt: str, labels: dict[str, str]) -> str:
    """Grafana's legendFormat: {{label}} replaced by the series' label value."""
    if fmt:
        return re.sub(r"\{\{\s*([\w:]+)\s*\}\}", lambda m: labels.get(m[1], ""), fmt).strip()
    return "{" + ", ".join(f'{k}="{v}"' for k, v in labels.items() if k != "__name__") + "}"


# ---- units -------------------------------------------------------------------------------

def fmt_value(value: float, unit: str) -> str:
    if value != value:  # NaN: a quantile of an empty window
        return "-"
    if unit == "s":
        return f"{value * 1000:.3g} ms" if abs(value) < 1 else f"{value:.3g} s"
    if unit == "ms":
        return f"{value:.3g} ms"
    if unit == "percentunit":
        return f"{value * 100:.3g}%"
    if unit == "bytes":
        power = min(3, max(0, int(abs(value)).bit_length() - 1) // 10)
        return f"{value / 1024**power:.3g} {('B', 'KiB', 'MiB', 'GiB')[power]}"
    if unit == "reqps":
        return f"{value:.4g} req/s"
    return f"{value:.4g}"


# ---- drawing -----------------------------------------------------------------------------

def _frame(fig: Figure, box: Box, title: str) -> None:
    fig.add_artist(Rectangle((box.left, box.bottom), box.width, box.height,
                             transform=fig.transFigure, facecolor=PANEL, edgecolor=BORDER,
                             linewidth=0.8, zorder=-1))  # under the axes
    pad = 0.08 / fig.get_figheight()
    fig.text(box.left + 0.006, box.bottom + box.height - pad, title, color=TEXT, fontsize=8.5,
             fontweight="bold", va="top", ha="left", clip_on=True)


def _inner(fig: Figure, box: Box, top_in: float, bottom_in: float) -> Box:
    """The part of a panel below its title strip and above a strip of `bottom_in` inches."""
    h = fig.get_figheight()
    return Box(box.left + 0.035, box.bottom + bottom_in / h, box.width - 0.045,
               box.height - (top_in + bottom_in) / h)


def _no_data(fig: Figure, box: Box) -> None:
    fig.text(box.left + box.width / 2, box.bottom + box.height / 2, "No data", color=MUTED,
             fontsize=10, ha="center", va="center")


def draw_timeseries(fig: Figure, box: Box, panel: dict[str, Any], unit: str, source: Source,
                    window: tuple[float, float, float]) -> None:
    start, end, step = window
    lines: list[tuple[str, list[datetime], list[float]]] = []
    for target in panel["targets"]:
        for series in source.range(target["expr"], start, end, step):
            points = [(datetime.fromtimestamp(float(t), timezone.utc), float(v))
                      for t, v in series["values"]]
            points = [(t, v) for t, v in points if v == v]  # NaN: no point, as in Grafana
            if points:
                lines.append((legend(target.get("legendFormat", ""), series["metric"]),
                              [t for t, _ in points], [v for _, v in points]))
    if not lines:
        _no_data(fig, box)
        return
    columns = max(1, int(box.width * WIDTH_IN / 2.6))
    shown = min(len(lines), columns * 2)  # two legend lines at most, as a short panel shows
    legend_in = 0.16 * ((shown + columns - 1) // columns) + 0.05
    plot = _inner(fig, box, 0.28, legend_in + 0.2)  # 0.2 in: the time axis' labels
    ax = fig.add_axes((plot.left, plot.bottom, plot.width, plot.height))
    ax.set_facecolor(PANEL)
    for i, (name, ts, vs) in enumerate(lines):
        ax.plot(ts, vs, color=PALETTE[i % len(PALETTE)], linewidth=1.1, label=name)
    ax.set_xlim(datetime.fromtimestamp(start, timezone.utc),
                datetime.fromtimestamp(end, timezone.utc))
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S", tz=timezone.utc))
    ax.xaxis.set_major_locator(mdates.AutoDateLocator(maxticks=6))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt_value(v, unit)))
    ax.tick_params(colors=MUTED, labelsize=6.5, length=2)
    ax.grid(color=BORDER, linewidth=0.5)
    for spine in ax.spines.values():
        spine.set_visible(False)
    handles, labels = ax.get_legend_handles_labels()
    extra = len(lines) - shown
    if extra:
        labels[shown - 1] = f"{labels[shown - 1]}  (+{extra} more)"
    ax.legend(handles[:shown], labels[:shown], loc="upper left", ncol=columns, fontsize=6.5,
              frameon=False, labelcolor=TEXT,
              bbox_to_anchor=(0, -0.2 / (plot.height * fig.get_figheight())), handlelength=1.2, columnspacing=1.0, borderaxespad=0)


def _instant_rows(panel: dict[str, Any], source: Source, at: float
                  ) -> list[tuple[dict[str, str], str, float]]:
    rows = []
    for target in panel["targets"]:
        for series in source.instant(target["expr"], at):
            rows.append((series["metric"], legend(target.get("legendFormat", ""),
                                                  series["metric"]), float(series["value"][1])))
    return rows


def draw_stat(fig: Figure, box: Box, panel: dict[str, Any], unit: str, source: Source,
              at: float) -> None:
    rows = [r for r in _instant_rows(panel, source, at) if r[2] == r[2]]
    if not rows:
        _no_data(fig, box)
        return
    inner = _inner(fig, box, 0.3, 0.1)
    for i, (_, name, value) in enumerate(rows[:6]):
        x = inner.left + inner.width * (i + 0.5) / min(len(rows), 6)
        y = inner.bottom + inner.height * 0.55
        fig.text(x, y, fmt_value(value, unit), color=PALETTE[0], fontsize=22,
                 fontweight="bold", ha="center", va="center")
        fig.text(x, inner.bottom + inner.height * 0.12, name, color=TEXT, fontsize=7,
                 ha="center", va="center")


def draw_table(fig: Figure, box: Box, panel: dict[str, Any], unit: str, source: Source,
               at: float) -> None:
    rows = _instant_rows(panel, source, at)
    if not rows:
        _no_data(fig, box)
        return
    keys = sorted({k for labels, _, _ in rows for k in labels if k != "__name__"})
    rows.sort(key=lambda r: -r[2] if r[2] == r[2] else 0)
    lines = max(1, int((box.height * fig.get_figheight() - 0.45) / 0.19) - 1)
    cells = [[labels.get(k, "") for k in keys] + [fmt_value(value, unit)]
             for labels, _, value in rows[:lines]]
    area = _inner(fig, box, 0.3, 0.05)
    ax = fig.add_axes((area.left, area.bottom, area.width, area.height))
    ax.axis("off")
    table = ax.table(cellText=cells, colLabels=[*keys, "Value"], loc="upper left",
                     cellLoc="left", colLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(7)
    for (r, _), cell in table.get_celld().items():
        cell.set_facecolor(PANEL)
        cell.set_edgecolor(BORDER)
        cell.get_text().set_color(MUTED if r == 0 else TEXT)
        cell.set_height(0.19 / (ax.get_position().height * fig.get_figheight()))
    if len(rows) > lines:
        fig.text(box.left + box.width - 0.006, box.bottom + 0.006,
                 f"{len(rows) - lines} more rows", color=MUTED, fontsize=6.5, ha="right")


def render_board(board: dict[str, Any], source: Source, start: float, end: float,
                 path: Path) -> None:
    size = figure_size(board)
    fig = plt.figure(figsize=size, dpi=DPI, facecolor=BACKGROUND)
    step = max(1.0, round((end - start) / 300))
    stamp = (f"{datetime.fromtimestamp(start, timezone.utc):%Y-%m-%d %H:%M:%S} to "
             f"{datetime.fromtimestamp(end, timezone.utc):%H:%M:%S} UTC")
    fig.text(0.006, 1 - 0.12 / size[1], board["title"], color=TEXT, fontsize=13,
             fontweight="bold", va="top")
    fig.text(0.994, 1 - 0.14 / size[1], f"{stamp}  ·  drawn by compose/grafana/render.py from "
             "Prometheus data (Grafana renders the same JSON in compose)", color=MUTED,
             fontsize=7.5, va="top", ha="right")
    for panel in board["panels"]:
        box = grid_box(panel["gridPos"], size)
        if panel["type"] == "row":
            fig.text(box.left, box.bottom + box.height / 2, panel["title"], color=TEXT,
                     fontsize=10, fontweight="bold", va="center")
            continue
        _frame(fig, box, panel["title"])
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
        if panel["type"] == "timeseries":
            draw_timeseries(fig, box, panel, unit, source, (start, end, step))
        elif panel["type"] == "stat":
            draw_stat(fig, box, panel, unit, source, end)
        else:
            draw_table(fig, box, panel, unit, source, end)
    fig.canvas.draw()
    # 256 colours are plenty for flat panels and lines: a third of the RGBA file's size.
    pixels = Image.frombuffer("RGBA", fig.canvas.get_width_height(),
                              fig.canvas.buffer_rgba()).convert("RGB")
    pixels.quantize(256).save(path, optimize=True)
    plt.close(fig)


def render_all(source: Source, start: float, end: float, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for file in sorted(BOARDS.glob("*.json")):
        path = out / f"{file.stem}.png"
        render_board(json.loads(file.read_text()), source, start, end, path)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--data", type=Path, help="a recorded Prometheus home (its data/ dir)")
    where.add_argument("--url", help="a running Prometheus")
    parser.add_argument("--since", type=float, default=900.0,
                        help="with --url: seconds back from now (default 900)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if args.url:
        end = time.time()
        for path in render_all(Source(args.url), end - args.since, end, args.out):
            print(path)
        return 0
    from ferry.broker import free_port
    from ferry.prometheus import LocalPrometheus

    if not (args.data / "data").is_dir():
        parser.error(f"--data {args.data}: no data/ directory (a recorded Prometheus home)")
    port = free_port()
    # No scrapes: the server only serves what was recorded, so its window stays the run's.
    server = LocalPrometheus({"global": {"scrape_interval": "1h"}, "scrape_configs": []},
                             port, args.data)
    try:
        deadline = time.monotonic() + 120
        while not server.ready():  # replaying the write-ahead log
            if time.monotonic() > deadline:
                raise RuntimeError(f"prometheus not ready in 120 s: {server.log.read_text()}")
            time.sleep(0.5)
        source = Source(server.url)
        start, end = source.recorded_window()
        for path in render_all(source, start, end, args.out):
            print(path)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
