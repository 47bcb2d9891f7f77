"""Selection rules: validation with key paths, every condition kind, the `aenode select` tester."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from isles import write_isles_study
from pydicom.dataset import Dataset

from aenode.cli import main
from aenode.config import ConfigError, load_settings
from aenode.select.rules import Rule, compile_rules, evaluate, match_series, slice_orientation
from aenode.select.spec import RuleSpec

ROOT = Path(__file__).resolve().parents[1]


def _rules(*rules: dict[str, Any], known: list[str] | None = None) -> list[Rule]:
    return compile_rules([RuleSpec.model_validate(r) for r in rules], known)


def _one(condition: dict[str, Any]) -> Rule:
    return _rules({"name": "r", "models": ["m"], "series": condition})[0]


@pytest.fixture(scope="module")
def hippo(data_dir: Path) -> Dataset:
    return pydicom.dcmread(
        data_dir / "udacity-mr/Study1/13_HCropVolume/1.dcm", stop_before_pixels=True
    )


@pytest.fixture(scope="module")
def t1post(data_dir: Path) -> Dataset:
    return pydicom.dcmread(
        data_dir / "udacity-mr/Study1/12-T1post-05670/000000.dcm", stop_before_pixels=True
    )


@pytest.fixture(scope="module")
def ct(data_dir: Path) -> Dataset:
    return pydicom.dcmread(data_dir / "cq500-ct0/CT000001.dcm", stop_before_pixels=True)


# -- validation -------------------------------------------------------------------------


def test_bad_regex_names_key_path() -> None:
    with pytest.raises(
        ConfigError,
        match=r"^selection\.rules\[0\]\.series\.all\[1\]\.regex: bad regular expression "
        r"'Hippo\(Crop': missing \)",
    ):
        _one(
            {
                "all": [
                    {"tag": "Modality", "equals": "MR"},
                    {"tag": "SeriesDescription", "regex": "Hippo(Crop"},
                ]
            }
        )


@pytest.mark.parametrize(
    ("condition", "message"),
    [
        (
            {"tag": "SeriesDescriptoin", "equals": "x"},
            r"series\.tag: unknown DICOM keyword "
            r"'SeriesDescriptoin'",
        ),  # fmt: skip
        ({"tag": "Modality"}, r"series: empty condition"),
        (
            {"tag": "Modality", "equals": "MR", "regex": "M."},
            r"series: one condition per "
            r"mapping, found equals and regex",
        ),  # fmt: skip
        ({"equals": "MR"}, r"series\.tag: equals needs a 'tag'"),
        ({"all": []}, r"series\.all: empty list"),
        ({"any": [{"not": {}}]}, r"series\.any\[0\]\.not: empty condition"),
        ({"instances": {"min": 5, "max": 2}}, r"series\.instances: min 5 is greater than max 2"),
        ({"instances": {}}, r"series\.instances: give min, max or both"),
        ({"tag": "SliceThickness", "min": 3, "max": 1}, r"series\.min: min 3 is greater"),
        (
            {"sop_class": ["CT Image Storage", "Foo Storage"]},
            r"series\.sop_class\[1\]: "
            r"unknown SOP class 'Foo Storage'",
        ),  # fmt: skip
        (
            {"orientation": "axial", "tag": "Modality"},
            r"series\.tag: 'tag' does not go with "
            r"orientation",
        ),  # fmt: skip
    ],
)
def test_invalid_conditions_name_key_path(condition: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=r"selection\.rules\[0\]\." + message):
        _one(condition)


def test_rule_level_errors_all_reported() -> None:
    specs = [
        {"name": "a", "models": ["hippocampus"], "series": {"tag": "Modality", "equals": "MR"}},
        {"name": "a", "models": ["nope"], "series": {"tag": "Modality", "equals": "MR"}},
        {"name": "b", "models": ["hippocampus"]},
        {"name": "c", "models": ["hippocampus"], "roles": {}},
        {"name": "d", "models": ["hippocampus"], "roles": {"dwi": {}}},
    ]
    with pytest.raises(ConfigError) as info:
        _rules(*specs, known=["hippocampus"])
    lines = str(info.value).splitlines()
    assert lines == [
        "selection.rules[1].name: duplicate rule name 'a'",
        "selection.rules[1].models[0]: unknown model 'nope' (known: hippocampus)",
        "selection.rules[2]: give either 'series' (one condition tree) or 'roles'",
        "selection.rules[3].roles: no roles given",
        "selection.rules[4].roles.dwi: empty condition (give all, any, not, tag with an "
        "operator, orientation, instances, slices or sop_class)",
    ]


def test_invalid_rule_stops_settings_load(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "selection:\n  rules:\n    - name: x\n      models: [m]\n      series:\n"
        "        all:\n          - {tag: Modality, equals: MR}\n"
        "          - {tag: SeriesDescription, regex: 'a(b'}\n"
    )
    with pytest.raises(
        ConfigError, match=r"selection\.rules\[0\]\.series\.all\[1\]\.regex: bad regular"
    ):
        load_settings(cfg, environ={})
    cfg.write_text("selection:\n  rules:\n    - name: x\n      models: [m]\n      serie: {}\n")
    with pytest.raises(ConfigError, match=r"selection\.rules\[0\]\.serie: unknown key"):
        load_settings(cfg, environ={})


def test_default_config_rule() -> None:
    settings = load_settings(ROOT / "config.yaml", environ={})
    shipped = sorted(p.parent.name for p in (ROOT / "models").glob("*/model.yaml"))
    rules = compile_rules(settings.selection.rules, known_models=shipped)
    assert (rules[0].name, rules[0].models, rules[0].is_study) == (
        "hippocampus",
        ("hippocampus",),
        False,
    )
    assert (rules[1].name, rules[1].models, rules[1].is_study) == (
        "brain-tumour",
        ("brain-tumour",),
        False,
    )
    head_ct = next(r for r in rules if r.name == "head-ct")
    assert (head_ct.models, head_ct.is_study) == (("head-ct-haemorrhage",), False)
    stroke = next(r for r in rules if r.name == "stroke-mismatch")
    assert (stroke.models, list(stroke.roles)) == (("stroke-mismatch",), ["dwi", "adc", "flair"])


def _hippo_config(tmp_path: Path) -> Path:
    """config.yaml with only its hippocampus and brain-tumour rules (the udacity studies'):
    the tester's output stays the same when other models' rules are added."""
    data = yaml.safe_load((ROOT / "config.yaml").read_text())
    data["selection"]["rules"] = [
        r for r in data["selection"]["rules"] if r["name"] in ("hippocampus", "brain-tumour")
    ]
    path = tmp_path / "hippo.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# -- evaluation --------------------------------------------------------------------------


def test_first_failing_condition_is_the_reason(hippo: Dataset, t1post: Dataset) -> None:
    settings = load_settings(ROOT / "config.yaml", environ={})
    rule = compile_rules(settings.selection.rules)[0]
    assert evaluate(rule, hippo, 32).matched
    assert evaluate(rule, t1post, 22).reason == (
        "SeriesDescription 'T1post' does not match '^HippoCrop$'"
    )
    assert evaluate(rule, hippo, 5).reason == "5 instances, fewer than 10"
    assert evaluate(rule, hippo, 401).reason == "401 instances, more than 400"


@pytest.mark.parametrize(
    ("condition", "reason"),
    [
        ({"tag": "Modality", "equals": "MR"}, None),
        ({"tag": "Modality", "equals": "mr"}, "Modality 'MR' is not 'mr'"),
        ({"tag": "Modality", "equals": "mr", "ignore_case": True}, None),
        ({"tag": "SeriesDescription", "regex": "hippo.*", "ignore_case": True}, None),
        (
            {"tag": "SeriesDescription", "regex": "Hippo"},
            "SeriesDescription 'HippoCrop' does not match '^Hippo$'",
        ),  # fmt: skip
        ({"tag": "Modality", "one_of": ["CT", "MR"]}, None),
        ({"tag": "Modality", "one_of": ["CT", "PT"]}, "Modality 'MR' is not one of 'CT', 'PT'"),
        ({"tag": "SliceThickness", "min": 0.5, "max": 1.5}, None),
        ({"tag": "SliceThickness", "min": 2}, "SliceThickness 1 is not in [2, inf]"),
        ({"tag": "Rows", "equals": 51}, None),
        ({"tag": "ImagesInAcquisition", "present": True}, None),
        ({"tag": "ContrastBolusAgent", "present": True}, "ContrastBolusAgent is absent"),
        (
            {"tag": "ImagesInAcquisition", "present": False},
            "ImagesInAcquisition is present ('32')",
        ),  # fmt: skip
        ({"tag": "ImageType", "contains": "DERIVED"}, None),
        (
            {"tag": "ImageType", "contains": "ORIGINAL"},
            "ImageType 'DERIVED\\SECONDARY\\AXIAL' does not contain 'ORIGINAL'",
        ),  # fmt: skip
        ({"orientation": "axial"}, None),
        ({"orientation": "sagittal"}, "orientation is axial, not sagittal"),
        ({"sop_class": "MR Image Storage"}, None),
        (
            {"sop_class": ["CTImageStorage", "1.2.840.10008.5.1.4.1.1.7"]},
            "SOPClassUID MR Image Storage is not CT Image Storage, Secondary Capture Image Storage",
        ),  # fmt: skip
        ({"slices": {"min": 32, "max": 32}}, None),
        (
            {"not": {"tag": "ImageType", "contains": "DERIVED"}},
            "excluded: ImageType contains 'DERIVED'",
        ),  # fmt: skip
        (
            {"any": [{"tag": "Modality", "equals": "CT"}, {"tag": "Rows", "max": 10}]},
            "none of the alternatives holds: Modality 'MR' is not 'CT'; Rows 51 is not in "
            "[-inf, 10]",
        ),  # fmt: skip
        (
            {"tag": "PatientWeight", "min": 10},
            "PatientWeight is absent (wanted a number in [10, inf])",
        ),  # fmt: skip
    ],
)
def test_condition_kinds_on_hippocrop(
    hippo: Dataset, condition: dict[str, Any], reason: str | None
) -> None:
    decision = evaluate(_one(condition), hippo, 32)
    assert decision.matched == (reason is None)
    assert decision.reason == (reason or "")


def test_orientation_of_real_series(hippo: Dataset, t1post: Dataset, ct: Dataset) -> None:
    assert slice_orientation(hippo) == "axial"
    assert slice_orientation(t1post) == "axial"  # 15 degrees off axial: still axial
    assert slice_orientation(ct) == "axial"
    ds = Dataset()
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    assert slice_orientation(ds) == "sagittal"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    assert slice_orientation(ds) == "coronal"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0.7071, -0.7071]
    assert slice_orientation(ds) == "oblique"


def test_ct_hounsfield_series_rule(ct: Dataset) -> None:
    rule = _one(
        {
            "all": [
                {"sop_class": "CT Image Storage"},
                {"tag": "SliceThickness", "max": 1.0},
                {"tag": "ImageType", "contains": "axial", "ignore_case": True},
                {"tag": "ConvolutionKernel", "one_of": ["STANDARD", "SOFT"]},
            ]
        }
    )
    assert evaluate(rule, ct, 238).matched


def test_every_matching_rule_and_role_returned(hippo: Dataset) -> None:
    rules = _rules(
        {"name": "a", "models": ["m1", "m2"], "series": {"tag": "Modality", "equals": "MR"}},
        {"name": "b", "models": ["m3"], "series": {"tag": "Modality", "equals": "CT"}},
        {
            "name": "c",
            "models": ["m4"],
            "roles": {
                "t1": {"tag": "SeriesDescription", "regex": "Hippo.*"},
                "flair": {"tag": "SeriesDescription", "regex": "FLAIR.*"},
                "any_mr": {"tag": "Modality", "equals": "MR"},
            },
        },
    )
    matched = [(rule.name, role) for rule, role in match_series(rules, hippo, 32)]
    assert matched == [("a", None), ("c", "t1"), ("c", "any_mr")]
    decision = evaluate(rules[2], hippo, 32)
    assert decision.matched and decision.role == "t1"
    flair_only = Rule("f", ("m",), roles={"flair": rules[2].roles["flair"]})
    assert evaluate(flair_only, hippo, 32).reason == (
        "role flair: SeriesDescription 'HippoCrop' does not match '^FLAIR.*$'"
    )


# -- the tester --------------------------------------------------------------------------

EXPECTED_UDACITY = """\
series ...886578505670  MR  'T1post'  22 instances
  rule hippocampus: SeriesDescription 'T1post' does not match '^HippoCrop$'
  rule brain-tumour: SeriesDescription 'T1post' does not match '^.*(?i:flair|dark[-_ ]?fluid).*$'
series ...153146185462  MR  'HippoCrop'  32 instances
  -> rule hippocampus: model hippocampus
  rule brain-tumour: SeriesDescription 'HippoCrop' does not match '^.*(?i:flair|dark[-_ ]?fluid).*$'
series ...984496684610  MR  'T1pre_reg'  22 instances
  rule hippocampus: SeriesDescription 'T1pre_reg' does not match '^HippoCrop$'
  rule brain-tumour: SeriesDescription 'T1pre_reg' does not match '^.*(?i:flair|dark[-_ ]?fluid).*$'
series ...589141676244  MR  'FLAIR_reg'  22 instances
  -> rule brain-tumour: model brain-tumour
  rule hippocampus: SeriesDescription 'FLAIR_reg' does not match '^HippoCrop$'
series ...349611688910  MR  'T2_reg'  22 instances
  rule hippocampus: SeriesDescription 'T2_reg' does not match '^HippoCrop$'
  rule brain-tumour: SeriesDescription 'T2_reg' does not match '^.*(?i:flair|dark[-_ ]?fluid).*$'
series ...989986622014  MR  'T1post'  24 instances
  rule hippocampus: SeriesDescription 'T1post' does not match '^HippoCrop$'
  rule brain-tumour: SeriesDescription 'T1post' does not match '^.*(?i:flair|dark[-_ ]?fluid).*$'
series ...619024551805  MR  'HippoCrop'  35 instances
  -> rule hippocampus: model hippocampus
  rule brain-tumour: SeriesDescription 'HippoCrop' does not match '^.*(?i:flair|dark[-_ ]?fluid).*$'
series ...268827049467  MR  'dT1'  24 instances
  rule hippocampus: SeriesDescription 'dT1' does not match '^HippoCrop$'
  rule brain-tumour: SeriesDescription 'dT1' does not match '^.*(?i:flair|dark[-_ ]?fluid).*$'
series ...579028662665  MR  'FLAIR_reg'  24 instances
  -> rule brain-tumour: model brain-tumour
  rule hippocampus: SeriesDescription 'FLAIR_reg' does not match '^HippoCrop$'
series ...964504488079  MR  'T2_reg'  24 instances
  rule hippocampus: SeriesDescription 'T2_reg' does not match '^HippoCrop$'
  rule brain-tumour: SeriesDescription 'T2_reg' does not match '^.*(?i:flair|dark[-_ ]?fluid).*$'"""


def test_tester_output_on_udacity(
    data_dir: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = _hippo_config(tmp_path)
    code = main(["--config", str(config), "select", str(data_dir / "udacity-mr")])
    assert code == 0
    lines = capsys.readouterr().out.rstrip("\n").splitlines()
    # Only the hippocampus and brain-tumour rules' lines: other rules may be added.
    ours = [
        line
        for line in lines[:-1]
        if "rule " not in line or "rule hippocampus" in line or "rule brain-tumour" in line
    ]
    assert ours == EXPECTED_UDACITY.splitlines()
    assert lines[-1].startswith("10 series, 4 matched, ")


def test_tester_json(data_dir: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = main(
        [
            "--config",
            str(_hippo_config(tmp_path)),
            "select",
            str(data_dir / "udacity-mr" / "Study2"),
            str(data_dir / "dcm-qa-ts" / "1.dcm"),
            "--json",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    by_desc = {s["description"]: s for s in result["series"]}
    assert len(result["series"]) == 6
    assert by_desc["HippoCrop"]["instances"] == 35
    assert by_desc["HippoCrop"]["matches"] == [
        {"rule": "hippocampus", "role": None, "models": ["hippocampus"]}
    ]
    assert by_desc["HippoCrop"]["series_uid"].endswith("619024551805")
    assert [m["rule"] for m in by_desc["FLAIR_reg"]["matches"]] == ["brain-tumour"]
    others = [s for s in result["series"] if s["description"] not in ("HippoCrop", "FLAIR_reg")]
    assert all(not s["matches"] for s in others)
    assert [s["failures"][0]["reason"] for s in others if s["modality"] == "MR"][:2] == [
        "SeriesDescription 'T1post' does not match '^HippoCrop$'",
        "SeriesDescription 'dT1' does not match '^HippoCrop$'",
    ]


def test_tester_with_bad_rule_exits_2(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "selection:\n  rules:\n    - {name: x, models: [m], series: {tag: Foo, equals: 1}}\n"
    )
    assert main(["--config", str(cfg), "select", str(data_dir / "dcm-qa-ts")]) == 2
    assert "rules[0].series.tag: unknown DICOM keyword 'Foo'" in capsys.readouterr().err


def test_tester_no_dicom(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("hello")
    config = _hippo_config(tmp_path)
    assert main(["--config", str(config), "select", str(tmp_path / "in")]) == 1
    captured = capsys.readouterr()
    assert "0 series, 0 matched, " in captured.out and ", 1 file(s) skipped" in captured.out
    assert "notes.txt: not DICOM" in captured.err


def test_public_surface() -> None:
    import aenode.select as select

    assert sorted(select.__all__) == [
        "ConditionSpec",
        "Decision",
        "Rule",
        "RuleSpec",
        "StudyTracker",
        "compile_rules",
        "evaluate",
        "match_series",
        "role_requirements",
    ]
    assert all(getattr(select, name) is not None for name in select.__all__)


def test_tester_reports_study_roles(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study_uid, files = write_isles_study(tmp_path / "isles", data_dir, roles=("dwi", "adc"))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "selection:\n  rules:\n    - name: stroke\n      models: [stroke]\n      roles:\n"
        "        dwi: {tag: SeriesDescription, equals: DWI}\n"
        "        adc: {tag: SeriesDescription, equals: ADC}\n"
        "        flair: {tag: SeriesDescription, equals: FLAIR}\n"
    )
    assert main(["--config", str(cfg), "select", str(tmp_path / "isles")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "  -> rule stroke role adc: model stroke"
    assert lines[3] == "  -> rule stroke role dwi: model stroke"
    assert lines[4] == f"study ...{study_uid[-12:]}: rule stroke waits for role(s) flair"
    assert lines[5] == "2 series, 2 matched, 1 rule"
    assert main(["--config", str(cfg), "select", str(tmp_path / "isles"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["studies"] == [
        {
            "study_uid": study_uid,
            "rule": "stroke",
            "models": ["stroke"],
            "roles": {
                "adc": [pydicom.dcmread(files["adc"][0]).SeriesInstanceUID],
                "dwi": [pydicom.dcmread(files["dwi"][0]).SeriesInstanceUID],
            },
            "missing": ["flair"],
        }
    ]


def test_enhanced_header_orientation_and_slices() -> None:
    ds = Dataset()
    ds.Modality = "MR"
    ds.NumberOfFrames = 40
    plane = Dataset()
    plane.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    shared = Dataset()
    shared.PlaneOrientationSequence = [plane]
    ds.SharedFunctionalGroupsSequence = [shared]
    assert slice_orientation(ds) == "sagittal"
    rule = _one({"all": [{"orientation": "sagittal"}, {"slices": {"min": 30}}]})
    assert evaluate(rule, ds, 1).matched
    assert evaluate(_one({"instances": {"min": 30}}), ds, 1).reason == (
        "1 instances, fewer than 30"
    )


def test_yaml_study_rule_loads(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        """
selection:
  study_timeout_seconds: 30
  rules:
    - name: stroke
      models: [stroke]
      roles:
        dwi:
          all:
            - {tag: Modality, equals: MR}
            - {tag: ImageType, contains: DIFFUSION}
            - not: {tag: SeriesDescription, regex: ".*ADC.*", ignore_case: true}
        adc: {tag: SeriesDescription, regex: ".*ADC.*", ignore_case: true}
        flair:
          any:
            - {tag: SeriesDescription, regex: ".*FLAIR.*"}
            - {tag: SequenceName, one_of: ["*tir2d1_18", "*tir2d1rr21"]}
"""
    )
    settings = load_settings(cfg, environ={})
    assert settings.selection.study_timeout_seconds == 30
    (rule,) = compile_rules(settings.selection.rules, known_models={"stroke"})
    assert rule.is_study and list(rule.roles) == ["dwi", "adc", "flair"]


_CT_CARD = """name: ct-model
version: '1'
task: classification
description: test card
intended_use: tests
inputs:
  modality: CT
  geometry: {geometry}
outputs:
  head: softmax
  classes: [{{name: no bleed}}, {{name: bleed}}]
runtime: {{format: torchscript, weights: model.pt, sha256: '{sha}'}}
"""


def _ct_config(tmp_path: Path, geometry: str | None) -> Path:
    models = tmp_path / "models"
    if geometry is not None:
        (models / "ct-model").mkdir(parents=True)
        (models / "ct-model" / "model.yaml").write_text(
            _CT_CARD.format(geometry=geometry, sha="0" * 64)
        )
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"models: {{path: {models}}}\n"
        "selection:\n  rules:\n    - name: ct\n      models: [ct-model]\n"
        "      series: {tag: Modality, equals: CT}\n"
    )
    return cfg


def test_tester_runs_the_volume_checks(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A tilted head CT matches the rule, but the volume check says a job would reject it."""
    cfg = _ct_config(tmp_path, "{}")
    assert main(["--config", str(cfg), "select", str(data_dir / "cq500-ct0")]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "matched, but" in x)
    assert line.startswith("     model ct-model: matched, but the volume would be rejected: ")
    assert "gantry tilt" in line
    assert "inputs.geometry.allow: [tilt] in the model card" in line
    assert main(["--config", str(cfg), "select", "--json", str(data_dir / "cq500-ct0")]) == 0
    series = json.loads(capsys.readouterr().out)["series"]
    big = max(series, key=lambda s: s["instances"])
    assert big["volume"][0]["outcome"] == "rejected" and "tilt" in big["volume"][0]["detail"]


def test_tester_uses_the_card_geometry(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _ct_config(tmp_path, "{allow: [tilt, gaps]}")
    assert main(["--config", str(cfg), "select", "--json", str(data_dir / "cq500-ct0")]) == 0
    series = json.loads(capsys.readouterr().out)["series"]
    big = max(series, key=lambda s: s["instances"])
    assert big["volume"] == [{"model": "ct-model", "outcome": "ok", "detail": ""}]
    # --no-volume-check reads headers only.
    assert (
        main(["--config", str(cfg), "select", "--no-volume-check", str(data_dir / "cq500-ct0")])
        == 0
    )
    assert "would be" not in capsys.readouterr().out


def test_the_study_rule_example_of_docs_models_md(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The worked example's rule, as written in docs/models.md, on the ISLES'22 study."""
    text = (ROOT / "docs" / "models.md").read_text()
    block = text.split("# config.yaml\n", 1)[1].split("```", 1)[0]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(block)
    write_isles_study(tmp_path / "isles", data_dir)
    assert main(["--config", str(cfg), "select", "--json", str(tmp_path / "isles")]) == 0
    result = json.loads(capsys.readouterr().out)
    roles = {s["description"]: [m["role"] for m in s["matches"]] for s in result["series"]}
    assert roles == {"DWI": ["dwi"], "ADC": ["adc"], "FLAIR": ["flair"]}
    assert result["studies"][0]["missing"] == []
