"""Typed routing rules: every operator and combinator (table-driven), validation that names the rule
and the field, first/every modes, the default rules, and `segnode rules explain`."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pydicom.multival import MultiValue
from pydicom.valuerep import DS

from segnode.config import default_models_dir
from segnode.models.registry import list_models
from segnode.phantom.ct import CTOptions, generate_ct, write_phantom
from segnode.phantom.dx import DXOptions, generate_dx, write_dx
from segnode.routing.rules import Facts, RulesError, decide, evaluate, load_rules, parse_rules

FACTS = Facts(
    attributes={"Modality": "CT", "BodyPartExamined": "ABDOMEN", "SeriesDescription": "Abdomen 5mm venous",
                "ImageType": MultiValue(str, ["ORIGINAL", "PRIMARY", "AXIAL"]), "SliceThickness": DS("5.0"),
                "SeriesNumber": 3, "StudyDescription": ""},
    instances=48, dimensions=3, ae_title="CT_SCANNER_1", ip="10.1.2.3")


def _match(yaml_text: str):
    ruleset = parse_rules("mode: first\nrules:\n  - name: r\n    match: " + yaml_text + "\n    action: ignore\n")
    return ruleset.rules[0].match


@pytest.mark.parametrize("condition, passed, why", [
    ("{attribute: Modality, equals: CT}", True, "equal"),
    ("{attribute: Modality, equals: MR}", False, "different"),
    ("{attribute: SeriesNumber, equals: 3}", True, "equal"),
    ("{attribute: SliceThickness, equals: 5}", True, "equal"),  # numbers compare as numbers
    ("{attribute: Modality, in: [MR, CT]}", True, "in the list"),
    ("{attribute: Modality, in: [MR, PT]}", False, "not in the list"),
    ("{attribute: SeriesDescription, regex: '(?i)venous'}", True, "matches"),
    ("{attribute: SeriesDescription, regex: '^arterial'}", False, "does not match"),
    ("{attribute: SliceThickness, range: {min: 3, max: 5}}", True, "within"),
    ("{attribute: SliceThickness, range: {max: 2}}", False, "above the maximum"),
    ("{attribute: SliceThickness, range: {min: 6}}", False, "below the minimum"),
    ("{attribute: Modality, range: {min: 1}}", False, "not a number"),
    ("{attribute: BodyPartExamined, exists: true}", True, "present"),
    ("{attribute: StudyDescription, exists: true}", False, "absent"),  # empty counts as absent
    ("{attribute: ContrastBolusAgent, exists: false}", True, "absent"),
    ("{attribute: ContrastBolusAgent, equals: x}", False, "absent"),
    ("{attribute: ImageType, contains: AXIAL}", True, "contained"),
    ("{attribute: ImageType, contains: LOCALIZER}", False, "not among the values"),
    ("{sender: ae_title, equals: CT_SCANNER_1}", True, "equal"),
    ("{sender: ip, network: [10.0.0.0/8]}", True, "inside"),
    ("{sender: ip, network: ['192.168.0.0/16', '172.16.0.0/12']}", False, "outside"),
    ("{series: instances, range: {min: 20}}", True, "within"),
    ("{series: dimensions, equals: 2}", False, "different"),
])
def test_each_operator(condition, passed, why):
    outcome = evaluate(_match(condition), FACTS)
    assert outcome.passed is passed and outcome.why == why


@pytest.mark.parametrize("match, passed", [
    ("{all: [{attribute: Modality, equals: CT}, {series: dimensions, equals: 3}]}", True),
    ("{all: [{attribute: Modality, equals: CT}, {series: dimensions, equals: 2}]}", False),
    ("{any: [{attribute: Modality, equals: MR}, {attribute: Modality, equals: CT}]}", True),
    ("{any: [{attribute: Modality, equals: MR}, {attribute: Modality, equals: PT}]}", False),
    ("{not: {attribute: ImageType, contains: LOCALIZER}}", True),
    ("{not: {attribute: Modality, equals: CT}}", False),
    ("{all: [{any: [{attribute: Modality, equals: MR}, {not: {sender: ip, network: [10.0.0.0/8]}}]}]}", False),
    ("{always: true}", True),
])
def test_combinators(match, passed):
    assert evaluate(_match(match), FACTS).passed is passed


def test_ip_mapped_addresses_are_tested_as_ipv4():
    facts = Facts({}, 1, 2, "X", "::ffff:10.1.2.3")
    assert evaluate(_match("{sender: ip, network: [10.0.0.0/8]}"), facts).passed


@pytest.mark.parametrize("rules, message", [
    ("  - name: a\n    match: {attribute: Modalty, equals: CT}\n    action: ignore",
     r"rule 'a', field match.attribute: .*unknown DICOM keyword 'Modalty'"),
    ("  - name: b\n    match: {attribute: Modality, equal: CT}\n    action: ignore", r"rule 'b', field match: unknown key 'equal'"),
    ("  - name: c\n    match: {attribute: Modality, equals: CT, in: [MR]}\n    action: ignore",
     r"rule 'c'.*exactly one operator"),
    ("  - name: d\n    match: {attribute: Modality, regex: '('}\n    action: ignore", r"rule 'd'.*invalid regular expression"),
    ("  - name: e\n    match: {attribute: Modality, network: [10.0.0.0/8]}\n    action: ignore", r"rule 'e'.*sender: ip"),
    ("  - name: f\n    match: {always: true}\n    action: {models: [no-such-model]}",
     r"rule 'f', field action.models: unknown model 'no-such-model'"),
    ("  - name: g\n    match: {attribute: SliceThickness, range: {min: 5, max: 1}}\n    action: ignore", r"rule 'g'.*above max"),
    ("  - name: h\n    match: {always: true}\n    action: ignore\n  - name: h\n    match: {always: true}\n    action: ignore",
     r"unique: h"),
])
def test_invalid_rules_name_the_rule_and_the_field(rules, message):
    with pytest.raises(RulesError, match=message):
        parse_rules("mode: first\nrules:\n" + rules + "\n", models=["ct-abdomen-phantom-3d"])


def test_first_mode_stops_at_the_first_match_every_mode_collects():
    text = """rules:
  - name: ct
    match: {attribute: Modality, equals: CT}
    action: {models: [a]}
  - name: abdomen
    match: {attribute: BodyPartExamined, equals: ABDOMEN}
    action: {models: [b, a]}
  - name: rest
    match: {always: true}
    action: ignore
"""
    first = decide(parse_rules("mode: first\n" + text), FACTS)
    every = decide(parse_rules("mode: every\n" + text), FACTS)
    assert [r.name for r in first.applied] == ["ct"] and first.models == ["a"]
    assert [r.name for r in every.applied] == ["ct", "abdomen", "rest"] and every.models == ["a", "b"]
    assert first.ruleset_sha256 != every.ruleset_sha256 and len(first.ruleset_sha256) == 64


def test_default_rules_route_the_shipped_models_and_ignore_the_rest():
    installed = [f.name for f in list_models(default_models_dir())]
    rules = load_rules(models=installed)
    ct = Facts({"Modality": "CT", "BodyPartExamined": "ABDOMEN", "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"]}, 60, 3)
    scout = Facts({"Modality": "CT", "BodyPartExamined": "ABDOMEN", "ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]},
                  2, 3)
    dx = Facts({"Modality": "DX", "BodyPartExamined": "CHEST"}, 1, 2)
    mr = Facts({"Modality": "MR", "BodyPartExamined": "ABDOMEN"}, 30, 3)
    assert decide(rules, ct).models == ["ct-abdomen-phantom-3d"]
    assert decide(rules, dx).models == ["dx-chest-phantom-2d"]
    assert decide(rules, scout).ignored and decide(rules, mr).ignored


def test_rules_explain_shows_each_condition_with_the_value_seen(tmp_path):
    write_phantom(generate_ct(1, CTOptions(matrix=16, slice_spacing=5.0, z_extent_mm=30.0)), tmp_path / "ct")
    write_dx(generate_dx(1, DXOptions(matrix=64)), tmp_path / "dx")
    rules = tmp_path / "rules.yaml"
    rules.write_text("""mode: first
rules:
  - name: thin-ct
    match:
      all:
        - {attribute: Modality, equals: CT}
        - {attribute: SliceThickness, range: {max: 2}}
    action: {models: [ct-abdomen-phantom-3d]}
""")
    result = subprocess.run([sys.executable, "-m", "segnode", "rules", "explain", "--rules", str(rules), str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "rule thin-ct: no match" in out
    assert "pass Modality equals 'CT' (seen 'CT': equal)" in out
    assert "FAIL SliceThickness range" in out and "above the maximum" in out
    assert "FAIL Modality equals 'CT' (seen 'DX': different)" in out
    assert out.count("decision: ignore") == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text(rules.read_text().replace("Modality", "Modalitty"))
    result = subprocess.run([sys.executable, "-m", "segnode", "rules", "check", "--rules", str(bad)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "rule 'thin-ct'" in result.stderr and "Modalitty" in result.stderr


def test_rules_check_refuses_what_serve_refuses_and_accepts_what_serve_accepts(tmp_path):
    """One loader for both: a rule naming a destination the settings do not configure is refused by both
    with the same message; with a configuration that names it, `rules check` passes."""
    rules = tmp_path / "rules.yaml"
    rules.write_text("""mode: first
rules:
  - name: ct
    match: {attribute: Modality, equals: CT}
    action: {models: [ct-abdomen-phantom-3d], destinations: [archive]}
""")
    env = {k: v for k, v in os.environ.items() if k != "SEGNODE_CONFIG"}

    def segnode(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "segnode", *args], capture_output=True, text=True, timeout=120,
                              env=env)

    check = segnode("rules", "check", "--rules", str(rules))
    serve = segnode("serve", "--rules", str(rules), "--data-dir", str(tmp_path / "data"), "--dimse-port", "0",
                    "--http-port", "0")
    assert check.returncode == serve.returncode == 2
    assert "rule 'ct', field action.destinations: unknown destination 'archive'" in check.stderr
    assert check.stderr.strip().splitlines()[-1] == serve.stderr.strip().splitlines()[-1]
    config = tmp_path / "segnode.yaml"
    config.write_text("destinations:\n  archive: {kind: dicomweb, url: 'http://127.0.0.1:9/dicom-web'}\n")
    ok = segnode("rules", "check", "--config", str(config), "--rules", str(rules))
    assert ok.returncode == 0 and ok.stdout.startswith("ok: 1 rules"), ok.stderr
