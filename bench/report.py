"""Write results as JSON, a Markdown table and a PNG bar chart (matplotlib if installed, else a plain PNG)."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

LABELS = {
    "a_raw_aiokafka": "(a) raw aiokafka loop",
    "b_minimal_faust": "(b) minimal Faust agent",
    "c_pipeline_alo": "(c) pipeline, at_least_once",
    "d_pipeline_eos": "(d) pipeline, exactly_once",
}
COLORS = {
    "a_raw_aiokafka": (31, 119, 180),
    "b_minimal_faust": (255, 127, 14),
    "c_pipeline_alo": (44, 160, 44),
    "d_pipeline_eos": (214, 39, 40),
    "scale2": (148, 103, 189),
}


def _mmm(d: dict, digits: int = 0) -> str:
    return f"{d['median']:,.{digits}f} ({d['min']:,.{digits}f}-{d['max']:,.{digits}f})"


def markdown(res: dict) -> str:
    m = res.get("machine", {})
    lines = [
        "# Benchmark results",
        "",
        f"Command: `{res.get('command', '')}`  ",
        f"Started: {res.get('started', '')}; total {res.get('total_s', '?')} s  ",
        f"Machine: {m.get('cpu_model')} x {m.get('cores')} cores, {m.get('ram_gb')} GB RAM, Python {m.get('python')}, "
        f"Kafka {m.get('kafka')} (local, same machine), faust-streaming {m.get('faust')}, "
        f"aiokafka {m.get('aiokafka')}  ",
        f"Settings: {json.dumps(res.get('settings', {}))}",
        "",
    ]
    if pre := res.get("preload"):
        lines += [
            f"Preload: {pre['events']:,} events over {pre['users']:,} users in {pre['seconds']} s "
            f"({pre['events_per_s']:,} events/s), per topic {pre['per_topic']}",
            "",
        ]
    lines += [
        "## Throughput (median, min-max over runs; wall from first output record to consumer-group lag 0)",
        "",
        "| run | runs | events/s (wall) | events per worker CPU-second | worker CPU s | wall s "
        "| worker cores | machine cores busy | cores stolen (VM) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def row(label: str, r: dict) -> str:
        cores = " | ".join(
            f"{r[k]['median']}" if k in r else "-" for k in ("worker_cores", "machine_cores", "steal_cores")
        )
        return (
            f"| {label} | {len(r['runs'])} | {_mmm(r['events_per_s'])} | {_mmm(r['events_per_cpu_s'])} "
            f"| {r['cpu_s']['median']} | {r['wall_s']['median']} | {cores} |"
        )

    lines += [row(label, r) for key, label in LABELS.items() if (r := res.get(key))]
    if sc := res.get("scale"):
        own = "every worker" in sc.get("note", "")  # its own window (older results: one worker = the (c) runs)
        if own:
            lines.append(row("scale: 1 worker, from processing", sc["one_worker"]))
        lines.append(row("scale: 2 workers, from all processing" if own else "(c) with 2 workers", sc["two_workers"]))
    if ra := res.get("ratios"):
        lines += ["", "Ratios (medians): " + ", ".join(f"{k} = {v}" for k, v in ra.items())]
    if sc:
        lines += ["", f"Scale: 2 workers / 1 worker (events/s wall) = **{sc['speedup']}x** ({sc.get('note', '')})"]
        if ceiling := sc.get("machine_ceiling"):
            lines += [
                "",
                f"Ceiling on this machine: **{ceiling}x**, if two workers kept every core busy at the one-worker "
                f"run's CPU per event of everything running (workers, broker, bench): cores / cores busy with one "
                f"worker. Measured {sc['speedup']}x is {100 * sc['speedup'] / ceiling:.0f}% of it"
                + ("; 1.6x needs more cores (the broker and the bench share these)." if ceiling < 1.6 else "."),
            ]
    if lat := res.get("latency"):
        settings = res.get("settings", {})
        lines += [
            "",
            "## Latency: event produced -> decision visible to a read_committed consumer on decision-audit",
            "",
            f"Open loop at the rate shown; per probe run: one click per partition stamped now, wait until the "
            f"worker's group has committed past it (the event-time jump from the preloaded hour fires every "
            f"user's timers; 'catch-up' below, with the group's lag when the probe began: the exactly_once "
            f"worker's first probe also processes the at_least_once probe's events first), "
            f"{settings.get('latency_warmup_s', '-')} s sent unmeasured, then "
            f"{settings.get('latency_seconds', '-')} s measured. Commit interval "
            f"{settings.get('latency_commit_interval_s', '-')} s, producer linger "
            f"{settings.get('producer_linger_ms', '-')} ms, worker fetch wait "
            f"{settings.get('worker_fetch_max_wait_ms', '-')} ms, probe fetch wait "
            f"{settings.get('latency_consumer_fetch_max_wait_ms', '-')} ms. 'worker sent' is the decision record's "
            "timestamp (when the worker produced it) minus the send time; the rest of the latency is the "
            "transaction commit (exactly_once) and the probe's own fetch. Median (min-max) over the runs.",
            "",
            "| guarantee | runs | rate events/s | p50 ms | p95 ms | p99 ms | max ms | worker sent p50 / p99 ms "
            "| catch-up s (backlog events) | worker cores | probe cores | machine cores busy | cores stolen (VM) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for g, v in lat.items():
            if "runs" not in v:  # a result file from before the repeated probe
                continue

            def m(k: str, v: dict = v) -> str:
                return _mmm(v[k], 2 if k.endswith(("_s", "_cores")) else 0) if k in v else "-"

            lines.append(
                f"| {g} | {len(v['runs'])} | {v['rate_per_s']} | {m('p50_ms')} | {m('p95_ms')} | {m('p99_ms')} | "
                f"{m('max_ms')} | {m('worker_sent_p50_ms')} / {m('worker_sent_p99_ms')} | "
                f"{m('catch_up_s')} ({m('backlog_at_start')}) | "
                f"{m('worker_cpu_cores')} | {m('probe_cpu_cores')} | {m('machine_cpu_cores')} | "
                f"{m('steal_cpu_cores')} |"
            )
    if rows := targets(res):
        lines += ["", "## Targets (issue 5)", "", "| target | measured | met |", "|---|---|---|"]
        met = {True: "yes", False: "**no**", None: "not measured at the target's scale"}
        lines += [f"| {t} | {v} | {met[ok]} |" for t, v, ok in rows]
    if mem := res.get("memory"):
        lines += ["", "## Memory (end of the last (c) run)", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in mem.items()]
    if rec := res.get("recovery"):
        lines += [
            "",
            "## Recovery (fresh worker, same app id as the last (c) run)",
            "",
            "| metric | value |",
            "|---|---|",
        ]
        lines += [f"| {k} | {v} |" for k, v in rec.items()]
    return "\n".join(lines) + "\n"


def targets(res: dict) -> list[tuple[str, str, bool | None]]:
    """(target, measured value, met) for every target the results can speak to; met is None where the run
    was smaller than the target's scale (recovery below 1M users)."""
    out: list[tuple[str, str, bool | None]] = []
    d, ra = res.get("d_pipeline_eos"), res.get("ratios", {})
    if d:
        v = d["events_per_cpu_s"]["median"]
        out.append(("exactly_once >= 25,000 events per worker CPU-second", f"{v:,.0f}", v >= 25_000))
    for key, floor, what in (("d/a events_per_cpu_s", 0.5, "raw loop"), ("d/b events_per_cpu_s", 0.8, "minimal Faust")):
        if key in ra:
            out.append((f"exactly_once >= {floor}x the {what} (per CPU-second)", f"{ra[key]}x", ra[key] >= floor))
    for g, limit in (("exactly_once", 500), ("at_least_once", 100)):
        if (lat := res.get("latency", {}).get(g)) is not None:
            p99 = lat["p99_ms"]["median"] if isinstance(lat["p99_ms"], dict) else lat["p99_ms"]
            out.append((f"p99 latency {g} <= {limit} ms at 50% load (median of runs)", f"{p99} ms", p99 <= limit))
    if (mem := res.get("memory")) is not None:
        v = mem["state_bytes_mean"]
        out.append(("<= 1 KB of state per user (mean changelog value)", f"{v:,.0f} B", v <= 1024))
    for g, rec in res.get("recovery", {}).items():
        users = rec.get("keys_recovered") or 0
        t = rec.get("restart_to_first_event_s")
        out.append((f"recovery {g}: restart to first new event ({users:,} users; target: 1M users <= 60 s)",
                    f"{t} s", (t is not None and t <= 60) if users >= 1_000_000 else None))  # fmt: skip
    if sc := res.get("scale"):
        ceiling = f" (ceiling on this machine {c}x)" if (c := sc.get("machine_ceiling")) else ""
        out.append(("2 workers >= 1.6x one worker (events/s)", f"{sc['speedup']}x{ceiling}", sc["speedup"] >= 1.6))
    return out


def plot(res: dict, path: Path) -> str:
    rows = [(LABELS[k], res[k], COLORS[k]) for k in LABELS if k in res]
    if "scale" in res:
        rows.append(("(c) 2 workers", res["scale"]["two_workers"], COLORS["scale2"]))
    if not rows:
        return "none"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _plain_png(rows, path)
        return "plain (matplotlib not installed): left panel events/s wall, right events per CPU-s"
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, metric, title in (
        (axes[0], "events_per_s", "events/s (wall)"),
        (axes[1], "events_per_cpu_s", "events per worker CPU-second"),
    ):
        names = [r[0] for r in rows]
        med = [r[1][metric]["median"] for r in rows]
        err = [
            [m - r[1][metric]["min"] for m, r in zip(med, rows, strict=True)],
            [r[1][metric]["max"] - m for m, r in zip(med, rows, strict=True)],
        ]
        ax.barh(names, med, xerr=err, color=[tuple(c / 255 for c in r[2]) for r in rows])
        ax.set_title(title)
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return "matplotlib"


def _plain_png(rows: list[tuple[str, Any, tuple[int, int, int]]], path: Path) -> None:
    """Two panels of horizontal bars (median; a thin dark line spans min-max), no text: see the Markdown."""
    w, h, pad = 800, 60 + 50 * len(rows), 20
    img = [[(255, 255, 255)] * w for _ in range(h)]
    panel_w = (w - 3 * pad) // 2
    for pi, metric in enumerate(("events_per_s", "events_per_cpu_s")):
        x0 = pad + pi * (panel_w + pad)
        top = max(r[1][metric]["max"] for r in rows) or 1
        for y in range(pad, h - pad):
            img[y][x0] = (0, 0, 0)
        for i, (_, r, color) in enumerate(rows):
            y0 = pad + 10 + 50 * i
            length = int(panel_w * r[metric]["median"] / top)
            for y in range(y0, y0 + 30):
                for x in range(x0 + 1, x0 + 1 + length):
                    img[y][x] = color
            lo, hi = (int(panel_w * r[metric][k] / top) for k in ("min", "max"))
            for x in range(x0 + lo, min(x0 + hi + 1, w)):
                img[y0 + 15][x] = (0, 0, 0)
    raw = b"".join(b"\x00" + bytes(c for px in row for c in px) for row in img)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    path.write_bytes(png)


def write(res: dict, out_dir: Path, name: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    res["plot"] = plot(res, out_dir / f"{name}.png")
    (out_dir / f"{name}.json").write_text(json.dumps(res, indent=2) + "\n")
    (out_dir / f"{name}.md").write_text(markdown(res))
