"""Header values read defensively: the poison instance of issue 9 (Modality with VR 'CW').

Real data: ../shared/data/udacity-mr/Study1/13_HCropVolume (32 HippoCrop MR slices), copied
with the Modality VR of every file flipped from CS to CW (tests/poison.py).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pydicom
import pytest
from poison import poison_bytes, write_poison
from test_dispatch import _dispatcher, _hand_on

from aenode.cli import main
from aenode.dicomread import read_float, read_text, read_value, unreadable_elements
from aenode.volume import VolumeError, build_volume_from_files

UNKNOWN_VR = "Modality cannot be read (NotImplementedError: Unknown Value Representation 'CW'"


@pytest.fixture()
def crop(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "udacity-mr" / "Study1" / "13_HCropVolume").glob("*.dcm"))


@pytest.fixture()
def poisoned(crop: list[Path], tmp_path: Path) -> list[Path]:
    folder = tmp_path / "poisoned"
    folder.mkdir()
    return [write_poison(p, folder / p.name) for p in crop]


def test_reader_treats_the_unknown_vr_as_absent_and_says_why(poisoned: list[Path]) -> None:
    ds = pydicom.dcmread(poisoned[0], stop_before_pixels=True)
    with pytest.raises(NotImplementedError, match="Unknown Value Representation 'CW'"):
        ds.get("Modality")  # what killed the dispatcher before
    assert read_value(ds, "Modality") is None
    assert read_text(ds, "Modality") == ""
    assert read_text(ds, "SeriesDescription") == "HippoCrop"
    assert list(unreadable_elements(ds)) == ["Modality"]
    assert unreadable_elements(ds)["Modality"].startswith(UNKNOWN_VR)


def test_unparsable_number_reads_as_absent(crop: list[Path]) -> None:
    ds = pydicom.dcmread(crop[0], stop_before_pixels=True)
    ds.SliceThickness = "1.0"
    assert read_float(ds, "SliceThickness") == 1.0
    raw = poison_bytes(crop[0].read_bytes())
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(raw), stop_before_pixels=True)
    assert read_float(ds, "Modality") is None


def test_dispatcher_survives_the_poison_and_the_series_says_why(
    tmp_path: Path, crop: list[Path], poisoned: list[Path]
) -> None:
    store, dispatcher = _dispatcher(tmp_path)
    _hand_on(store, "1.2.66", poisoned, "HippoCrop")
    _hand_on(store, "1.2.3", crop, "HippoCrop")
    assert dispatcher.step() == []  # no job for the poison, and no exception
    jobs = dispatcher.step()
    assert [(j.model, j.inputs["image"].series_uid) for j in jobs] == [("hippocampus", "1.2.3")]
    row = store.execute("SELECT state, reason FROM series WHERE series_uid='1.2.66'")[0]
    assert UNKNOWN_VR in row["reason"] and "treated as absent (wanted 'MR')" in row["reason"]
    assert [r["state"] for r in store.execute("SELECT state FROM queue ORDER BY id")] == [
        "done",
        "done",
    ]


def test_dispatcher_run_loop_goes_on_after_the_poison(
    tmp_path: Path, crop: list[Path], poisoned: list[Path]
) -> None:
    import threading

    store, dispatcher = _dispatcher(tmp_path)
    _hand_on(store, "1.2.66", poisoned, "HippoCrop")
    _hand_on(store, "1.2.3", crop, "HippoCrop")
    stop = threading.Event()
    thread = threading.Thread(target=dispatcher.run, args=(stop,), daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not store.execute("SELECT 1 FROM jobs"):
        time.sleep(0.05)
    stop.set()
    thread.join(5)
    assert [r["model"] for r in store.execute("SELECT model FROM jobs")] == ["hippocampus"]


def test_select_command_names_the_unreadable_tag(
    poisoned: list[Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)  # config.yaml's hippocampus rule
    assert main(["select", "--json", str(poisoned[0].parent)]) == 0
    report = json.loads(capsys.readouterr().out)
    (series,) = report["series"]
    assert series["matches"] == [] and series["modality"] == ""
    failures = {f["rule"]: f for f in series["failures"]}
    assert {"brain-tumour", "hippocampus"} <= set(failures)  # every rule says why
    failure = failures["hippocampus"]
    assert failure["reason"].startswith(UNKNOWN_VR)
    assert failure["reason"].endswith("treated as absent (wanted 'MR')")


def test_volume_builds_without_the_unreadable_modality(poisoned: list[Path]) -> None:
    volume = build_volume_from_files(poisoned)
    assert volume.image.GetSize() == (35, 51, 32) or volume.image.GetSize()[2] == 32
    assert volume.series.modality == ""


def test_volume_names_an_unreadable_required_tag(crop: list[Path], tmp_path: Path) -> None:
    data = crop[0].read_bytes()
    at = data.index(b"\x28\x00\x30\x00DS")  # PixelSpacing
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(data[:at] + b"\x28\x00\x30\x00DW" + data[at + 6 :])
    copies = [bad] + [shutil.copy(p, tmp_path / p.name) for p in crop[1:]]
    with pytest.raises(VolumeError, match=r"PixelSpacing cannot be read .*'DW'.* in .*bad\.dcm"):
        build_volume_from_files([Path(p) for p in copies])
