"""The matrix's results as JSON and a Markdown table (one row per scenario, guarantee and run)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SHORT = {
    "no_duplicate_pushes": "dup push",
    "no_duplicate_audit": "dup audit",
    "no_duplicate_dead_letters": "dup DL",
    "no_duplicate_labels": "dup label",
    "state_equals_replay": "state",
    "every_input_accounted_once": "accounted",
    "decisions_equal_replay": "decisions",
    "lag_zero": "lag 0",
    "reported_lag_zero": "reported lag 0",
    "no_worker_crash": "no crash",
}


def _cell(ok: bool | None, required: bool) -> str:
    if ok is None:
        return "-"
    if ok:
        return "ok"
    return "FAIL" if required else "(dup)"


def markdown(res: dict[str, Any]) -> str:
    lines = [
        "# Fault matrix",
        "",
        f"Command: `{res['command']}`  ",
        f"Started {res['started']}; wall time {res.get('wall_s', '?')} s; main at `{res.get('commit', '?')}`  ",
        f"Input: {res['input']['users']} users x {res['input']['days']} days, seed {res['input']['seed']}: "
        f"{res['input']['messages']} messages; session timeout {res['settings']['session_timeout_s']} s; "
        f"paced feed {res['settings']['paced_rate']}/s  ",
        "Verifier: a plain aiokafka read_committed consumer over push-decisions, decision-audit, dead letters, "
        "model-inputs and the users changelog, against `stream_app.replay` of the same input. `(dup)`: a duplicate "
        "under at_least_once, counted, not a failure.",
        "",
        "## Verdicts",
        "",
        "| scenario | guarantee | runs | passed | failing invariants (runs) |",
        "|---|---|---|---|---|",
    ]
    for v in res["verdicts"]:
        fails = ", ".join(f"{SHORT.get(k, k)} ({n})" for k, n in v["failing"].items()) or "-"
        lines.append(f"| {v['scenario']} | {v['guarantee']} | {v['runs']} | {v['passed']} | {fails} |")
    heads = list(SHORT.values())
    lines += [
        "",
        "## Runs",
        "",
        "| scenario | guarantee | run | " + " | ".join(heads) + " | dup push/audit/DL/label | applied twice / lost "
        "| decision diffs (missing/extra/action/segment) | recover s | wall s |",
        "|" + "---|" * (len(heads) + 8),
    ]
    for r in res["runs"]:
        if "error" in r and "invariants" not in r:
            lines.append(f"| {r['scenario']} | {r['guarantee']} | {r['run']} | ERROR: {r['error'][:200]} |")
            continue
        inv, num = r["invariants"], r["numbers"]
        cells = [_cell(inv.get(k), k in r["required"]) for k in SHORT]
        d = num["decisions"]
        rec = ", ".join("-" if x["recover_s"] is None else f"{x['recover_s']}" for x in r["recovery"]) or "-"
        lines.append(
            f"| {r['scenario']} | {r['guarantee']} | {r['run']} | "
            + " | ".join(cells)
            + f" | {num['dup_pushes']}/{num['dup_audit']}/{num['dup_dead_letters']}/{num['dup_labels']}"
            f" | {num['events_applied_twice']}/{num['events_lost']}"
            f" | {num['decision_differences']} ({d['missing']}/{d['extra']}/{d['action_differs']}/"
            f"{d['segment_differs']}) | {rec} | {r['wall_s']} |"
        )
    lines += ["", "## Reference (replay)", "", "```", json.dumps(res.get("reference", {}), indent=1), "```", ""]
    return "\n".join(lines)


def write(res: dict[str, Any], out_dir: Path, name: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / f"faults-{name}.json", out_dir / f"faults-{name}.md"
    js.write_text(json.dumps(res, indent=1, default=str) + "\n")
    md.write_text(markdown(res))
    return js, md
