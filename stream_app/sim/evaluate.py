"""``stream-app evaluate``: closed-loop simulations of every policy over several seeds, and a report.

Runs ``loop.run`` for each (seed, policy) (in ``workers`` processes), validates the propensity learner on
River's bundled Phishing dataset, and writes ``report.md`` with PNG plots and ``summary.json``.
See ``loop`` for how policies are compared at equal push volume.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stream_app.core.profile import DAY_MS
from stream_app.sim.loop import POLICIES, RunResult, run
from stream_app.sim.simulator import SimConfig
from stream_app.sim.stats import bootstrap_ci, calibration, log_loss, mean_ci, roc_auc, spearman

LEARNED = ("random", "propensity", "uplift", "oracle")
RIVER_DOC = {
    "score": 0.8896, "metric": "Accuracy",
    "model": "preprocessing.StandardScaler() | linear_model.LogisticRegression(optimizer=optim.SGD(.1))",
    "url": "https://riverml.xyz/latest/api/linear-model/LogisticRegression/",
    "source": "River's LogisticRegression API page (the docstring example in river/linear_model/log_reg.py)",
    "readme_score": 0.8928, "readme_url": "https://github.com/online-ml/river#-quickstart",
}  # fmt: skip


@dataclass(frozen=True)
class EvalConfig:
    users: int = 1500
    days: int = 28
    seeds: tuple[int, ...] = (1, 2, 3)
    push_rate: float = 0.05
    warmup_days: int = 7
    workers: int = 2
    bootstrap: int = 1000


QUICK = EvalConfig(users=150, days=6, seeds=(1,), warmup_days=2, workers=1, bootstrap=100)


def _task(args: tuple[str, int, EvalConfig]) -> RunResult:
    policy, seed, cfg = args
    sim = SimConfig(users=cfg.users, days=cfg.days, seed=seed)
    from stream_app.settings import Settings

    # the evaluated trainer learns labels in decision order (STREAM_APP_TRAINER_DECISION_ORDER, docs/models.md)
    settings = Settings().model_copy(update={"trainer_decision_order": True})
    return run(policy, sim, cfg.push_rate, settings=settings, segments_every_day=policy == "propensity")


def run_all(cfg: EvalConfig) -> list[RunResult]:
    order = {"none": 4, "random": 1, "propensity": 0, "uplift": 2, "oracle": 3}  # slowest first, the baseline last
    tasks = sorted(((p, s, cfg) for s in cfg.seeds for p in POLICIES), key=lambda t: (order[t[0]], t[1]))
    if cfg.workers <= 1:
        return [_task(t) for t in tasks]
    with ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_task, tasks))


# -- measures ------------------------------------------------------------------------------------------
def volume_and_outcomes(results: list[RunResult], cfg: EvalConfig,
                        policies: Sequence[str] = POLICIES) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Per policy: pushes, opt-outs, conversions, incremental conversions per 1,000 pushes (with CIs)."""
    none = {r.seed: r for r in results if r.policy == "none"}
    out: dict[str, dict[str, Any]] = {}
    for policy in policies:
        runs = sorted((r for r in results if r.policy == policy), key=lambda r: r.seed)
        row: dict[str, Any] = {
            "pushes_per_user": float(np.mean([r.pushes.sum() / len(r.pushes) for r in runs])),
            "opt_outs_per_1000_users": float(np.mean([1000 * r.opted_out.mean() for r in runs])),
            "conversions": float(np.mean([r.payments.sum() for r in runs])),
        }
        if policy != "none":
            groups = [np.column_stack([r.payments - none[r.seed].payments, r.pushes]) for r in runs]

            def per_1000(gs: list[np.ndarray]) -> float:
                pushes = sum(g[:, 1].sum() for g in gs)
                return 1000 * sum(g[:, 0].sum() for g in gs) / pushes if pushes else math.nan

            row["incremental_per_1000"] = per_1000(groups)
            row["incremental_per_1000_ci"] = bootstrap_ci(groups, per_1000, cfg.bootstrap)
            row["incremental_per_1000_by_seed"] = [per_1000([g]) for g in groups]
            row["conversions_vs_none"] = float(np.mean([r.payments.sum() / none[r.seed].payments.sum() - 1
                                                        for r in runs]))  # fmt: skip
            ratio = [np.column_stack([r.payments, none[r.seed].payments]) for r in runs]
            row["conversions_vs_none_ci"] = bootstrap_ci(
                ratio, lambda gs: sum(g[:, 0].sum() for g in gs) / sum(g[:, 1].sum() for g in gs) - 1, cfg.bootstrap
            )
            expected = [r.decisions["p_push"][r.decisions["pushed"]] - r.decisions["p_no"][r.decisions["pushed"]]
                        for r in runs if len(r.decisions.get("pushed", []))]  # fmt: skip
            row["true_uplift_per_1000"] = 1000 * float(np.mean(np.concatenate(expected))) if expected else math.nan
            corr = []
            for r in runs:
                d = r.decisions
                if len(d.get("raw", [])) > 2:
                    warm = d["decided_at_ms"] >= d["decided_at_ms"].min() + cfg.warmup_days * DAY_MS
                    corr.append(spearman(d["raw"][warm], (d["p_push"] - d["p_no"])[warm]))
            row["score_vs_true_uplift"] = _nanmean(corr)
            oo = [np.column_stack([r.opted_out]) for r in runs]
            row["opt_outs_per_1000_users_ci"] = bootstrap_ci(
                oo, lambda gs: 1000 * float(np.mean(np.concatenate([g[:, 0] for g in gs]))), cfg.bootstrap
            )
        out[policy] = row
    return out


def model_quality(results: list[RunResult], cfg: EvalConfig, policy: str = "propensity") -> dict[str, Any]:
    """The propensity model's progressive AUC, log loss and calibration against the ground truth."""
    runs = [r for r in results if r.policy == policy and len(r.labels.get("converted", []))]
    if not runs:
        return {}
    lab = {k: np.concatenate([r.labels[k] for r in runs]) for k in runs[0].labels}
    t0 = min(r.labels["decided_at_ms"].min() for r in runs)
    day = ((lab["decided_at_ms"] - t0) // DAY_MS).astype(int)
    y = lab["converted"].astype(bool)
    closed = day < cfg.days - 1  # the last day's windows close after the run: only its early positives exist
    after = (day >= cfg.warmup_days) & closed & lab["warm"].astype(bool)
    by_day = []
    for d in range(min(int(day.max()) + 1, cfg.days - 1)):
        m = day == d
        ym, pm, tm = y[m], lab["model"][m], lab["true_p"][m]
        by_day.append({"day": d, "n": int(m.sum()), "positives": int(ym.sum()), "auc": roc_auc(pm, ym),
                       "bayes_auc": roc_auc(tm, ym), "log_loss": log_loss(pm, ym),
                       "bayes_log_loss": log_loss(tm, ym)})  # fmt: skip
    auc, bayes = roc_auc(lab["model"][after], y[after]), roc_auc(lab["true_p"][after], y[after])
    per_seed = []
    for r in runs:
        ry = r.labels["converted"].astype(bool)
        rday = (r.labels["decided_at_ms"] - t0) // DAY_MS
        rm = (rday >= cfg.warmup_days) & (rday < cfg.days - 1) & r.labels["warm"].astype(bool)
        per_seed.append(roc_auc(r.labels["model"][rm], ry[rm]) / roc_auc(r.labels["true_p"][rm], ry[rm]))
    return {
        "labels_after_warmup": int(after.sum()), "positives_after_warmup": int(y[after].sum()),
        "auc": auc, "bayes_auc": bayes, "auc_ratio": auc / bayes if bayes else math.nan,
        "auc_ratio_by_seed": per_seed,
        "log_loss": log_loss(lab["model"][after], y[after]), "bayes_log_loss": log_loss(lab["true_p"][after], y[after]),
        "base_rate": float(y[after].mean()) if after.any() else math.nan,
        "calibration": calibration(lab["model"][after], y[after], lab["true_p"][after]), "by_day": by_day,
    }  # fmt: skip


def segment_recovery(results: list[RunResult]) -> dict[str, Any]:
    runs = [r for r in results if r.segments.get("day")]
    if not runs:
        return {}
    final = [r.segments["ari_types"][-1] for r in runs]
    stability = [_nanmean(r.segments["ari_previous"][-7:]) for r in runs]
    return {"ari_final": mean_ci(final), "ari_final_by_seed": final, "stability_last_week": mean_ci(stability),
            "by_seed": [r.segments for r in runs]}  # fmt: skip


def holdout_uplift(results: list[RunResult], cfg: EvalConfig) -> dict[str, dict[str, Any]]:
    """Per policy: pushed minus holdout conversion rate among decisions the policy would push (rank >= threshold,
    after warm-up), with a 95% interval from a bootstrap over users; next to the true mean uplift of those pushes.
    (Holdout decisions are virtual pushes, spaced by the same cooldown and caps: the arms are comparable.)"""
    out = {}
    threshold = 1 - cfg.push_rate
    for policy in LEARNED:
        runs = [r for r in results if r.policy == policy and len(r.labels.get("converted", []))]
        if not runs:
            continue
        treated_groups, control_groups, truths = [], [], []
        for r in runs:
            lab = r.labels
            day = (lab["decided_at_ms"] - r.labels["decided_at_ms"].min()) // DAY_MS
            keep = (lab["rank"] >= threshold) & (day >= cfg.warmup_days) & (day < cfg.days - 1)
            pushed = lab["pushed"].astype(bool)
            treated_groups.append(_by_user(lab["user"][keep & pushed], lab["converted"][keep & pushed]))
            control_groups.append(_by_user(lab["user"][keep & ~pushed], lab["converted"][keep & ~pushed]))
            truths.append(lab["true_uplift"][keep & pushed])
        if not any(len(g) for g in control_groups):
            continue

        def estimate(gs: list[np.ndarray], n: int = len(runs)) -> float:
            t, c = gs[:n], gs[n:]
            rate = [sum(g[:, 0].sum() for g in x) / max(sum(g[:, 1].sum() for g in x), 1) for x in (t, c)]
            return rate[0] - rate[1]

        groups = treated_groups + control_groups
        truth = float(np.mean(np.concatenate(truths))) if sum(len(t) for t in truths) else math.nan
        lo, hi = bootstrap_ci(groups, estimate, cfg.bootstrap)
        out[policy] = {"estimate": estimate(groups), "ci": (lo, hi), "true_uplift": truth,
                       "contains": bool(lo <= truth <= hi),
                       "treated_labels": int(sum(g[:, 1].sum() for g in treated_groups)),
                       "holdout_labels": int(sum(g[:, 1].sum() for g in control_groups))}  # fmt: skip
    return out


def _nanmean(values: Sequence[float]) -> float:
    v = [x for x in values if not math.isnan(x)]
    return sum(v) / len(v) if v else math.nan


def _by_user(users: np.ndarray, converted: np.ndarray) -> np.ndarray:
    """Rows (conversions, labels) per user: the unit a cluster bootstrap resamples."""
    if not len(users):
        return np.zeros((0, 2))
    ids, inv = np.unique(users, return_inverse=True)
    conv = np.bincount(inv, weights=converted.astype(float), minlength=len(ids))
    return np.column_stack([conv, np.bincount(inv, minlength=len(ids)).astype(float)])


def headroom(results: list[RunResult], cfg: EvalConfig, learned: Sequence[str] = LEARNED,
             scored: Sequence[str] = ("propensity", "uplift")) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Per learned policy: the share of the oracle's headroom over random, ``(policy - random) / (oracle -
    random)`` in incremental conversions per 1,000 pushes, and its difference to random per seed, with 95%
    intervals from a paired bootstrap over users (the same users on a seed, in every policy's run)."""
    none = {r.seed: r for r in results if r.policy == "none"}
    by = {(r.policy, r.seed): r for r in results}
    seeds = [sd for sd in sorted(none) if all((p, sd) in by for p in learned)]
    if not seeds:
        return {}
    idx = {p: i for i, p in enumerate(learned)}
    groups = [np.column_stack([c for p in learned for c in (by[(p, sd)].payments - none[sd].payments,
                                                              by[(p, sd)].pushes)]).astype(float)
              for sd in seeds]  # fmt: skip

    def inc(gs: list[np.ndarray], p: str) -> float:
        i = 2 * idx[p]
        pushes = sum(g[:, i + 1].sum() for g in gs)
        return 1000 * sum(g[:, i].sum() for g in gs) / pushes if pushes else math.nan

    out: dict[str, dict[str, Any]] = {}
    for p in scored:

        def share(gs: list[np.ndarray], p: str = p) -> float:
            r, o = inc(gs, "random"), inc(gs, "oracle")
            return (inc(gs, p) - r) / (o - r) if o != r else math.nan

        def diff(gs: list[np.ndarray], p: str = p) -> float:
            return inc(gs, p) - inc(gs, "random")

        out[p] = {"share": share(groups), "share_ci": bootstrap_ci(groups, share, cfg.bootstrap),
                  "diff_by_seed": [diff([g]) for g in groups],
                  "diff_ci_by_seed": [bootstrap_ci([g], diff, cfg.bootstrap) for g in groups],
                  "seeds": seeds}  # fmt: skip
    if "uplift" in out and "propensity" in idx:
        up_minus_prop = lambda gs: inc(gs, "uplift") - inc(gs, "propensity")  # noqa: E731
        out["uplift"]["minus_propensity"] = up_minus_prop(groups)
        out["uplift"]["minus_propensity_ci"] = bootstrap_ci(groups, up_minus_prop, cfg.bootstrap)
    return out


def off_policy(results: list[RunResult], cfg: EvalConfig) -> list[dict[str, Any]]:
    """``core/ope.py`` validated against the truth: from the random policy's log (its labelled pushes and
    holdouts), the IPS and doubly robust estimates of target policies' value and uplift per push, next to the
    true values (the simulator's P(convert | push) and P(convert | no push) of each logged decision)."""
    from stream_app.core.features import feature_dict, without_push_responses
    from stream_app.core.ope import LoggedDecision, evaluate_policy
    from stream_app.core.trainer import uplift_key
    from stream_app.core.uplift import UpliftScorer
    from stream_app.sim.loop import CAMPAIGN, eval_campaign

    e = 1 - eval_campaign(cfg.push_rate).holdout_share
    logs = {r.seed: r for r in results if r.policy == "random" and len(r.labels.get("converted", []))}
    models = {r.seed: r.final_params.get(uplift_key(CAMPAIGN)) for r in results if r.policy == "uplift"}
    seeds = sorted(logs)
    out = []
    for i, sd in enumerate(seeds):
        lab = logs[sd].labels
        day = (lab["decided_at_ms"] - lab["decided_at_ms"].min()) // DAY_MS
        keep = np.flatnonzero(day < cfg.days - 1)  # the last day's windows close after the run
        log = [LoggedDecision(str(lab["user"][j]), bool(lab["pushed"][j]), bool(lab["converted"][j]), e,
                              without_push_responses(feature_dict(lab["features"][j], int(lab["segment"][j]))))
               for j in keep]  # fmt: skip
        p1, p0 = lab["p_push"][keep], lab["p_no"][keep]
        others = [models.get(t) for t in seeds[i + 1 :] + seeds[: i + 1]]  # another seed's model first
        params = next((m for m in others if m), None)
        policies: dict[str, Any] = {"push every logged decision": lambda x: 1.0}
        if params:
            scorer = UpliftScorer.from_params(params)
            cut = float(np.median([scorer.predict_uplift_one(d.x) for d in log]))
            policies["uplift model, top half"] = lambda x, s=scorer, c=cut: float(s.predict_uplift_one(x) >= c)
            policies["uplift model, bottom half"] = lambda x, s=scorer, c=cut: float(s.predict_uplift_one(x) < c)
        for name, policy in policies.items():
            est = evaluate_policy(log, policy, reps=max(cfg.bootstrap // 2, 100))
            pi = np.array([policy(d.x) for d in log])
            true_value = float(np.mean(pi * p1 + (1 - pi) * p0))
            true_uplift = float(np.sum(pi * (p1 - p0)) / np.sum(pi)) if pi.sum() else math.nan
            out.append({"seed": sd, "policy": name, **est, "true_value": true_value,
                        "true_uplift_per_push": true_uplift})  # fmt: skip
    return out


def validate_phishing() -> dict[str, Any]:
    """Progressive validation of ``PropensityLearner`` on River's bundled Phishing dataset (no download)."""
    from river import base, datasets, evaluate, linear_model, metrics, optim, preprocessing

    from stream_app.core.propensity import PropensityLearner, PropensityScorer

    def _scorer(params: dict) -> PropensityScorer:
        return PropensityScorer.from_params(params, features=tuple(params["features"]))

    class Adapter(base.Classifier):
        """The product's learner behind River's classifier API: its own dict API, its defaults; scored through the
        scorer the workers use (the snapshot of ``to_params``, on the dataset's 9 features in a fixed order)."""

        def __init__(self) -> None:
            self.learner: PropensityLearner | None = None

        def learn_one(self, x: dict, y: bool) -> None:
            if self.learner is None:
                self.learner = PropensityLearner("phishing", features=sorted(x))
            self.learner.learn_one({k: float(v) for k, v in x.items()}, bool(y))

        def predict_proba_one(self, x: dict) -> dict[bool, float]:
            if self.learner is None:
                return {True: 0.5, False: 0.5}
            params = self.learner.to_params(with_covariance=False)
            p = _scorer(params).predict_one([float(x.get(n, 0.0)) for n in params["features"]])
            return {True: p, False: 1 - p}

    def score(model: base.Classifier) -> dict[str, float]:
        acc, auc, ll = metrics.Accuracy(), metrics.ROCAUC(), metrics.LogLoss()
        evaluate.progressive_val_score(datasets.Phishing(), model, acc + auc + ll)
        return {"accuracy": acc.get(), "roc_auc": auc.get(), "log_loss": ll.get()}

    documented = preprocessing.StandardScaler() | linear_model.LogisticRegression(optimizer=optim.SGD(0.1))
    n = sum(1 for _ in datasets.Phishing())
    return {"n": n, "ours": score(Adapter()), "documented_setup": score(documented), "doc": RIVER_DOC}


# -- report --------------------------------------------------------------------------------------------
def evaluate(cfg: EvalConfig, out_dir: Path) -> dict[str, Any]:
    t_start = time.perf_counter()
    results = run_all(cfg)
    t_runs = time.perf_counter() - t_start
    summary: dict[str, Any] = {
        "config": asdict(cfg),
        "volume": volume_and_outcomes(results, cfg),
        "model": model_quality(results, cfg),
        "segments": segment_recovery(results),
        "holdout": holdout_uplift(results, cfg),
        "headroom": headroom(results, cfg),
        "ope": off_policy(results, cfg),
        "phishing": validate_phishing(),
        "runs": [
            {"policy": r.policy, "seed": r.seed, "events": r.events, "seconds": round(r.seconds, 1), "counts": r.counts}
            for r in results
        ],
        "simulation_seconds": round(t_runs, 1),
    }
    summary["targets"] = targets(summary)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots(summary, out_dir)
    summary["seconds"] = round(time.perf_counter() - t_start, 1)
    (out_dir / "summary.json").write_text(json.dumps(_jsonable(summary), indent=1, sort_keys=True))
    (out_dir / "report.md").write_text(render(summary))
    return summary


PREVIOUS = {  # the committed report before issue 18 (same command, 1,500 users x 28 days, seeds 1, 2, 3)
    "incremental_per_1000": {"random": 26.6, "propensity": 27.7, "uplift": 27.5, "oracle": 48.8},
    "incremental_per_1000_ci": {"random": (22.5, 30.5), "propensity": (23.7, 32.0), "uplift": (23.0, 32.0),
                                "oracle": (45.1, 52.3)},
    "share": {"propensity": 0.05, "uplift": 0.04},
    "score_vs_true_uplift": {"random": 0.015, "propensity": 0.158, "uplift": 0.092, "oracle": 0.990},
    "opt_outs_per_1000_users": {"random": 49.6, "propensity": 43.6, "uplift": 40.0, "oracle": 28.4},
    "expected_per_1000": {"random": 37.3, "propensity": 37.4, "uplift": 38.8, "oracle": 49.5},
    "auc": 0.692, "bayes_auc": 0.798, "auc_ratio": 0.867, "top_decile": (0.3146, 0.2775),
}  # fmt: skip


def same_setup_as_previous(c: dict[str, Any]) -> bool:
    return c["users"] == 1500 and c["days"] == 28 and tuple(c["seeds"]) == (1, 2, 3) and c["push_rate"] == 0.05


def targets(s: dict[str, Any]) -> list[dict[str, Any]]:
    v, m, seg, h, hr = s["volume"], s["model"], s["segments"], s["holdout"], s["headroom"]
    inc = {p: v.get(p, {}).get("incremental_per_1000", math.nan) for p in LEARNED}
    ci = {p: v.get(p, {}).get("incremental_per_1000_ci", (math.nan, math.nan)) for p in LEARNED}
    up = hr.get("uplift", {})
    share, share_ci = up.get("share", math.nan), up.get("share_ci", (math.nan, math.nan))
    diffs, dcis = up.get("diff_by_seed", []), up.get("diff_ci_by_seed", [])
    auc_ratio = m.get("auc_ratio", math.nan)
    top = m.get("calibration", [{}])[-1] if m.get("calibration") else {}
    top_err = top.get("predicted", math.nan) / top.get("observed", math.nan) - 1 if top.get("observed") else math.nan
    opt_up, opt_rnd = (v.get(p, {}).get("opt_outs_per_1000_users", math.nan) for p in ("uplift", "random"))
    ari = seg.get("ari_final", (math.nan,))[0]
    return [
        {"target": "uplift policy: headroom share (uplift - random) / (oracle - random) >= 0.5",
         "measured": f"{share:.2f} {_ci(share_ci, 2)}", "met": bool(share >= 0.5), "previous": "0.04"},
        {"target": "uplift - random incremental conversions / 1,000 pushes: 95% CI excludes 0 on every seed",
         "measured": "; ".join(f"seed {sd}: {d:+.1f} {_ci(c)}" for sd, d, c in zip(up.get("seeds", []), diffs, dcis,
                                                                                       strict=False)),
         "met": bool(dcis) and all(c[0] > 0 for c in dcis), "previous": "+0.9 pooled (27.5 vs 26.6)"},
        {"target": "uplift above propensity, non-overlapping 95% intervals",
         "measured": f"{inc['uplift']:.1f} {_ci(ci['uplift'])} vs {inc['propensity']:.1f} {_ci(ci['propensity'])}; "
                     f"paired difference {up.get('minus_propensity', math.nan):+.1f} "
                     f"{_ci(up.get('minus_propensity_ci', (math.nan, math.nan)))}",
         "met": bool(ci["uplift"][0] > ci["propensity"][1]), "previous": "27.5 vs 27.7"},
        {"target": "uplift opt-outs per 1,000 users no more than random's",
         "measured": f"{opt_up:.1f} vs {opt_rnd:.1f}",
         "met": bool(opt_up <= opt_rnd), "previous": "40.0 vs 49.6"},
        {"target": "propensity ROC AUC >= 0.93 x Bayes-optimal after warm-up",
         "measured": f"{m.get('auc', math.nan):.3f} / {m.get('bayes_auc', math.nan):.3f} = {auc_ratio:.3f} x",
         "met": bool(auc_ratio >= 0.93), "previous": "0.692 / 0.798 = 0.867 x"},
        {"target": "propensity calibrated: top decile predicted within 10% of observed",
         "measured": f"{top.get('predicted', math.nan):.3f} predicted vs {top.get('observed', math.nan):.3f} observed "
                     f"({100 * top_err:+.0f}%)", "met": bool(abs(top_err) <= 0.10),
         "previous": "0.315 vs 0.277 (+13%)"},
        {"target": "holdout uplift 95% CI contains the true uplift, every policy",
         "measured": ", ".join(f"{p} {'yes' if r['contains'] else 'NO'}" for p, r in h.items()),
         "met": bool(h) and all(r["contains"] for r in h.values()), "previous": "yes (all four)"},
        {"target": "off-policy estimates (IPS, DR) 95% CI contain the true value",
         "measured": _ope_summary(s["ope"]), "met": bool(s["ope"]) and all(_ope_ok(r) for r in s["ope"]),
         "previous": "(new)"},
        {"target": "segment recovery ARI >= 0.7", "measured": f"ARI {ari:.3f} (final day, mean of seeds)",
         "met": bool(ari >= 0.7), "previous": "0.987"},
    ]  # fmt: skip


def _ope_ok(r: dict[str, Any]) -> bool:
    """Whether all four intervals (IPS and DR, value and uplift per push) contain the truth."""
    truth = {"ips": "true_value", "dr": "true_value", "ips_uplift_per_push": "true_uplift_per_push",
             "dr_uplift_per_push": "true_uplift_per_push"}  # fmt: skip
    return all(r[f"{k}_ci"][0] <= r[t] <= r[f"{k}_ci"][1] for k, t in truth.items())


def _ope_summary(rows: list[dict[str, Any]]) -> str:
    return f"{sum(_ope_ok(r) for r in rows)} of {len(rows)} (policy, seed) pairs, all four estimates" if rows else "n/a"


def _overlap(v: dict[str, Any], a: str, b: str) -> bool:
    ca, cb = (v.get(p, {}).get("incremental_per_1000_ci", (math.nan, math.nan)) for p in (a, b))
    return bool(ca[0] <= cb[1] and cb[0] <= ca[1])


def why(s: dict[str, Any]) -> list[str]:
    """Why each target was met or missed: the mechanism, with the numbers that show it."""
    v, m = s["volume"], s["model"]
    t = [x["met"] for x in s["targets"]]
    rho = {p: v.get(p, {}).get("score_vs_true_uplift", math.nan) for p in LEARNED}
    exp = {p: v.get(p, {}).get("true_uplift_per_1000", math.nan) for p in LEARNED}
    top = (m.get("calibration") or [{}])[-1]
    return [
        (f"the uplift learner ranks by P(a conversion through the push | features, segment), learned from every pushed "
         f"label, plus a shrunk holdout correction; rank correlation with the true uplift {_f(rho['uplift'], 3)} "
         f"(oracle {_f(rho['oracle'], 3)}); mean true uplift of its pushes {_f(exp['uplift'])} per 1,000 vs "
         f"random {_f(exp['random'])}, oracle {_f(exp['oracle'])}"),
        ("every seed's paired interval is above 0" if t[1] else
         "a seed's paired interval (same users, both runs) reaches 0: per seed about 6,000 pushes, whose "
         "incremental conversions carry an interval of about +-5 per 1,000"),
        ("propensity targets likely buyers (sure things among them), the uplift learner the users a push moves"
         if t[2] else f"rank correlation with the true uplift: uplift {_f(rho['uplift'], 3)}, propensity "
         f"{_f(rho['propensity'], 3)}; propensity's users respond to pushes too (its score includes the push-response "
         "features), so its intervals and the uplift policy's overlap"),
        ("annoyed users (negative uplift) and fatigued users score low" if t[3] else
         "the uplift policy pushes the users who respond again (48 h cooldown), and every push adds to the opt-out "
         "probability (x (1 + pushes in 7 days)); annoyed users are not told apart from lost causes"),
        ("the Bayesian logistic learner on the 26 features reaches it" if t[4] else
         "the truth comes from latent traits (response class, a log-normal payment multiplier) that the features "
         "show only through a few weeks of sparse behaviour; Bayesian logistic regression on 26 features "
         "(push responses, fatigue, purchase rate) instead of SGD on 18 closed part of the gap"),
        ("calibrated within 10%" if t[5] else
         f"the top decile is mis-predicted ({_f(top.get('predicted', math.nan), 3)} vs "
         f"{_f(top.get('observed', math.nan), 3)}): the posterior mean of a logistic model "
         "learned in one pass is over-confident where labels are few"),
        ("holdout decisions are virtual pushes (same checks, cooldown and caps): the arms compare like with like"
         if t[6] else "see the holdout table: the pushed and holdout arms of some policy differ"),
        ("the holdout is randomised with a known probability, so IPS and DR are unbiased on the labelled decisions"
         if t[7] else "see the off-policy table: an interval misses the truth"),
        "segments match the types (k-means on user traits)" if t[8] else "segments split or merge types",
    ]  # fmt: skip


def plots(s: dict[str, Any], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    v = s["volume"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    names = [p for p in LEARNED if p in v]
    mid = [v[p]["incremental_per_1000"] for p in names]
    err = np.array([[m - v[p]["incremental_per_1000_ci"][0], v[p]["incremental_per_1000_ci"][1] - m]
                    for p, m in zip(names, mid, strict=True)]).T  # fmt: skip
    axes[0].bar(names, mid, yerr=err, capsize=4, color="#4c72b0")
    axes[0].scatter(names, [v[p]["true_uplift_per_1000"] for p in names], color="#dd8452", zorder=3,
                    label="expected (true uplift of the pushes)")  # fmt: skip
    axes[0].set_title("incremental conversions / 1,000 pushes")
    axes[0].axhline(0, color="black", lw=0.5)
    axes[0].legend(fontsize=7)
    allp = [p for p in POLICIES if p in v]
    axes[1].bar(allp, [v[p]["opt_outs_per_1000_users"] for p in allp], color="#c44e52")
    axes[1].set_title("opt-outs per 1,000 users")
    axes[2].bar(allp, [v[p]["pushes_per_user"] for p in allp], color="#55a868")
    axes[2].set_title("pushes delivered per user")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "policies.png", dpi=110)
    plt.close(fig)

    m = s["model"]
    if m:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
        days = [d["day"] for d in m["by_day"]]
        axes[0].plot(days, [d["auc"] for d in m["by_day"]], "o-", label="model (progressive)")
        axes[0].plot(days, [d["bayes_auc"] for d in m["by_day"]], "s--", label="Bayes-optimal (true p)")
        axes[0].axvline(s["config"]["warmup_days"] - 0.5, color="grey", lw=0.8)
        axes[0].set_title("ROC AUC by day of decision")
        axes[0].legend(fontsize=7)
        axes[1].plot(days, [d["log_loss"] for d in m["by_day"]], "o-", label="model")
        axes[1].plot(days, [d["bayes_log_loss"] for d in m["by_day"]], "s--", label="true p")
        axes[1].set_title("log loss by day")
        axes[1].legend(fontsize=7)
        cal = m["calibration"]
        top = max([c["predicted"] for c in cal] + [c["observed"] for c in cal] + [0.01])
        axes[2].plot([0, top], [0, top], color="grey", lw=0.8)
        axes[2].plot([c["predicted"] for c in cal], [c["observed"] for c in cal], "o-", label="observed rate")
        axes[2].plot([c["predicted"] for c in cal], [c["true"] for c in cal], "s--", label="mean true p")
        axes[2].set_xlabel("predicted P(convert)")
        axes[2].set_title("calibration after warm-up")
        axes[2].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "propensity.png", dpi=110)
        plt.close(fig)

    seg = s["segments"]
    if seg:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for k in seg["by_seed"]:
            axes[0].plot(k["day"], k["ari_types"], "o-", ms=3)
            axes[1].plot(k["day"], k["ari_previous"], "o-", ms=3)
        axes[0].axhline(0.7, color="grey", ls=":", lw=0.8)
        axes[0].set_title("ARI: segments vs latent types (per seed)")
        axes[1].set_title("ARI: segments vs the day before (stability)")
        for ax in axes:
            ax.set_xlabel("simulated day")
            ax.set_ylim(-0.05, 1.05)
        fig.tight_layout()
        fig.savefig(out_dir / "segments.png", dpi=110)
        plt.close(fig)

    h = s["holdout"]
    if h:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        names = list(h)
        est = [h[p]["estimate"] for p in names]
        err = np.array([[e - h[p]["ci"][0], h[p]["ci"][1] - e] for p, e in zip(names, est, strict=True)]).T
        x = np.arange(len(names))
        ax.errorbar(x - 0.08, est, yerr=err, fmt="o", capsize=4, label="holdout estimate, 95% CI")
        ax.scatter(x + 0.08, [h[p]["true_uplift"] for p in names], marker="s", color="#dd8452", label="true uplift")
        ax.set_xticks(x, names)
        ax.axhline(0, color="black", lw=0.5)
        ax.set_title("uplift of the pushes a policy chose (holdout estimate)", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "uplift.png", dpi=110)
        plt.close(fig)


def _f(x: float, digits: int = 1) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _ci(ci: Sequence[float], digits: int = 1) -> str:
    return f"[{_f(ci[0], digits)}, {_f(ci[1], digits)}]"


def render(s: dict[str, Any]) -> str:
    c, v, m, seg, h, ph = s["config"], s["volume"], s["model"], s["segments"], s["holdout"], s["phishing"]
    events = sum(r["events"] for r in s["runs"])
    lines = [
        "# Decision quality: closed-loop evaluation",
        "",
        f"Generated by `stream-app evaluate` ({c['users']} simulated users x {c['days']} days, seeds "
        f"{', '.join(map(str, c['seeds']))}, push rate {c['push_rate']:g} of eligible triggers, warm-up "
        f"{c['warmup_days']} days). {len(s['runs'])} runs, {events:,} simulated messages; simulations took "
        f"{s['simulation_seconds']:.0f} s with {c['workers']} worker processes. The simulator and the policies are "
        "described in docs/simulator.md and docs/evaluation.md; every number below is recomputed by the command.",
        "",
        "## Targets",
        "",
        'Issue 18\'s targets. "Previous": the committed report before issue 18 (same command and size).',
        "",
        "| target | measured | met | previous | why |",
        "|---|---|---|---|---|",
    ]
    prev = same_setup_as_previous(c)
    lines += [f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else '**no**'} | "
              f"{t['previous'] if prev else '-'} | {w} |"
              for t, w in zip(s["targets"], why(s), strict=True)]  # fmt: skip
    hr = s["headroom"]
    if hr:
        lines += [
            "",
            "## Share of the oracle's headroom",
            "",
            "`(policy - random) / (oracle - random)` in incremental conversions per 1,000 pushes, pooled over seeds; "
            "intervals from a paired bootstrap over users (the same users on a seed in every run). Per seed: the "
            "policy's incremental conversions per 1,000 pushes minus random's, with its paired 95% interval.",
            "",
            "| policy | headroom share (95% CI) | previous | minus random, per seed (95% CI) |",
            "|---|---|---|---|",
        ]
        for p, r in hr.items():
            rows = zip(r["seeds"], r["diff_by_seed"], r["diff_ci_by_seed"], strict=True)
            per_seed = "; ".join(f"seed {sd}: {d:+.1f} {_ci(ci)}" for sd, d, ci in rows)
            lines.append(f"| {p} | {_f(r['share'], 2)} {_ci(r['share_ci'], 2)} | "
                         f"{_f(PREVIOUS['share'][p], 2) if prev else '-'} | {per_seed} |")  # fmt: skip
    lines += [
        "",
        "## Policies at equal push volume",
        "",
        "Every policy pushes the top share of its own candidates (see docs/evaluation.md). Incremental "
        "conversions are payments in the policy's run minus payments in the no-push run of the same seed (same "
        "users, same organic behaviour), per 1,000 delivered pushes; 95% intervals from a bootstrap over users "
        '(stratified by seed). "Expected" is the ground truth: the mean true uplift of the pushes the policy '
        'made, per 1,000. "Score vs true uplift" is the Spearman rank correlation, over the policy\'s decisions '
        "after warm-up, of its raw score (before ranking) with the decision's true uplift.",
        "",
        "| policy | pushes / user | incremental / 1,000 pushes (95% CI) | previous | per seed | expected / 1,000 "
        "(previous) | conversions vs no pushes (95% CI) | opt-outs / 1,000 users (95% CI) (previous) | score vs true "
        "uplift (previous) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    pv = PREVIOUS if prev else None

    def was(key: str, p: str, digits: int = 1) -> str:
        if pv is None or p not in pv[key]:
            return "-"
        x = pv[key][p]
        return f"{_f(x[0], digits)}-{_f(x[1], digits)}" if isinstance(x, tuple) else _f(x, digits)

    for p in POLICIES:
        r = v.get(p)
        if r is None:
            continue
        if p == "none":
            lines.append(f"| none | 0 | - | - | - | {r['conversions']:.0f} conversions (baseline) | "
                         f"{r['opt_outs_per_1000_users']:.1f} | - |")  # fmt: skip
            continue
        lines.append(
            f"| {p} | {r['pushes_per_user']:.2f} | {_f(r['incremental_per_1000'])} {_ci(r['incremental_per_1000_ci'])} "
            f"| {was('incremental_per_1000', p)} {_ci(pv['incremental_per_1000_ci'][p]) if pv else ''} "
            f"| {', '.join(_f(x) for x in r['incremental_per_1000_by_seed'])} | {_f(r['true_uplift_per_1000'])} "
            f"({was('expected_per_1000', p)}) | "
            f"{100 * r['conversions_vs_none']:+.1f}% {_ci([100 * x for x in r['conversions_vs_none_ci']])} | "
            f"{r['opt_outs_per_1000_users']:.1f} {_ci(r['opt_outs_per_1000_users_ci'])} "
            f"({was('opt_outs_per_1000_users', p)}) | {_f(r['score_vs_true_uplift'], 3)} "
            f"({was('score_vs_true_uplift', p, 3)}) |"
        )
    lines += ["", "![policies](policies.png)", ""]
    if m:
        lines += [
            "## Propensity model against the ground truth",
            "",
            "The `propensity` policy's model (Bayesian logistic regression on the 26 features, all labels of the "
            "campaign; previous: River SGD logistic regression on 18 features: AUC 0.692 vs Bayes 0.798, 0.867 x), "
            "scored "
            "progressively: each label by the model version served when the label arrived, before the trainer "
            "learns it. Bayes-optimal: the same labels ranked by their true conversion probability (the best any "
            f"model can do on these outcomes). After warm-up (decisions from day {c['warmup_days']} on, model "
            f"warm): {m['labels_after_warmup']:,} labels, {m['positives_after_warmup']:,} conversions "
            f"(rate {_f(100 * m['base_rate'], 2)}%).",
            "",
            "| | ROC AUC | log loss |",
            "|---|---|---|",
            f"| model | {_f(m['auc'], 3)} | {_f(m['log_loss'], 4)} |",
            f"| true probabilities (Bayes-optimal) | {_f(m['bayes_auc'], 3)} | {_f(m['bayes_log_loss'], 4)} |",
            f"| ratio model / Bayes (per seed) | {_f(m['auc_ratio'], 3)} "
            f"({', '.join(_f(x, 3) for x in m['auc_ratio_by_seed'])}) | |",
            "",
            "Calibration after warm-up (deciles of the predicted probability):",
            "",
            "| labels | mean predicted | observed rate | mean true p |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {b['n']} | {b['predicted']:.4f} | {b['observed']:.4f} | {b['true']:.4f} |" for b in m["calibration"]
        ]
        lines += ["", "![propensity](propensity.png)", ""]
    if seg:
        lo, hi = seg["ari_final"][1], seg["ari_final"][2]
        lines += [
            "## Segments against the latent types",
            "",
            "Every user's segment under the current segment model, from the profile as of each simulated midnight. "
            f"Adjusted Rand index vs the latent types on the last day: {_f(seg['ari_final'][0], 3)} (per seed: "
            f"{', '.join(_f(x, 3) for x in seg['ari_final_by_seed'])}; normal 95% CI over seeds {_ci([lo, hi], 3)}). "
            "Stability, ARI of consecutive days' assignments over the last week: "
            f"{_f(seg['stability_last_week'][0], 3)}.",
            "",
            "![segments](segments.png)",
            "",
        ]
    if h:
        lines += [
            "## Holdout-based uplift estimate against the true uplift",
            "",
            "Among decisions after warm-up that the policy ranked into its push share: the conversion rate of "
            "pushed users minus that of holdout users (the product's measured uplift, restricted to whom the policy "
            "would push), with a 95% interval from a bootstrap over users (a holdout user contributes a label on "
            "every eligible click, so labels are clustered). True: the mean true uplift of those pushes. "
            "Holdout decisions are virtual pushes (same checks, same cooldown and caps), so this is what the trainer's "
            "`stream_app_uplift` measures.",
            "",
            "| policy | pushed labels | holdout labels | estimate (95% CI) | true uplift | CI contains truth |",
            "|---|---|---|---|---|---|",
        ]
        for p, r in h.items():
            contains = "yes" if r["contains"] else "no"
            lines.append(f"| {p} | {r['treated_labels']} | {r['holdout_labels']} | {r['estimate']:+.4f} "
                         f"{_ci(r['ci'], 4)} | {r['true_uplift']:+.4f} | {contains} |")  # fmt: skip
        lines += ["", "![uplift](uplift.png)", ""]
    if s["ope"]:
        lines += [
            "## Off-policy evaluation against the truth",
            "",
            "`core/ope.py` (also `stream-app ope` on a replay's or worker's audit and model-input records) on the "
            "random policy's log: its labelled pushes and holdouts (the holdout is randomised per user with a known "
            "share, 10%, so P(push) = 0.9 is exact for every decision). Target policies decide push or not for each "
            'logged decision from its features and segment; "uplift model" is the uplift policy\'s final model from '
            "another seed's run, pushing the logged decisions it scores above (or below) its median, scored as for "
            "users who never clicked a push (the holdout never receives pushes, so a policy keyed on push clicks "
            "has no randomised outcome to learn from: `without_push_responses`). Value: "
            "conversions per decision; uplift per push: (value - value of never pushing) / share pushed, x 1,000. "
            "True: the simulator's P(convert | push) and P(convert | no push) of the same decisions. 95% intervals: "
            "bootstrap over users.",
            "",
            "| seed | target policy | decisions | pushed share | IPS value (95% CI) | DR value (95% CI) | true value "
            "| IPS uplift / 1,000 pushes | DR uplift / 1,000 pushes | true uplift / 1,000 pushes | all CIs contain the "
            "truth |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in s["ope"]:
            k = 1000
            lines.append(
                f"| {r['seed']} | {r['policy']} | {r['decisions']} | {r['push_share']:.2f} | {r['ips']:.4f} "
                f"{_ci(r['ips_ci'], 4)} | {r['dr']:.4f} {_ci(r['dr_ci'], 4)} | {r['true_value']:.4f} | "
                f"{k * r['ips_uplift_per_push']:.1f} {_ci([k * x for x in r['ips_uplift_per_push_ci']])} | "
                f"{k * r['dr_uplift_per_push']:.1f} {_ci([k * x for x in r['dr_uplift_per_push_ci']])} | "
                f"{k * r['true_uplift_per_push']:.1f} | {'yes' if _ope_ok(r) else '**no**'} |"
            )
        lines.append("")
    d = ph["doc"]
    lines += [
        "## The propensity learner on a public dataset",
        "",
        f"River's bundled Phishing dataset ({ph['n']} websites, 9 features; shipped inside the `river` package, no "
        "download), progressive validation with `river.evaluate.progressive_val_score` (predict each sample, then "
        "learn it). `PropensityLearner` (the product's learner: Bayesian logistic regression with a full covariance, "
        "its defaults, on River's feature dicts as they come) scored through `PropensityScorer`, as the workers "
        "score, next to the setup River documents for the same protocol. (Previous: SGD logistic regression, "
        "90.08% accuracy, AUC 0.9537.)",
        "",
        "| model | accuracy | ROC AUC | log loss |",
        "|---|---|---|---|",
        f"| stream_app PropensityLearner | {100 * ph['ours']['accuracy']:.2f}% | {ph['ours']['roc_auc']:.4f} | "
        f"{ph['ours']['log_loss']:.4f} |",
        f"| River's documented setup, rerun here: `{d['model']}` | {100 * ph['documented_setup']['accuracy']:.2f}% "
        f"| {ph['documented_setup']['roc_auc']:.4f} | {ph['documented_setup']['log_loss']:.4f} |",
        f"| River's documented score | {100 * d['score']:.2f}% | | |",
        "",
        f'Source: {d["source"]}, {d["url"]} ("Accuracy: {100 * d["score"]:.2f}%"); River\'s README quickstart '
        f"({d['readme_url']}) reports {100 * d['readme_score']:.2f}% for the default `LogisticRegression()` with a "
        "hand-written progressive loop.",
        "",
        "## Runs",
        "",
        "| policy | seed | messages | seconds | pushes delivered | push conversions | opt-outs |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in s["runs"]:
        k = r["counts"]
        pushed, converted, opted = (k.get(x, 0) for x in ("pushes_delivered", "push_conversions", "opt_outs"))
        lines.append(f"| {r['policy']} | {r['seed']} | {r['events']:,} | {r['seconds']} | {pushed} | {converted} | "
                     f"{opted} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and math.isnan(x):
        return None
    return x
