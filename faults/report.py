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
    "trainer_equals_fold": "trainer",
    "event_order_bounded": "event order",
    "lag_zero": "lag 0",
    "reported_lag_zero": "reported lag 0",
    "no_worker_crash": "no crash",
}


def _late(order: dict | None) -> str:
    if not order:
        return "-"
    wall = order.get("max_applied_late_wall_s")
    text = f"{order['events_applied_late']}, {order['max_applied_late_s']} s"
    return text + (f" ({wall} s)" if wall is not None else "")


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
        f"paced feed: {res['settings']['paced_feed']}  ",
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
        "| decision diffs (missing/extra/action/segment/score) | checked exactly "
        "| applied late: events, max s (wall) | recover s | wall s |",
        "|" + "---|" * (len(heads) + 10),
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
            f"{d['segment_differs']}/{d.get('score_differs', '?')}) | {d.get('checked_exactly', '?')}"
            f" | {_late(num.get('applied_order'))} | {rec} | {r['wall_s']} |"
        )
    lines += ["", "## Evidence of failing runs", ""]
    for r in res["runs"]:
        if r.get("passed") or "invariants" not in r:
            continue
        ev, num = r["evidence"], r["numbers"]
        lines.append(f"- **{r['scenario']} {r['guarantee']} run {r['run']}** (app id `{r['app_id']}`):")
        for k in ("dup_pushes", "dup_audit", "dup_dead_letters", "dup_labels"):
            if ev.get(k):
                ex = "; ".join(
                    f"`{e['id'][:24]}` at (partition, offset, ts) {e['copies']}"
                    f"{'' if e['identical_bytes'] else ' NOT byte-identical'}"
                    for e in ev[k][:2]
                )
                lines.append(f"  - {k} {num[k]}: {ex}")
        if ev.get("state"):
            lines.append(
                f"  - state differs for {num['users_state_differs']} users, fields "
                f"{num['state_field_differences']}, against the guided replay "
                f"{num.get('state_fields_differing_from_guided_replay')}; e.g. {json.dumps(ev['state'][0])[:300]}"
            )
        if ev.get("dead_letters_missing"):
            lines.append(f"  - dead letters missing: {json.dumps(ev['dead_letters_missing'])[:300]}")
        d = num["decisions"]
        if num["decision_differences"]:
            lines.append(
                f"  - decisions vs replay: missing {d['missing']} {d['missing_by_campaign_action']}, extra "
                f"{d['extra']}, action {d['action_changes']}, segment {d['segment_differs']}, score "
                f"{d.get('score_differs', '?')}"
            )
            for e in ev.get("decisions_differing", [])[:2]:
                lines.append(
                    f"    - e.g. kafka {json.dumps(e['kafka'])[:300]} / replay {json.dumps(e['replay'])[:300]}"
                )
        if not r["invariants"].get("reported_lag_zero", True) or not r["invariants"].get("lag_zero", True):
            lines.append(f"  - lag at the end: {json.dumps(r['done'].get('partitions'))[:300]}")
        for w in r.get("workers", []):
            if w["crashed"] or w["traceback"] or w["log_hits"]:
                lines.append(
                    f"  - worker {w['worker']} ({w['how_ended']}): {w['log_hits']}"
                    + (f"; `{w['log_lines'][0][:200]}`" if w["log_lines"] else "")
                )
    lines += ["", "## Scenarios", "", "| scenario | feed | what |", "|---|---|---|"]
    lines += [f"| {n} | {v['feed']} | {v['about']} |" for n, v in res.get("scenarios", {}).items()]
    lines += ["", "## Reference (replay)", "", "```", json.dumps(res.get("reference", {}), indent=1), "```", ""]
    return "\n".join(lines)


def write(res: dict[str, Any], out_dir: Path, name: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / f"faults-{name}.json", out_dir / f"faults-{name}.md"
    js.write_text(json.dumps(res, indent=1, default=str) + "\n")
    md.write_text(markdown(res))
    return js, md
