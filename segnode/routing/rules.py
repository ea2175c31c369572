"""Typed routing rules: which model(s) a series goes to, decided by conditions a person can read,
test and explain, never by expressions evaluated as code.

A rule file is YAML:

    mode: first            # first: the first matching rule decides; every: all matching rules apply
    rules:
      - name: ct-abdomen
        match:
          all:
            - {attribute: Modality, equals: CT}
            - {attribute: BodyPartExamined, in: [ABDOMEN, ABDOMENPELVIS]}
            - {series: dimensions, equals: 3}
        action: {models: [ct-abdomen-phantom-3d], destinations: [pacs], priority: 5}
      - name: everything-else
        match: {always: true}
        action: ignore

A condition tests one value - a DICOM attribute by keyword, the sender (`ae_title`, `ip`) or the
series (`instances`, `dimensions`) - with exactly one operator: equals, in, regex, range, exists,
contains (multi-valued attributes such as ImageType) or network (CIDR, for ip); conditions combine
with all / any / not. Everything is validated when the file is loaded.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator,
                      model_validator)
from pydicom.datadict import tag_for_keyword

from segnode import strict_yaml
from segnode.errors import ConfigurationError

DEFAULT_RULES = Path(__file__).with_name("default.yaml")
OPERATORS = ("equals", "in", "regex", "range", "exists", "contains", "network")


class RulesError(ConfigurationError, ValueError):
    """A rule file that cannot be used; the message names the rule and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Range(_Strict):
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _bounded(self) -> "Range":
        if self.min is None and self.max is None:
            raise ValueError("a range needs min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        return self


class Condition(_Strict):
    """One test of one value."""

    attribute: str | None = None  # a DICOM keyword, e.g. Modality
    sender: Literal["ae_title", "ip"] | None = None
    series: Literal["instances", "dimensions"] | None = None
    equals: str | int | float | None = None
    in_: list[str | int | float] | None = Field(None, alias="in")
    regex: str | None = None
    range: Range | None = None
    exists: bool | None = None
    contains: str | None = None
    network: list[str] | None = None

    @field_validator("attribute")
    @classmethod
    def _keyword(cls, v: str | None) -> str | None:
        if v is not None and tag_for_keyword(v) is None:
            raise ValueError(f"unknown DICOM keyword {v!r} (keywords are spelt as in PS3.6, e.g. SeriesDescription)")
        return v

    @field_validator("regex")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {v!r}: {exc}") from exc
        return v

    @field_validator("network")
    @classmethod
    def _networks(cls, v: list[str] | None) -> list[str] | None:
        for net in v or []:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError as exc:
                raise ValueError(f"invalid network {net!r}: {exc}") from exc
        return v

    @model_validator(mode="after")
    def _one_subject_one_operator(self) -> "Condition":
        subjects = [s for s in ("attribute", "sender", "series") if getattr(self, s) is not None]
        if len(subjects) != 1:
            raise ValueError("a condition tests exactly one of: attribute, sender, series")
        ops = [op for op in OPERATORS if getattr(self, "in_" if op == "in" else op) is not None]
        if len(ops) != 1:
            raise ValueError(f"a condition has exactly one operator of {', '.join(OPERATORS)}; found "
                             f"{', '.join(ops) or 'none'}")
        if self.network is not None and self.sender != "ip":
            raise ValueError("network applies to {sender: ip} only")
        return self

    @property
    def subject(self) -> str:
        if self.attribute:
            return self.attribute
        return f"sender.{self.sender}" if self.sender else f"series.{self.series}"

    @property
    def operator(self) -> str:
        return next(op for op in OPERATORS if getattr(self, "in_" if op == "in" else op) is not None)


class All(_Strict):
    all: list["Match"]


class Any_(_Strict):
    any: list["Match"]


class Not(_Strict):
    not_: "Match" = Field(alias="not")


class Always(_Strict):
    always: Literal[True]


def _kind(value: Any) -> str:
    """Which branch a match is, by its key, so that an error speaks of that branch only."""
    if isinstance(value, dict):
        for key, tag in (("all", "All"), ("any", "Any"), ("not", "Not"), ("always", "Always")):
            if key in value:
                return tag
    elif isinstance(value, BaseModel):
        tags: dict[type[BaseModel], str] = {All: "All", Any_: "Any", Not: "Not", Always: "Always"}
        return tags.get(type(value), "Condition")
    return "Condition"


Match = Annotated[Union[Annotated[All, Tag("All")], Annotated[Any_, Tag("Any")], Annotated[Not, Tag("Not")],
                        Annotated[Always, Tag("Always")], Annotated[Condition, Tag("Condition")]],
                  Discriminator(_kind)]
All.model_rebuild()
Any_.model_rebuild()
Not.model_rebuild()


class Action(_Strict):
    models: list[str] = Field(min_length=1)
    destinations: list[str] = Field(default_factory=list)
    priority: int = 0
    expected_instances: int | None = Field(None, ge=1, description="complete the series as soon as it has this many")
    assume_pixel_spacing_mm: float | None = Field(
        None, gt=0, le=10, description="for images that state no pixel spacing: segment them as if it were this, "
        "instead of refusing them; recorded in segmentation.json, the audit trail and the SR, never written into "
        "the SEG as measured geometry")


class Rule(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    match: Match
    action: Action | Literal["ignore"]


class RuleSet(_Strict):
    mode: Literal["first", "every"]
    rules: list[Rule] = Field(min_length=1)
    sha256: str = ""  # of the rule text as UTF-8 (parse_rules); goes into every routing decision's audit event

    @model_validator(mode="after")
    def _unique(self) -> "RuleSet":
        names = [r.name for r in self.rules]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"rule names must be unique: {', '.join(dup)}")
        return self


def _where(loc: tuple[Any, ...], raw: dict[str, Any]) -> str:
    """'rule "ct-abdomen", field match.all.0.attribute' from a pydantic error location."""
    if len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int):
        rules = raw.get("rules") or []
        name = rules[loc[1]].get("name") if loc[1] < len(rules) and isinstance(rules[loc[1]], dict) else None
        # union branches (All, Condition, ...) appear as names in the location; they are not fields
        path = ".".join(str(p) for p in loc[2:] if not (isinstance(p, str) and p[:1].isupper()))
        return f"rule {name or '#' + str(loc[1] + 1)!r}, field {path or '(the rule)'}"
    return "field " + ".".join(str(p) for p in loc)


def parse_rules(text: str, source: str = "<rules>", models: Iterable[str] | None = None,
                destinations: Iterable[str] | None = None) -> RuleSet:
    """Validate a rule file; unknown models/destinations are errors when the known ones are given.

    Args:
        text: the YAML (see the module docstring).
        source: what error messages call it (the file's path).
        models: installed model names; None: not checked.
        destinations: configured destination names; None: not checked.

    Returns:
        The rule set, its `sha256` the hex SHA-256 of `text` encoded as UTF-8 (recorded with every
        routing decision, so a decision names the exact rules that made it).

    Raises:
        RulesError: invalid YAML, a schema violation (the message names the rule and the field; the
            three most specific complaints), or an unknown model or destination.
    """
    try:
        raw = strict_yaml.load(text)
    except yaml.YAMLError as exc:
        raise RulesError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise RulesError(f"{source}: expected a mapping with 'mode' and 'rules'")
    try:
        ruleset = RuleSet.model_validate(raw)
    except ValidationError as exc:
        # a union reports every branch's complaint; the most specific (deepest) one is the useful one
        errors = sorted(exc.errors(), key=lambda e: -len(e["loc"]))
        lines = []
        for err in errors:
            msg = f"unknown key {err['loc'][-1]!r}" if err["type"] == "extra_forbidden" else err["msg"]
            line = f"{_where(tuple(err['loc'][:-1] if err['type'] == 'extra_forbidden' else err['loc']), raw)}: {msg}"
            if line not in lines:
                lines.append(line)
        raise RulesError(f"{source}: " + "; ".join(lines[:3])) from exc
    known_models = set(models) if models is not None else None
    known_dest = set(destinations) if destinations is not None else None
    for rule in ruleset.rules:
        if isinstance(rule.action, Action):
            for model in rule.action.models:
                if known_models is not None and model not in known_models:
                    raise RulesError(f"{source}: rule {rule.name!r}, field action.models: unknown model {model!r} "
                                     f"(installed: {', '.join(sorted(known_models)) or 'none'})")
            for dest in rule.action.destinations:
                if known_dest is not None and dest not in known_dest:
                    raise RulesError(f"{source}: rule {rule.name!r}, field action.destinations: unknown destination "
                                     f"{dest!r} (configured: {', '.join(sorted(known_dest)) or 'none'}; destinations "
                                     f"come from the node's configuration: pass its --config)")
    return ruleset.model_copy(update={"sha256": hashlib.sha256(text.encode()).hexdigest()})


def load_rules(path: Path | None = None, models: Iterable[str] | None = None,
               destinations: Iterable[str] | None = None) -> RuleSet:
    """`parse_rules` over a file: `path`, or the shipped default.yaml when None.

    The file is read as text (locale encoding, universal newlines), so `sha256` is of the decoded
    text: it equals the file's own sha256 only for UTF-8 files with LF line endings.

    Raises:
        RulesError: the file cannot be read, or as `parse_rules`.
    """
    path = path or DEFAULT_RULES
    try:
        text = path.read_text()
    except OSError as exc:
        raise RulesError(f"cannot read the rule file {path}: {exc}") from exc
    return parse_rules(text, str(path), models, destinations)


# -- evaluation ----------------------------------------------------------------------------------
@dataclass
class Facts:
    """What rules can see about one series (see segnode.routing.facts for how it is gathered).

    `ae_title` and `ip` are the sender's, None when unknown (then a sender condition sees it absent).
    """

    attributes: dict[str, Any]  # keyword -> value, from a representative instance
    instances: int
    dimensions: int  # 2: single images (DX, CR, a lone slice); 3: a stack or a multi-frame volume
    ae_title: str | None = None
    ip: str | None = None

    def value(self, cond: Condition) -> tuple[bool, Any]:
        """(present, value) of what the condition tests; an attribute that is missing, None or "" is
        absent, series counts are always present."""
        if cond.attribute:
            v = self.attributes.get(cond.attribute)
            return (v is not None and v != ""), v
        if cond.sender:
            v = self.ae_title if cond.sender == "ae_title" else self.ip
            return v is not None, v
        return True, self.instances if cond.series == "instances" else self.dimensions


@dataclass
class Outcome:
    """A condition's (or combinator's) result with the value seen and why."""

    passed: bool
    what: str
    seen: Any = None
    why: str = ""
    children: list["Outcome"] = field(default_factory=list)

    def lines(self, depth: int = 0) -> list[str]:
        mark = "pass" if self.passed else "FAIL"
        seen = "" if self.seen is None and not self.why else f" (seen {self.seen!r}: {self.why})"
        out = [f"{'  ' * depth}{mark} {self.what}{seen}"]
        for child in self.children:
            out.extend(child.lines(depth + 1))
        return out


def _values(v: Any) -> list[Any]:
    if isinstance(v, (list, tuple)) or (hasattr(v, "__iter__") and not isinstance(v, (str, bytes))):
        return list(v)
    return [v]


def _same(seen: Any, wanted: str | int | float) -> bool:
    if isinstance(wanted, (int, float)) and not isinstance(wanted, bool):
        try:
            return float(seen) == float(wanted)
        except (TypeError, ValueError):
            return False
    return str(seen).strip() == str(wanted)


def _test(cond: Condition, facts: Facts) -> Outcome:
    op = cond.operator
    present, seen = facts.value(cond)
    shown = [str(x) for x in _values(seen)] if present and not isinstance(seen, (str, int, float)) else seen
    what = f"{cond.subject} {op} {getattr(cond, 'in_' if op == 'in' else op)!r}"
    if op == "exists":
        return Outcome(present == cond.exists, what, shown, "present" if present else "absent")
    if not present:
        return Outcome(False, what, None, "absent")
    if op == "equals":
        ok = _same(seen, cond.equals)  # type: ignore[arg-type]
        return Outcome(ok, what, shown, "equal" if ok else "different")
    if op == "in":
        ok = any(_same(seen, w) for w in cond.in_ or [])
        return Outcome(ok, what, shown, "in the list" if ok else "not in the list")
    if op == "regex":
        ok = re.search(cond.regex or "", str(seen)) is not None
        return Outcome(ok, what, shown, "matches" if ok else "does not match")
    if op == "contains":
        ok = any(str(x).strip() == cond.contains for x in _values(seen))
        return Outcome(ok, what, shown, "contained" if ok else "not among the values")
    if op == "range":
        assert cond.range is not None
        try:
            number = float(seen)
        except (TypeError, ValueError):
            return Outcome(False, what, shown, "not a number")
        low_ok = cond.range.min is None or number >= cond.range.min
        high_ok = cond.range.max is None or number <= cond.range.max
        why = "within" if low_ok and high_ok else ("below the minimum" if not low_ok else "above the maximum")
        return Outcome(low_ok and high_ok, what, shown, why)
    try:  # network
        address = ipaddress.ip_address(str(seen))
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        ok = any(address in ipaddress.ip_network(n, strict=False) for n in cond.network or [])
    except ValueError:
        return Outcome(False, what, shown, "not an IP address")
    return Outcome(ok, what, shown, "inside" if ok else "outside")


def evaluate(match: Match, facts: Facts) -> Outcome:
    """Every condition is evaluated (no short cut), so an explanation shows all of them.

    Conditions compare as text (stripped) unless the rule's value is a number (then numerically);
    `regex` searches anywhere in the text of the value; `contains` tests one of a multi-valued
    attribute's values; `range` bounds are inclusive; `network` accepts IPv4-mapped IPv6 senders. A
    condition on an absent value fails (except `exists: false`).

    Returns:
        The tree of outcomes: pass/fail, the value seen and why, for `Decision.explain`.
    """
    if isinstance(match, Always):
        return Outcome(True, "always")
    if isinstance(match, Condition):
        return _test(match, facts)
    if isinstance(match, Not):
        inner = evaluate(match.not_, facts)
        return Outcome(not inner.passed, "not", children=[inner])
    parts = [evaluate(m, facts) for m in (match.all if isinstance(match, All) else match.any)]
    if isinstance(match, All):
        return Outcome(all(p.passed for p in parts), "all of", children=parts)
    return Outcome(any(p.passed for p in parts), "any of", children=parts)


@dataclass
class Decision:
    """Which rules matched a series and what follows from them.

    Attributes:
        outcomes: every rule with its evaluation, in file order.
        applied: the rules that decide (first match, or every match); may be empty.
        ruleset_sha256: the rule set's hash, for the record.
    """

    outcomes: list[tuple[Rule, Outcome]]
    applied: list[Rule]  # the rules that decide (first match, or every match)
    ruleset_sha256: str

    @property
    def models(self) -> list[str]:
        """The models to run: the applied rules' models in order, each once (an `ignore` adds none)."""
        return list(dict.fromkeys(m for r in self.applied if isinstance(r.action, Action) for m in r.action.models))

    @property
    def ignored(self) -> bool:
        """True when no model runs (no rule applied, or only `ignore` ones)."""
        return not self.models

    def explain(self) -> list[str]:
        """Human-readable lines: each rule's verdict and condition tree, then the decision."""
        lines = []
        for rule, outcome in self.outcomes:
            tag = "APPLIED" if rule in self.applied else ("matched" if outcome.passed else "no match")
            action = "ignore" if rule.action == "ignore" else f"models {', '.join(rule.action.models)}"  # type: ignore[union-attr,unused-ignore]
            lines.append(f"rule {rule.name}: {tag} -> {action}")
            lines.extend("  " + line for line in outcome.lines())
        lines.append("decision: " + ("ignore" if self.ignored else "run " + ", ".join(self.models)))
        return lines


def decide(ruleset: RuleSet, facts: Facts) -> Decision:
    """Evaluate every rule on the facts; mode "first" applies the first rule that matches, "every"
    all of them. Pure: reads nothing, records nothing (the router records the decision)."""
    outcomes = [(rule, evaluate(rule.match, facts)) for rule in ruleset.rules]
    matched = [rule for rule, outcome in outcomes if outcome.passed]
    applied = matched[:1] if ruleset.mode == "first" else matched
    return Decision(outcomes, applied, ruleset.sha256)
