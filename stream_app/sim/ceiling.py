"""How much of the oracle's headroom can information buy? The ceiling study behind issue 18's 0.5 target.

The oracle policy pushes by each user's *own* latent draws (response class, lift, annoyance, payment
multiplier). A learned policy sees events only. Two oracles bracket what any policy could learn:

- ``type_oracle``: knows each user's latent **type** (the segments recover it, ARI 0.99) and nothing of the
  user's own draws: it ranks by the type's mean uplift over its response mix (``population.expected_uplift``),
  at the push's delivery time, with the user's own push history (fatigue, annoyance) and triggering click.
- ``posterior_oracle``: knows the type and infers the class from what the user's own events show (pushes,
  clicks through them, payments) by Bayes' rule with the simulator's parameters (``population.class_posterior``):
  the best a learner of these observations could do.
- ``class_oracle``: also knows the user's **response class** (persuadable, sure thing, lost cause, annoyed),
  the most a user's own history could ever reveal, but not the user's lift or payment multiplier.

Every policy runs the same closed loop as ``stream-app evaluate`` (``sim.loop``: same engine, guardrails,
holdout, exploration and equal push volume); the shares are ``(policy - random) / (oracle - random)`` both in
measured incremental conversions per 1,000 pushes (paired bootstrap intervals over users) and on the
ground-truth scale (mean true uplift of the pushes made, no outcome noise).

    python -m stream_app.sim.ceiling --seeds 1 --out docs/evaluation/ceiling
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from stream_app.core.features import INDEX, NEVER_HOURS
from stream_app.core.policy import Guardrails, next_allowed_ms
from stream_app.core.profile import DAY_MS, HOUR_MS
from stream_app.sim.evaluate import EvalConfig, _task, headroom, volume_and_outcomes
from stream_app.sim.loop import RunResult, eval_campaign, history_mix
from stream_app.sim.population import RESPONSES, make_population, mixture_probabilities
from stream_app.sim.stats import roc_auc


def propensity_ceiling(r: RunResult, cfg: EvalConfig) -> dict[str, Any]:
    """The propensity target's ceiling on one run's labels (after warm-up, as ``evaluate.model_quality``): the
    ROC AUC of P(convert | the decision's action) as Bayes' rule gives it from what the user's events show
    (``loop.history_mix``: the type's classes with their mean traits), and from the type alone, against the
    model served and the true probabilities (Bayes-optimal)."""
    lab = r.labels
    if not len(lab.get("converted", [])):
        return {}
    users = make_population(cfg.users, r.seed)
    day = (lab["decided_at_ms"] - lab["decided_at_ms"].min()) // DAY_MS
    keep = np.flatnonzero((day >= cfg.warmup_days) & (day < cfg.days - 1) & lab["warm"].astype(bool))
    window, guard = eval_campaign(cfg.push_rate).attribution_window_ms, Guardrails()
    posterior, typed = [], []
    for i in keep:
        x, user, t = lab["features"][i], users[int(lab["user"][i])], int(lab["decided_at_ms"][i])
        hours, recent = math.expm1(x[INDEX["log_hours_since_push"]]), int(x[INDEX["pushes_7d"]])
        pushes = [t - int(hours * HOUR_MS)] * max(recent, 1) if hours < NEVER_HOURS - 1 else []
        at = next_allowed_ms(t, user.tz_offset_min, guard) if lab["pushed"][i] else t
        mix = history_mix(user, x)
        side = 0 if lab["pushed"][i] else 1
        posterior.append(mixture_probabilities(user, at, window, pushes, t, mix)[side])
        prior = list(zip(RESPONSES, user.type.responses, strict=True))
        typed.append(mixture_probabilities(user, at, window, pushes, t, prior)[side])
    y = lab["converted"].astype(bool)[keep]
    bayes = roc_auc(lab["true_p"][keep], y)
    out = {"policy": r.policy, "seed": r.seed, "labels": len(keep), "bayes_auc": bayes}
    for name, p in (("model", lab["model"][keep]), ("posterior", np.asarray(posterior)), ("type", np.asarray(typed))):
        out[f"{name}_auc"] = roc_auc(p, y)
        out[f"{name}_ratio"] = out[f"{name}_auc"] / bayes if bayes else math.nan
    return out


ORDER = ("none", "random", "type_oracle", "posterior_oracle", "thompson_oracle", "type_payments_oracle",
         "payments_oracle", "class_oracle", "uplift", "oracle", "propensity")  # fmt: skip


def study(cfg: EvalConfig, policies: tuple[str, ...] = ORDER) -> dict[str, Any]:
    """Run every (policy, seed) of the study (one process: the machine's other core is left alone)."""
    t0 = time.perf_counter()
    results = [_task((p, s, cfg)) for s in cfg.seeds for p in policies]
    auc = [propensity_ceiling(r, cfg) for r in results if r.policy == "propensity"]
    if not {"none", "random", "oracle"} <= set(policies):
        return {
            "config": _config(cfg),
            "policies": {},
            "propensity": auc,
            "seconds": round(time.perf_counter() - t0, 1),
        }
    learned = tuple(p for p in policies if p != "none")
    volume = volume_and_outcomes(results, cfg, policies)
    shares = headroom(results, cfg, learned=learned, scored=tuple(p for p in learned if p not in ("random", "oracle")))
    truth = {p: volume[p]["true_uplift_per_1000"] for p in learned}
    r, o = truth["random"], truth["oracle"]
    rows = {
        p: {
            "incremental_per_1000": volume[p]["incremental_per_1000"],
            "incremental_per_1000_ci": volume[p]["incremental_per_1000_ci"],
            "true_uplift_per_1000": truth[p],
            "share_measured": shares.get(p, {}).get("share", 0.0 if p == "random" else 1.0),
            "share_measured_ci": shares.get(p, {}).get("share_ci"),
            "share_truth": (truth[p] - r) / (o - r) if o != r else math.nan,
            "score_vs_true_uplift": volume[p]["score_vs_true_uplift"],
            "pushes_per_user": volume[p]["pushes_per_user"],
            "opt_outs_per_1000_users": volume[p]["opt_outs_per_1000_users"],
        }
        for p in learned
    }
    return {"config": _config(cfg), "policies": rows, "propensity": auc, "seconds": round(time.perf_counter() - t0, 1)}


def _config(cfg: EvalConfig) -> dict[str, Any]:
    return {"users": cfg.users, "days": cfg.days, "seeds": list(cfg.seeds), "push_rate": cfg.push_rate}


def _f(v: Any, digits: int = 1) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def report(res: dict[str, Any], command: str) -> str:
    c = res["config"]
    lines = [
        "# Ceiling study: how much of the oracle's headroom information can buy",
        "",
        f"Command: `{command}` ({c['users']} users x {c['days']} days, seeds {c['seeds']}, push rate "
        f"{c['push_rate']}; {res['seconds']:.0f} s). See `stream_app/sim/ceiling.py` for the oracles.",
        "",
        "| policy | knows | incremental / 1,000 pushes (95% CI) | share, measured (95% CI) "
        "| true uplift of its pushes / 1,000 | share, ground truth | score vs true uplift | opt-outs / 1,000 users |",
        "|---|---|---|---|---|---|---|---|",
    ]
    knows = {"random": "nothing", "type_oracle": "the user's type", "class_oracle": "type and response class",
             "posterior_oracle": "type; Bayes' rule on its pushes, clicks through them and payments",
             "thompson_oracle": "as posterior_oracle, scoring one class drawn from the posterior (explores)",
             "payments_oracle": "as posterior_oracle, minus the annoyance it causes after the 24 h window",
             "type_payments_oracle": "as type_oracle, minus the annoyance it causes after the 24 h window",
             "uplift": "events (the product's learner)", "oracle": "every latent draw",
             "propensity": "events (the product's propensity learner)"}  # fmt: skip
    for p, v in res["policies"].items():
        lo, hi = v["incremental_per_1000_ci"]
        sci = v["share_measured_ci"]
        share = _f(v["share_measured"], 2) + (f" [{_f(sci[0], 2)}, {_f(sci[1], 2)}]" if sci else "")
        lines.append(
            f"| {p} | {knows.get(p, '')} | {_f(v['incremental_per_1000'])} [{_f(lo)}, {_f(hi)}] | {share} "
            f"| {_f(v['true_uplift_per_1000'])} | {_f(v['share_truth'], 2)} | {_f(v['score_vs_true_uplift'], 3)} "
            f"| {_f(v['opt_outs_per_1000_users'])} |"
        )
    if res.get("propensity"):
        lines += [
            "",
            "Propensity ROC AUC after warm-up, on the propensity policy's labels, as a ratio to Bayes-optimal (the "
            "true probabilities): the model served, Bayes' rule on what the user's events show "
            "(`posterior`), and the type alone.",
            "",
            "| seed | labels | Bayes AUC | model AUC (ratio) | posterior AUC (ratio) | type-only AUC (ratio) |",
            "|---|---|---|---|---|---|",
        ]
        for a in res["propensity"]:
            lines.append(
                f"| {a['seed']} | {a['labels']} | {_f(a['bayes_auc'], 3)} | {_f(a['model_auc'], 3)} "
                f"({_f(a['model_ratio'], 3)}) | {_f(a['posterior_auc'], 3)} ({_f(a['posterior_ratio'], 3)}) | "
                f"{_f(a['type_auc'], 3)} ({_f(a['type_ratio'], 3)}) |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stream_app.sim.ceiling", description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, default=1500)
    ap.add_argument("--days", type=int, default=28)
    ap.add_argument("--seeds", default="1")
    ap.add_argument("--policies", default=",".join(ORDER), help=f"comma-separated, from {ORDER}")
    ap.add_argument("--out", type=Path, default=Path("docs/evaluation/ceiling"))
    a = ap.parse_args(argv)
    cfg = EvalConfig(users=a.users, days=a.days, seeds=tuple(int(x) for x in a.seeds.split(",")), workers=1)
    policies = tuple(p for p in a.policies.split(",") if p)
    if not {"none", "random", "oracle"} <= set(policies) and "propensity" not in policies:
        ap.error("the shares need the none, random and oracle runs; the AUC ceiling the propensity run")
    res = study(cfg, policies)
    a.out.mkdir(parents=True, exist_ok=True)
    command = "python -m stream_app.sim.ceiling " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    (a.out / "ceiling.json").write_text(json.dumps(res, indent=1, default=lambda x: np.asarray(x).tolist()))
    (a.out / "ceiling.md").write_text(report(res, command.strip()))
    print(report(res, command.strip()))


if __name__ == "__main__":
    main()
