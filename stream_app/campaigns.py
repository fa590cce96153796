"""The campaign config file: read and validated at start-up, converted to core types at the boundary.

pydantic gives precise, located error messages ("campaigns.1.cooldown: ...") for free; the core keeps its
own small frozen dataclasses and never sees the file format. Durations are written "90s", "30m", "4h",
"7d" (or seconds as a number). Eligibility rules are written in natural units, "hours_since_payment >= 24",
"clicks >= 3", and mapped to the log-compressed features exactly (log1p is monotone).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Literal

import orjson
import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from stream_app.core.events import EVENT_TYPES
from stream_app.core.features import INDEX
from stream_app.core.policy import LAPSE, Campaign, Guardrails, Rule

DEFAULT_CONFIG = Path(__file__).with_name("campaigns.default.yaml")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_RULE = re.compile(r"^\s*([a-z_0-9]+)\s*(<=|>=|==|!=|<|>)\s*(-?[0-9.]+)\s*$")


class CampaignConfigError(ValueError):
    """The campaign file is invalid; the message names the file, the place and the problem."""


def _seconds(v: object) -> object:
    if isinstance(v, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", v)
        if not m:
            raise ValueError(f"duration {v!r} must look like 90s, 30m, 4h or 7d")
        return float(m.group(1)) * _UNITS[m.group(2)]
    return v


Duration = Annotated[float, BeforeValidator(_seconds), Field(ge=0)]


def parse_rule(text: str) -> Rule:
    """``"hours_since_payment >= 24"`` -> a rule on the log feature with the value mapped alike.

    >>> r = parse_rule("hours_since_payment >= 24")
    >>> r.feature, round(r.value, 4), str(r)
    ('log_hours_since_payment', 3.2189, 'hours_since_payment>=24')
    """
    m = _RULE.match(text)
    if not m:
        raise ValueError(f"rule {text!r} must look like 'feature >= number'")
    name, op, raw = m.group(1), m.group(2), float(m.group(3))
    label = f"{name}{op}{raw:g}"
    if name in INDEX:
        return Rule(name, op, raw, label)
    if f"log_{name}" in INDEX:
        if raw < 0:
            raise ValueError(f"rule {text!r}: {name} is never negative")
        return Rule(f"log_{name}", op, math.log1p(raw), label)
    known = sorted({n.removeprefix("log_") for n in INDEX})
    raise ValueError(f"rule {text!r}: unknown feature {name!r}; known: {', '.join(known)}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class QuietHours(_Strict):
    start: int = Field(22, ge=0, le=23)
    end: int = Field(8, ge=0, le=23)
    mode: Literal["hold", "drop"] = "hold"
    send_at: Literal["end", "active_hour"] = "end"  # hold: at the end of quiet hours, or the user's most active hour


class GuardrailsConfig(_Strict):
    max_pushes_24h: int = Field(2, ge=0)
    min_gap: Duration = 4 * 3600
    quiet_hours: QuietHours = QuietHours()
    decision_ttl: Duration = 12 * 3600


class CampaignConfig(_Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,40}$")
    triggers: list[str] = Field(min_length=1)
    priority: int = 0
    eligibility: list[str] = []
    segments: list[int] = []
    attribution_window: Duration = 24 * 3600
    threshold: float = Field(0.05, ge=0, le=1)
    cooldown: Duration = 72 * 3600
    holdout_share: float = Field(0.1, ge=0, le=1)
    exploration_share: float = Field(0.05, ge=0, le=1)
    cold_start_share: float = Field(0.3, ge=0, le=1)
    lapse_after: Duration = 7 * 86400
    prior: float = Field(0.02, gt=0, lt=1)
    min_labels: int = Field(200, ge=1)
    mode: Literal["propensity", "uplift"] = "propensity"

    @field_validator("triggers")
    @classmethod
    def _known_triggers(cls, v: list[str]) -> list[str]:
        bad = [t for t in v if t not in (*EVENT_TYPES, LAPSE)]
        if bad:
            raise ValueError(f"unknown trigger(s) {bad}; use {', '.join((*EVENT_TYPES, LAPSE))}")
        return v

    @field_validator("eligibility")
    @classmethod
    def _rules_parse(cls, v: list[str]) -> list[str]:
        for text in v:
            parse_rule(text)
        return v


class CampaignFile(_Strict):
    guardrails: GuardrailsConfig = GuardrailsConfig()
    campaigns: list[CampaignConfig] = Field(min_length=1)

    @field_validator("campaigns")
    @classmethod
    def _unique_names(cls, v: list[CampaignConfig]) -> list[CampaignConfig]:
        names = [c.name for c in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"campaign names must be unique; repeated: {dupes}")
        return v


def load_campaigns(path: str | Path | None = None) -> tuple[tuple[Campaign, ...], Guardrails]:
    """Read, validate and convert a YAML or JSON campaign file (the shipped default if ``path`` is None)."""
    path = Path(path) if path else DEFAULT_CONFIG
    try:
        text = path.read_bytes()
        data = orjson.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        cfg = CampaignFile.model_validate(data)
    except OSError as e:
        raise CampaignConfigError(f"{path}: cannot read campaign file: {e.strerror}") from None
    except (yaml.YAMLError, orjson.JSONDecodeError) as e:
        raise CampaignConfigError(f"{path}: not valid YAML/JSON: {e}") from None
    except ValidationError as e:
        lines = [f"  {'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
        raise CampaignConfigError(f"{path}: invalid campaign config:\n" + "\n".join(lines)) from None
    ms = 1000
    g = cfg.guardrails
    guardrails = Guardrails(
        max_pushes_24h=g.max_pushes_24h, min_gap_ms=int(g.min_gap * ms), quiet_start_hour=g.quiet_hours.start,
        quiet_end_hour=g.quiet_hours.end, quiet_mode=g.quiet_hours.mode,
        quiet_send_at=g.quiet_hours.send_at, decision_ttl_ms=int(g.decision_ttl * ms),
    )  # fmt: skip
    campaigns = tuple(
        Campaign(
            name=c.name,
            triggers=tuple(c.triggers),
            priority=c.priority,
            eligibility=tuple(parse_rule(r) for r in c.eligibility),
            segments=tuple(c.segments),
            attribution_window_ms=int(c.attribution_window * ms),
            threshold=c.threshold,
            cooldown_ms=int(c.cooldown * ms),
            holdout_share=c.holdout_share,
            exploration_share=c.exploration_share,
            cold_start_share=c.cold_start_share,
            lapse_after_ms=int(c.lapse_after * ms),
            prior=c.prior,
            min_labels=c.min_labels,
            mode=c.mode,
        )
        for c in cfg.campaigns
    )
    return campaigns, guardrails
