import json
import random

from click.testing import CliRunner

from stream_app.cli import main
from stream_app.core.ope import LoggedDecision, evaluate_policy


def synthetic_log(seed: int, n_users: int = 1500) -> tuple[list[LoggedDecision], dict[str, float]]:
    """A 10% holdout per user (as the product's), four decisions per user, push effect 0.25 for users with a=1 and
    -0.05 for a=2 (annoyed), none for a=0; baseline conversion grows with b. Returns the log and the true values
    of pushing exactly the a=1 decisions."""
    rng, log = random.Random(seed), []
    p1_sum = p0_sum = pi_sum = 0.0
    for u in range(n_users):
        a, held = u % 3, rng.random() < 0.1
        for _ in range(4):
            b = rng.random()
            p0 = 0.05 + 0.1 * b
            p1 = min(max(p0 + {0: 0.0, 1: 0.25, 2: -0.05}[a], 0.0), 1.0)
            pi = float(a == 1)
            p1_sum += pi * p1 + (1 - pi) * p0
            p0_sum += pi * (p1 - p0)
            pi_sum += pi
            log.append(LoggedDecision(f"u{u}", not held, rng.random() < (p0 if held else p1), 0.9,
                                      {f"a{a}": 1.0, "b": b}))  # fmt: skip
    return log, {"value": p1_sum / len(log), "uplift_per_push": p0_sum / pi_sum}


def test_ips_and_doubly_robust_intervals_cover_the_true_value_and_dr_is_tighter():
    covered = {"ips": 0, "dr": 0, "ips_value": 0, "dr_value": 0}
    widths = {"ips": [], "dr": []}
    for seed in range(6):
        log, truth = synthetic_log(seed)
        r = evaluate_policy(log, lambda x: x.get("a1", 0.0), reps=300, seed=seed)
        for k in ("ips", "dr"):
            lo, hi = r[f"{k}_uplift_per_push_ci"]
            covered[k] += lo <= truth["uplift_per_push"] <= hi
            widths[k].append(hi - lo)
            vlo, vhi = r[f"{k}_ci"]
            covered[f"{k}_value"] += vlo <= truth["value"] <= vhi
        assert abs(r["push_share"] - 1 / 3) < 0.01
    assert all(n >= 5 for n in covered.values()), covered  # 95% intervals: at most one miss in six
    assert sum(widths["dr"]) < sum(widths["ips"])  # the outcome models remove part of the noise


def test_ope_command_reads_a_replays_records(tmp_path):
    import orjson

    from stream_app.replay import replay
    from stream_app.settings import Settings
    from stream_app.sim.simulator import SimConfig, Simulator

    lines = [orjson.dumps(e) for e in Simulator(SimConfig(users=300, days=10, seed=3), deliver=False)]
    paths = replay(lines, Settings()).write(tmp_path)
    runner = CliRunner()
    out = {}
    for policy in ("all", "none"):
        args = ["ope", "--audit", str(paths["audit"]), "--labels", str(paths["model_inputs"]),
                "--campaign", "cart_abandonment", "--policy", policy]  # fmt: skip
        res = runner.invoke(main, args, catch_exceptions=False)
        assert res.exit_code == 0, res.output
        out[policy] = json.loads(res.output)
    assert out["all"]["push_share"] == 1.0 and out["none"]["push_share"] == 0.0
    assert out["none"]["dr_uplift_per_push"] is None  # no pushes: no uplift per push
    assert out["all"]["holdout_share"] == 0.1 and out["all"]["decisions"] > 50
    # open loop: nobody reacts to pushes, so pushing all and none reach the same rate within the intervals
    lo, hi = out["all"]["dr_uplift_per_push_ci"]
    assert lo <= 0 <= hi
    res = runner.invoke(main, ["ope", "--audit", str(paths["audit"]), "--labels", str(paths["model_inputs"]),
                               "--campaign", "nope", "--holdout-share", "0.1"])  # fmt: skip
    assert res.exit_code != 0 and "needs labelled pushes and holdouts" in res.output
