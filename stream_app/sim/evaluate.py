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
    return run(policy, sim, cfg.push_rate, segments_every_day=policy == "propensity")


def run_all(cfg: EvalConfig) -> list[RunResult]:
    order = {"none": 4, "random": 1, "propensity": 0, "uplift": 2, "oracle": 3}  # slowest first, the baseline last
    tasks = sorted(((p, s, cfg) for s in cfg.seeds for p in POLICIES), key=lambda t: (order[t[0]], t[1]))
    if cfg.workers <= 1:
        return [_task(t) for t in tasks]
    with ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_task, tasks))


# -- measures ------------------------------------------------------------------------------------------
def volume_and_outcomes(results: list[RunResult], cfg: EvalConfig) -> dict[str, dict[str, Any]]:
    """Per policy: pushes, opt-outs, conversions, incremental conversions per 1,000 pushes (with CIs)."""
    none = {r.seed: r for r in results if r.policy == "none"}
    out: dict[str, dict[str, Any]] = {}
    for policy in POLICIES:
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


def validate_phishing() -> dict[str, Any]:
    """Progressive validation of ``PropensityLearner`` on River's bundled Phishing dataset (no download)."""
    from river import base, datasets, evaluate, linear_model, metrics, optim, preprocessing

    from stream_app.core.features import FEATURE_NAMES
    from stream_app.core.propensity import PropensityLearner, PropensityScorer

    class Adapter(base.Classifier):
        """The product's learner behind River's classifier API. The dataset's 9 features fill the first 9 of
        the 18 slots; the others stay 0 (zero variance: the learner's scaler leaves them out of the score)."""

        def __init__(self) -> None:
            self.learner = PropensityLearner("phishing", prior=0.5, min_labels=1)
            self.names: list[str] = []

        def _vec(self, x: dict) -> list[float]:
            if not self.names:
                self.names = sorted(x)
            v = [float(x.get(n, 0.0)) for n in self.names]
            return v + [0.0] * (len(FEATURE_NAMES) - len(v))

        def learn_one(self, x: dict, y: bool) -> None:
            self.learner.learn_one(self._vec(x), bool(y))

        def predict_proba_one(self, x: dict) -> dict[bool, float]:
            p = PropensityScorer.from_params(self.learner.to_params()).predict_one(self._vec(x))
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


def targets(s: dict[str, Any]) -> list[dict[str, Any]]:
    v, m, seg, h = s["volume"], s["model"], s["segments"], s["holdout"]
    up, rnd, prop = (v.get(p, {}).get("incremental_per_1000", math.nan) for p in ("uplift", "random", "propensity"))
    ratio = up / rnd if rnd and rnd > 0 else math.nan
    ari = seg.get("ari_final", (math.nan,))[0]
    auc_ratio = m.get("auc_ratio", math.nan)
    opt_up, opt_rnd = (v.get(p, {}).get("opt_outs_per_1000_users", math.nan) for p in ("uplift", "random"))
    hu = h.get("uplift", {})
    return [
        {"target": "propensity ROC AUC >= 0.95 x Bayes-optimal AUC after warm-up",
         "measured": f"{m.get('auc', math.nan):.3f} / {m.get('bayes_auc', math.nan):.3f} = {auc_ratio:.3f} x",
         "met": bool(auc_ratio >= 0.95)},
        {"target": "segment recovery ARI >= 0.7", "measured": f"ARI {ari:.3f} (final day, mean of seeds)",
         "met": bool(ari >= 0.7)},
        {"target": "uplift >= 2 x random incremental conversions per 1,000 pushes",
         "measured": f"{up:.1f} vs {rnd:.1f} per 1,000 pushes = {ratio:.2f} x", "met": bool(ratio >= 2)},
        {"target": "uplift above propensity targeting", "measured": f"{up:.1f} vs {prop:.1f} per 1,000 pushes",
         "met": bool(up > prop)},
        {"target": "uplift opt-outs no more than random", "measured": f"{opt_up:.1f} vs {opt_rnd:.1f} per 1,000 users",
         "met": bool(opt_up <= opt_rnd)},
        {"target": "holdout uplift 95% CI contains the true uplift (uplift policy)",
         "measured": f"estimate {_est(hu)}; true {hu.get('true_uplift', math.nan):+.4f}",
         "met": bool(hu.get("contains", False))},
    ]  # fmt: skip


def _est(r: dict[str, Any]) -> str:
    ci = r.get("ci", (math.nan, math.nan))
    return f"{r.get('estimate', math.nan):+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}]"


def _overlap(v: dict[str, Any], a: str, b: str) -> bool:
    ca, cb = (v.get(p, {}).get("incremental_per_1000_ci", (math.nan, math.nan)) for p in (a, b))
    return bool(ca[0] <= cb[1] and cb[0] <= ca[1])


def why(s: dict[str, Any]) -> list[str]:
    """Why each target was met or missed: the mechanism, with the numbers that show it."""
    v, m, seg, h = s["volume"], s["model"], s["segments"], s["holdout"]
    t = [x["met"] for x in s["targets"]]
    rho = {p: v.get(p, {}).get("score_vs_true_uplift", math.nan) for p in LEARNED}
    top = m.get("calibration", [{}])[-1] if m.get("calibration") else {}
    stab = seg.get("stability_last_week", (math.nan,))[0]
    prop = h.get("propensity", {})
    vol = {p: v.get(p, {}).get("incremental_per_1000", math.nan) for p in ("random", "oracle")}
    return [
        ("the linear model reaches it" if t[0] else
         "a user's true rate comes from latent traits (type, a log-normal multiplier, the response class) that a "
         "linear model on 18 profile features sees only through a few weeks of sparse behaviour (about one payment "
         f"per user-month); it also over-predicts its top decile ({_f(top.get('predicted', math.nan), 3)} "
         f"predicted, {_f(top.get('observed', math.nan), 3)} observed, {_f(top.get('true', math.nan), 3)} true)"),
        (f"segments match the types (k-means on user traits; day-to-day stability ARI {_f(stab, 2)})" if t[1] else
         "the segments (k-means on user traits) split or merge types; day-to-day stability of the assignment: "
         f"ARI {_f(stab, 2)}"),
        ("the learned uplift ranks persuadable users first" if t[2] else
         "the uplift score (the segment's pushed-minus-holdout conversion rate, the treated-minus-control models "
         "within a segment) rests on few holdout labels (10% holdout: about a tenth of the pushes' labels, split "
         "over the segments), whose noise is as large as the differences between segments; its rank correlation "
         f"with the true uplift is {_f(rho['uplift'], 3)} (random {_f(rho['random'], 3)}, oracle "
         f"{_f(rho['oracle'], 3)}); even the oracle reaches {_f(vol['oracle'] / vol['random'], 2)} x random here"),
        ("propensity targets likely buyers (sure things), whose pushes add little; rank correlation of its score "
         f"with the true uplift {_f(rho['propensity'], 3)}" + (
             "; but the 95% intervals overlap: the difference is not significant" if _overlap(v, "uplift", "propensity")
             else "") if t[3] else
         f"neither learned score tracks the true uplift (rank correlation: uplift {_f(rho['uplift'], 3)}, "
         f"propensity {_f(rho['propensity'], 3)}), so their difference is noise"),
        ("annoyed users' pushes are not favoured" if t[4] else
         "the uplift score does not steer away from annoyed users better than chance"),
        ("a holdout decision is a push withheld after every check a push passes, recorded as a virtual push "
         "(spaced by the same cooldown and caps), so the two arms compare like with like" if t[5] else
         "the would-push holdout group differs from the pushed one: holdout users are never pushed, so their "
         "features (hours since push, pushes in 24 h) differ")
        + (f"; the propensity policy's estimate misses ({_f(prop.get('estimate', math.nan), 4)} vs "
           f"{_f(prop.get('true_uplift', math.nan), 4)}): its score uses the push-history features that differ "
           "most between the arms" if prop and not prop.get("contains", True) else ""),
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
        "| target | measured | met | why |",
        "|---|---|---|---|",
    ]
    lines += [f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else '**no**'} | {w} |"
              for t, w in zip(s["targets"], why(s), strict=True)]  # fmt: skip
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
        "| policy | pushes / user | incremental / 1,000 pushes (95% CI) | per seed | expected / 1,000 | "
        "conversions vs no pushes (95% CI) | opt-outs / 1,000 users (95% CI) | score vs true uplift |",
        "|---|---|---|---|---|---|---|---|",
    ]
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
            f"| {', '.join(_f(x) for x in r['incremental_per_1000_by_seed'])} | {_f(r['true_uplift_per_1000'])} | "
            f"{100 * r['conversions_vs_none']:+.1f}% {_ci([100 * x for x in r['conversions_vs_none_ci']])} | "
            f"{r['opt_outs_per_1000_users']:.1f} {_ci(r['opt_outs_per_1000_users_ci'])} | "
            f"{_f(r['score_vs_true_uplift'], 3)} |"
        )
    lines += ["", "![policies](policies.png)", ""]
    if m:
        lines += [
            "## Propensity model against the ground truth",
            "",
            "The `propensity` policy's model (River logistic regression on all labels of the campaign), scored "
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
    d = ph["doc"]
    lines += [
        "## The propensity learner on a public dataset",
        "",
        f"River's bundled Phishing dataset ({ph['n']} websites, 9 features; shipped inside the `river` package, no "
        "download), progressive validation with `river.evaluate.progressive_val_score` (predict each sample, then "
        "learn it). `PropensityLearner` (the product's learner: running standardizer + River `LogisticRegression`, "
        "SGD lr 0.02, L2 1e-4) scored through `PropensityScorer`, as the workers score, next to the setup River "
        "documents for the same protocol.",
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
