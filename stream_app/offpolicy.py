"""``stream-app ope``: off-policy evaluation of a targeting policy from the records a deployment already keeps.

Reads the ``decision-audit`` records (for each decision its user) and the ``model-inputs`` labels (outcome,
features, segment, push or holdout) as JSON lines (a replay's ``audit.jsonl`` and ``model-inputs.jsonl``, or
topic dumps), joins them on ``decision_id`` and estimates, with ``core/ope.py`` (IPS and doubly robust, user
bootstrap), what a target policy would reach on the labelled decisions of one campaign: push every one
(``all``), none (``none``), or those an uplift model (a published ``uplift:<campaign>`` version, from
``model-params.jsonl`` or a JSON file of its params) scores at or above ``threshold``. The features are
read as for a user who never clicked a push (``without_push_responses``): the log's randomisation is the holdout,
and no holdout user ever clicked a push, so how those users would fare is not in the log (a policy keyed on push
clicks cannot be evaluated from it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import orjson

from stream_app.core.features import feature_dict, without_push_responses
from stream_app.core.ope import LoggedDecision, evaluate_policy
from stream_app.core.uplift import UpliftScorer


def read_json_lines(path: Path) -> Iterable[dict[str, Any]]:
    with open(path, "rb") as f:
        for line in f:
            line = line.strip()
            if line:
                yield orjson.loads(line)


def load_log(audit: Iterable[dict[str, Any]], labels: Iterable[dict[str, Any]], campaign: str,
             holdout_share: float) -> list[LoggedDecision]:  # fmt: skip
    """The campaign's labelled push and holdout decisions, in label order, with their users."""
    users = {d["decision_id"]: d["user_id"] for d in audit if d.get("campaign") == campaign}
    log = []
    for r in labels:
        if r.get("kind") != "label" or r.get("campaign") != campaign or r["decision_id"] not in users:
            continue
        log.append(LoggedDecision(users[r["decision_id"]], r["action"] == "push", bool(r["converted"]),
                                  1 - holdout_share,
                                  without_push_responses(feature_dict(r["features"], int(r["segment"])))))  # fmt: skip
    return log


def uplift_model(path: Path, campaign: str) -> UpliftScorer:
    """The last ``uplift:<campaign>`` version in a model-params file (replay's ``{key, params}`` lines), or a JSON
    file holding one version's params."""
    text = path.read_bytes().strip()
    if text.startswith(b"{") and b"\n" not in text:
        return UpliftScorer.from_params(orjson.loads(text))
    last = None
    for rec in read_json_lines(path):
        if rec.get("key") == f"uplift:{campaign}":
            last = rec["params"]
    if last is None:
        raise ValueError(f"{path}: no uplift:{campaign} model version")
    return UpliftScorer.from_params(last)


def target_policy(kind: str, model: UpliftScorer | None, threshold: float) -> Callable[[Mapping[str, float]], float]:
    if kind == "all":
        return lambda x: 1.0
    if kind == "none":
        return lambda x: 0.0
    if model is None:
        raise ValueError("--policy model needs --model")
    return lambda x: float(model.predict_uplift_one(x) >= threshold)


def run(audit: Path, labels: Path, campaign: str, holdout_share: float, kind: str, model: Path | None,
        threshold: float, reps: int = 500) -> dict[str, Any]:  # fmt: skip
    log = load_log(read_json_lines(audit), read_json_lines(labels), campaign, holdout_share)
    if not any(not d.treated for d in log) or not any(d.treated for d in log):
        raise ValueError(f"campaign {campaign}: the log needs labelled pushes and holdouts ({len(log)} labels)")
    scorer = uplift_model(model, campaign) if model is not None else None
    est = evaluate_policy(log, target_policy(kind, scorer, threshold), reps=reps)
    return {"campaign": campaign, "policy": kind, "threshold": threshold if kind == "model" else None,
            "holdout_share": holdout_share, **{k: _json_number(v) for k, v in est.items()}}  # fmt: skip


def _json_number(v: Any) -> Any:
    """NaN (no push in the target policy: no uplift per push) as null, so the output stays valid JSON."""
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, tuple):
        return [_json_number(x) for x in v]
    return v
