"""The main job: Orthanc as the PACS, aenode beside it, a real study in, AI results back.

``python scripts/demo.py --study DIR`` (what ``make demo`` runs) starts Orthanc and
``aenode serve`` on loopback, sends the study to Orthanc with dcmtk ``storescu``; Orthanc
routes the stable study to aenode (Lua ``OnStableStudy``), aenode sends SEG, SC and SR back.
It prints what came back and leaves both running; ``--stop`` (``make demo-stop``) stops them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "demo-out"
PIDS = OUT / "pids.json"
ORTHANC = "/usr/sbin/Orthanc"
DCMTK = "/usr/bin:/usr/local/bin:/bin"
AENODE_AET = "AENODE"
ORTHANC_AET = "ORTHANC"


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pick(port: int) -> int:
    if _port_free(port):
        return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def _wait(what: str, check: Any, timeout: float, status: Any = None) -> Any:
    """Wait for ``check()`` to be truthy, saying what for; every 5 s, how long and where it
    stands (``status()``: a short line, e.g. the jobs' states)."""
    print(f"waiting for {what} (at most {timeout:.0f} s) ...", flush=True)
    start = time.monotonic()
    deadline = start + timeout
    said = start
    while time.monotonic() < deadline:
        try:
            value = check()
        except (OSError, urllib.error.URLError, ValueError, sqlite3.Error):
            value = None
        if value:
            return value
        if time.monotonic() - said >= 5.0:
            said = time.monotonic()
            try:
                line = status() if status is not None else ""
            except (OSError, urllib.error.URLError, ValueError, sqlite3.Error):
                line = ""
            extra = f": {line}" if line else ""
            print(f"  still waiting for {what}, {said - start:.0f} s{extra}", flush=True)
        time.sleep(0.2)
    raise SystemExit(f"demo: {what} did not happen within {timeout:.0f} s")


def _spawn(cmd: list[str], log: Path, env: dict[str, str], cwd: Path) -> int:
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )
    return proc.pid


def stop() -> int:
    """Stop the Orthanc and aenode that a previous demo left running."""
    if not PIDS.exists():
        print("demo: nothing to stop")
        return 0
    pids = json.loads(PIDS.read_text())
    for name, pid in pids.items():
        try:
            os.killpg(pid, signal.SIGTERM)
            print(f"stopped {name} (pid {pid})")
        except ProcessLookupError:
            pass
    PIDS.unlink()
    return 0


def _series_table(base: str, study_id: str) -> list[dict[str, Any]]:
    rows = []
    for series in _get(f"{base}/studies/{study_id}/series"):
        tags = series["MainDicomTags"]
        first = series["Instances"][0]
        sop = _get(f"{base}/instances/{first}/tags?simplify").get("SOPClassUID", "")
        rows.append(
            {
                "number": tags.get("SeriesNumber", ""),
                "modality": tags.get("Modality", ""),
                "description": tags.get("SeriesDescription", ""),
                "instances": len(series["Instances"]),
                "sop_class": sop,
            }
        )
    return sorted(rows, key=lambda r: int(r["number"] or 0))


def _expected_jobs(study: Path) -> int:
    """How many jobs the default rules make of the study (the `aenode select` dry run)."""
    from aenode.config import load_settings
    from aenode.select.explain import explain, scan, studies
    from aenode.select.rules import compile_rules

    rules = compile_rules(load_settings(ROOT / "config.yaml", environ={}).selection.rules)
    reports, _ = scan([study])
    explain(reports, rules)
    # A series rule makes a job per matched series; a study rule (roles) only once every
    # role is there: Study1's FLAIR fills the stroke rule's flair role, but without DWI and
    # ADC no stroke job is made.
    per_series = sum(len(m["models"]) for r in reports for m in r.matches if not m["role"])
    per_study = sum(len(row["models"]) for row in studies(reports, rules) if not row["missing"])
    return per_series + per_study


def _sr_lines(path: Path) -> list[str]:
    """The numeric items and findings of a result SR, as text (what came back to the PACS)."""
    if not path.is_file():
        return []
    import pydicom

    lines: list[str] = []

    def walk(items: Any) -> None:
        for item in items or []:
            kind = getattr(item, "ValueType", "")
            name = (
                item.ConceptNameCodeSequence[0].CodeMeaning
                if "ConceptNameCodeSequence" in item
                else ""
            )
            if kind == "NUM" and "MeasuredValueSequence" in item:
                mv = item.MeasuredValueSequence[0]
                unit = mv.MeasurementUnitsCodeSequence[0].CodeValue
                value = float(mv.NumericValue)
                shown = f"{value:.3f}" if unit == "1" else f"{value:.4g} {unit}"
                lines.append(f"SR {name}: {shown}")
            elif kind == "CODE" and name == "Finding":
                lines.append(f"SR finding: {item.ConceptCodeSequence[0].CodeMeaning}")
            walk(getattr(item, "ContentSequence", None))

    walk(pydicom.dcmread(path).ContentSequence)
    return lines


def demo(study: Path) -> int:
    """Run the demo on one study folder."""
    if not study.is_dir():
        print(
            f"demo: no study at {study}.\n"
            "  The default is ../shared/data/udacity-mr/Study1, the public course data of\n"
            "  'AI for Healthcare: 3D medical imaging' (udacity/nd320-c3-3d-imaging-starter,\n"
            "  data/TestVolumes). Put a DICOM study folder there, or run\n"
            "  `make demo DEMO_STUDY=/path/to/study`.",
            file=sys.stderr,
        )
        return 2
    storescu = shutil.which("storescu", path=DCMTK)
    if storescu is None or not Path(ORTHANC).exists():
        print("demo: dcmtk or orthanc missing; run `make install` as root", file=sys.stderr)
        return 2
    stop()
    if OUT.exists():
        shutil.rmtree(OUT)
    (OUT / "orthanc").mkdir(parents=True)
    dicom_port, http_port, node_port = _pick(4242), _pick(8042), _pick(11112)
    web_port = _pick(8180)
    shutil.copy(
        ROOT / "docker" / "orthanc" / "route-stable-study.lua", OUT / "orthanc" / "route.lua"
    )
    config = {
        "Name": "aenode-demo",
        "StorageDirectory": str(OUT / "orthanc" / "storage"),
        "IndexDirectory": str(OUT / "orthanc" / "index"),
        "DicomAet": ORTHANC_AET,
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomModalities": {"aenode": [AENODE_AET, "127.0.0.1", node_port]},
        "StableAge": 2,
        "OverwriteInstances": True,
        "LuaScripts": [str(OUT / "orthanc" / "route.lua")],
        "Plugins": [],
    }
    (OUT / "orthanc" / "orthanc.json").write_text(json.dumps(config, indent=2))
    base = f"http://127.0.0.1:{http_port}"
    env = {**os.environ, "TCP_NODELAY": "1"}
    pids = {
        "orthanc": _spawn(
            [ORTHANC, str(OUT / "orthanc" / "orthanc.json")], OUT / "orthanc.log", env, OUT
        )
    }
    PIDS.write_text(json.dumps(pids))
    _wait("Orthanc to answer on its REST port", lambda: _get(f"{base}/system"), 30)
    node_env = {
        **env,
        "AENODE_NODE__HOST": "127.0.0.1",
        "AENODE_NODE__PORT": str(node_port),
        "AENODE_STORAGE__PATH": str(OUT / "var"),
        "AENODE_HTTP__PORT": str(web_port),
        "AENODE_EXPORT__DESTINATIONS": json.dumps(
            [{"ae_title": ORTHANC_AET, "host": "127.0.0.1", "port": dicom_port}]
        ),
    }
    aenode = str(ROOT / ".venv" / "bin" / "aenode")
    pids["aenode"] = _spawn(
        [aenode, "--config", str(ROOT / "config.yaml"), "serve"], OUT / "aenode.log", node_env, ROOT
    )
    PIDS.write_text(json.dumps(pids))
    print(f"Orthanc (the PACS): DICOM {ORTHANC_AET}@127.0.0.1:{dicom_port}, HTTP {base}")
    print(f"aenode: {AENODE_AET}@127.0.0.1:{node_port}, log {OUT / 'aenode.log'}")
    print(f"aenode dashboard: http://127.0.0.1:{web_port}/ (health /healthz, metrics /metrics)")
    echoscu = shutil.which("echoscu", path=DCMTK) or "echoscu"
    _wait(
        "aenode to load and warm its models and listen",
        lambda: (
            subprocess.run(
                [echoscu, "-aec", AENODE_AET, "127.0.0.1", str(node_port)], capture_output=True
            ).returncode
            == 0
        ),
        120,
    )
    print(f"sending {study} to Orthanc with storescu ...")
    subprocess.run(
        # -xs: JPEG lossless files (CQ500) go as they are; uncompressed ones as before
        [storescu, "-xs", "-aec", ORTHANC_AET, "+sd", "+r", "127.0.0.1", str(dicom_port)]
        + [str(study)],
        check=True,
    )
    t_sent = time.time()
    db = OUT / "var" / "aenode.db"

    expected = _expected_jobs(study)
    print(f"the default rules select {expected} job(s) in this study")

    def finished() -> list[sqlite3.Row] | None:
        if not db.exists():
            return None
        with sqlite3.connect(db) as conn:
            conn.row_factory = sqlite3.Row
            rows = conn.execute("SELECT * FROM jobs ORDER BY id").fetchall()
        if len(rows) >= expected and all(
            r["state"] in ("done", "failed", "rejected") for r in rows
        ):
            return rows
        return None

    def where() -> str:
        if not db.exists():
            return "nothing received yet (Orthanc waits StableAge before it routes)"
        with sqlite3.connect(db) as conn:
            received = conn.execute("SELECT COUNT(*) FROM instances").fetchone()[0]
            series = dict(conn.execute("SELECT state, COUNT(*) FROM series GROUP BY state"))
            states = dict(conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"))
        parts = [f"{received} instance(s) received"]
        parts.append(", ".join(f"{n} series {k}" for k, n in sorted(series.items())))
        if states:
            parts.append("jobs " + ", ".join(f"{n} {k}" for k, n in sorted(states.items())))
        else:
            parts.append(f"no job yet of {expected}")
        return "; ".join(p for p in parts if p)

    jobs = _wait(
        f"{expected} job(s) to finish and their results to reach Orthanc", finished, 300, where
    )
    elapsed = time.time() - t_sent
    studies = _get(f"{base}/studies")
    print(f"\nresults back in Orthanc {elapsed:.1f} s after the last slice reached Orthanc\n")
    for study_id in studies:
        print(f"study {study_id}:")
        print(f"  {'#':>5}  {'modality':8}  {'instances':>9}  {'SOP class':30}  description")
        for row in _series_table(base, study_id):
            print(
                f"  {row['number']:>5}  {row['modality']:8}  {row['instances']:>9}  "
                f"{row['sop_class']:30}  {row['description']}"
            )
    for job in jobs:
        print(f"\njob {job['id']}: model {job['model']}, state {job['state']}")
        if job["reason"]:
            print(f"  reason: {job['reason']}")
        if job["findings"]:
            for label, mm3 in json.loads(job["findings"]).get("volumes_mm3", {}).items():
                print(f"  {label:28} {mm3:10.1f} mm3  ({mm3 / 1000:.2f} mL)")
        for line in _sr_lines(Path(job["result_dir"] or ".") / "sr.dcm"):
            print(f"  {line}")
        if job["result_dir"] and (Path(job["result_dir"]) / "report.png").exists():
            print(f"  report page: {Path(job['result_dir']) / 'report.png'}")
    explorer = f"{base}/app/explorer.html"
    if studies:
        explorer += f"#study?uuid={studies[0]}"
    print(f"\nOrthanc Explorer: {explorer}")
    print(f"aenode dashboard: http://127.0.0.1:{web_port}/")
    print("Orthanc and aenode keep running; `make demo-stop` stops both.")
    return 0 if all(j["state"] == "done" for j in jobs) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--study", type=Path, default=ROOT / ".." / "shared" / "data" / "udacity-mr" / "Study1"
    )
    parser.add_argument("--stop", action="store_true")
    args = parser.parse_args()
    return stop() if args.stop else demo(args.study.resolve())


if __name__ == "__main__":
    sys.exit(main())
