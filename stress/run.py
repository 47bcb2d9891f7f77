"""``make stress``: the long attack suite of issue 9, loopback only, bounded in count and time.

Parts (each against real processes: ``aenode serve``, dcmtk, Orthanc as the destination):

- fuzz: ``--fuzz`` (10,000) instances mutated from the real files, one valid instance with
  fresh UIDs after every ``--every`` (25) of them; every acknowledged one must be on disk
  and in the store, every valid one acknowledged;
- pdu: ``--pdu`` (500) abusive connections (truncated, 4 GB, unknown type, random bytes,
  silent) in batches, each followed by a timed C-ECHO that must succeed within 3 s;
- parallel: 16 storescu senders x 3 rounds of a whole study (udacity-mr Study1, 120
  instances) with rewritten UIDs; none refused, every instance recorded once;
- kill: ``kill -9`` of the node at each stage (receiving, assembling, inferring, writing,
  exporting) of a study; after the restart (and the sender's resend) the results must
  reach Orthanc, once each;
- commit: storage commitment to Orthanc with ``kill -9`` of the node while the results are
  being sent or committed, and with Orthanc restarted between the store and its report
  (the first report is lost); the job must end ``committed`` with the results once each.

Ends with the table: test, inputs tried, failures seen, data lost, pipeline stopped.
Usage: ``python stress/run.py [--fuzz N] [--pdu N] [--only fuzz,pdu,parallel,kill,commit]``.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import pydicom  # noqa: E402
import yaml  # noqa: E402
from conftest import DATA, dcmtk, free_port  # noqa: E402
from fuzzing import Fuzzed, fuzz, pdu_abuse, rewrite_uids, send_raw, sources, split  # noqa: E402
from orthanc import Orthanc  # noqa: E402
from pynetdicom import _config  # noqa: E402
from test_receive import DCMTK_ENV, NodeProcess, storescu  # noqa: E402

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
STAGES = ("receiving", "assembling", "inferring", "writing", "exporting")


@dataclass
class Row:
    test: str
    tried: int = 0
    failures: int = 0  # inputs the node refused or aborted (expected for fuzz)
    lost: int = 0  # acknowledged data not kept, or results missing / duplicated
    stopped: int = 0  # the pipeline stopped serving (a valid input did not get through)
    note: str = ""


def _hippocampus_rules() -> dict[str, Any]:
    """config.yaml's selection with only the rules of the one model NodeProcess enables."""
    selection: dict[str, Any] = yaml.safe_load((ROOT / "config.yaml").read_text())["selection"]
    selection["rules"] = [r for r in selection["rules"] if r.get("models") == ["hippocampus"]]
    return selection


def _node(tmp: Path, extra: dict[str, Any] | None = None) -> NodeProcess:
    tmp.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        "node": {"artim_timeout": 2.0, "pdu_timeout": 5.0},
        "selection": _hippocampus_rules(),
        "series": {"quiet_seconds": 3.0},
        "logging": {"level": "INFO"},
    }
    for key, value in (extra or {}).items():
        config.setdefault(key, {}).update(value)
    return NodeProcess(tmp, config)


def _items(paths: list[Path], kind: str) -> list[Fuzzed]:
    out = []
    for path in paths:
        _, stream, ts, sop_class, uid = split(path)
        out.append(Fuzzed(path, kind, sop_class, uid, ts, stream))
    return out


def _lost(node: NodeProcess, items: list[Fuzzed], answers: dict[str, int | None]) -> int:
    lost = 0
    for item in items:
        if answers.get(item.sop_uid) != 0x0000:
            continue
        rows = node.query("SELECT path FROM instances WHERE sop_instance_uid=?", (item.sop_uid,))
        if not rows or not (node.storage / rows[0]["path"]).read_bytes().endswith(item.stream):
            lost += 1
    return lost


def run_fuzz(tmp: Path, count: int, every: int, deadline: float) -> Row:
    row = Row("fuzz (mutated real files + valid)")
    node = _node(tmp / "node").start(timeout=90)
    rng = random.Random(2026)
    crop = sorted((DATA / "udacity-mr" / "Study1" / "13_HCropVolume").glob("*.dcm"))
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        made = fuzz(sources(DATA), count, seed=2026, out=tmp / "fuzz")
        batch: list[Fuzzed] = []
        valid_n = 0
        for i, item in enumerate(made, 1):
            batch.append(item)
            if i % every == 0 or i == count:
                good = _items(
                    rewrite_uids([crop[valid_n % len(crop)]], tmp / "v" / str(i), rng), "valid"
                )
                valid_n += 1
                answers = send_raw(node.port, batch + good)
                row.tried += len(batch) + len(good)
                row.failures += sum(1 for b in batch if answers[b.sop_uid] != 0x0000)
                row.lost += _lost(node, batch + good, answers)
                row.stopped += sum(1 for g in good if answers[g.sop_uid] != 0x0000)
                for b in batch:
                    b.path.unlink()
                batch = []
                if time.monotonic() > deadline:
                    row.note = f"time bound reached after {i} fuzzed"
                    break
        if node.proc is None or node.proc.poll() is not None:
            row.stopped += 1
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
        node.stop()
    return row


def _echo_seconds(port: int) -> float:
    start = time.monotonic()
    done = subprocess.run(
        [dcmtk("echoscu"), "-to", "10", "-aec", "AENODE", "127.0.0.1", str(port)],
        capture_output=True,
        env=DCMTK_ENV,
        timeout=60,
    )
    took = time.monotonic() - start
    return took if done.returncode == 0 else float("inf")


def run_pdu(tmp: Path, count: int) -> Row:
    row = Row("raw PDU abuse + timed C-ECHO")
    node = _node(tmp / "pdu").start(timeout=90)
    rng = random.Random(7)
    waits = []
    try:
        while row.tried < count:
            n = min(50, count - row.tried)
            with ThreadPoolExecutor(2) as pool:
                abuse = pool.submit(pdu_abuse, node.port, rng, n)
                time.sleep(0.2)
                waits.append(pool.submit(_echo_seconds, node.port).result())
                closed = abuse.result()
            row.tried += n
            row.failures += n - closed  # connections the node did not close in time
            row.stopped += sum(1 for w in waits[-1:] if w > 3.0)
        median = sorted(waits)[len(waits) // 2]
        row.note = f"C-ECHO under flood: max {max(waits):.2f} s, median {median:.2f} s"
    finally:
        node.stop()
    return row


def run_parallel(tmp: Path) -> Row:
    row = Row("16 senders x 3 rounds, whole study")
    node = _node(tmp / "par", {"series": {"quiet_seconds": 30.0}}).start(timeout=90)
    rng = random.Random(16)
    study = sorted(p for p in (DATA / "udacity-mr" / "Study1").rglob("*.dcm"))
    try:
        for r in range(3):
            folders = []
            for s in range(16):
                out = tmp / "par-src" / f"{r}-{s}"
                rewrite_uids(study, out, rng)
                folders.append(out)

            def send(folder: Path) -> subprocess.CompletedProcess[str]:
                return storescu(node.port, folder, opts=("+sd",))

            with ThreadPoolExecutor(16) as pool:
                results = list(pool.map(send, folders))
            row.tried += 16 * len(study)
            row.failures += sum(1 for x in results if x.returncode != 0)
            for folder in folders:
                for path in folder.iterdir():
                    uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
                    if not node.query("SELECT 1 FROM instances WHERE sop_instance_uid=?", (uid,)):
                        row.lost += 1
                shutil.rmtree(folder)
        row.stopped = row.failures
        row.note = "refused associations count as failures and as pipeline stopped"
    finally:
        node.stop()
    return row


def _stage_reached(node: NodeProcess, stage: str, study: str) -> bool:
    if stage == "receiving":
        return len(node.query("SELECT 1 FROM instances WHERE study_uid=?", (study,))) >= 20
    if stage == "assembling":
        return bool(
            node.query("SELECT 1 FROM series WHERE study_uid=? AND state!='receiving'", (study,))
        )
    if stage == "inferring":
        return bool(node.query("SELECT 1 FROM jobs WHERE state='running'"))
    if stage == "writing":
        return bool(node.query("SELECT 1 FROM jobs WHERE state='inferred'"))
    return bool(node.query("SELECT 1 FROM outbox"))


def _results(orthanc: Orthanc, study_uid: str) -> dict[str, int]:
    found: dict[str, int] = {}
    for inst in orthanc.study_instances(study_uid):
        meta = orthanc.get_json(f"/instances/{inst['ID']}/metadata?expand")
        if meta.get("RemoteAET") == "AENODE":
            sop = orthanc.instance_tags(inst["ID"])["SOPClassUID"]
            found[sop] = found.get(sop, 0) + 1
    return found


def run_kill(tmp: Path) -> list[Row]:
    orthanc = Orthanc(tmp / "orthanc").start()
    rows = []
    rng = random.Random(9)
    study_src = sorted(p for p in (DATA / "udacity-mr" / "Study1").rglob("*.dcm"))
    try:
        for stage in STAGES:
            row = Row(f"kill -9 while {stage}", tried=1)
            node = _node(
                tmp / f"kill-{stage}",
                {
                    "export": {
                        "destinations": [
                            {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}
                        ],
                        "retry": {"initial_seconds": 1.0, "max_interval_seconds": 4.0},
                    },
                    "series": {"quiet_seconds": 2.0},
                },
            ).start(timeout=90)
            folder = rewrite_uids(study_src, tmp / f"kill-src-{stage}", rng)[0].parent
            study = str(
                pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True).StudyInstanceUID
            )
            sender = subprocess.Popen(
                [
                    dcmtk("storescu"),
                    "-aec",
                    "AENODE",
                    "+sd",
                    "127.0.0.1",
                    str(node.port),
                    str(folder),
                ],
                env=DCMTK_ENV,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + 120
            reached = False
            while time.monotonic() < deadline:
                if _stage_reached(node, stage, study):
                    reached = True
                    break
                time.sleep(0.02)
            before = len(node.query("SELECT 1 FROM instances WHERE study_uid=?", (study,)))
            node.stop(signal.SIGKILL)
            sender.wait(60)
            node.start(timeout=90)
            after = len(node.query("SELECT 1 FROM instances WHERE study_uid=?", (study,)))
            row.lost += max(0, before - after)
            resend = storescu(node.port, folder, opts=("+sd",))  # as a PACS retries
            if resend.returncode != 0:
                row.failures += 1
            found: dict[str, int] = {}
            limit = time.monotonic() + 240
            while time.monotonic() < limit:
                found = _results(orthanc, study)
                if len(found) >= 3:
                    break
                time.sleep(1.0)
            if len(found) < 3:
                row.stopped = 1
            row.lost += sum(n - 1 for n in found.values() if n > 1)  # sent twice
            row.note = ("stage reached" if reached else "stage not seen, killed anyway") + (
                f"; results in Orthanc: {sorted(found.values())}"
            )
            node.stop()
            rows.append(row)
    finally:
        orthanc.stop()
    return rows


def _commit_node(tmp: Path, orthanc: Orthanc, port: int) -> NodeProcess:
    destination = {
        "ae_title": "ORTHANC",
        "host": "127.0.0.1",
        "port": orthanc.dicom_port,
        "storage_commitment": True,
    }
    return _node(
        tmp,
        {
            "node": {"port": port},
            "export": {
                "destinations": [destination],
                "retry": {"initial_seconds": 1.0, "max_interval_seconds": 4.0},
                "commitment_timeout_seconds": 5.0,
            },
            "series": {"quiet_seconds": 2.0},
            # The hippocampus rule only (the one model NodeProcess enables).
            "selection": {
                "rules": [
                    r
                    for r in yaml.safe_load((ROOT / "config.yaml").read_text())["selection"][
                        "rules"
                    ]
                    if r["name"] == "hippocampus"
                ]
            },
        },
    )


def _commit_case(tmp: Path, name: str, rng: random.Random, restart_pacs: bool) -> Row:
    """One storage commitment case: kill -9 of the node, or an Orthanc restart."""
    row = Row(name, tried=1)
    port = free_port()
    # Orthanc's report goes to the node's port; for the PACS restart case first to nowhere.
    report_port = free_port() if restart_pacs else port
    orthanc = Orthanc(
        tmp / f"orthanc-{port}", modalities={"aenode": ("AENODE", "127.0.0.1", report_port)}
    ).start()
    node = _commit_node(tmp / f"node-{port}", orthanc, port)
    src = sorted((DATA / "udacity-mr" / "Study1" / "13_HCropVolume").glob("*.dcm"))
    folder = rewrite_uids(src, tmp / f"commit-src-{port}", rng)[0].parent
    study = str(pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True).StudyInstanceUID)
    try:
        node.start(timeout=90)  # inside: a node that cannot start leaves no Orthanc behind
        if storescu(node.port, folder, opts=("+sd",)).returncode != 0:
            row.failures += 1
        wanted = "committing" if restart_pacs else "sending','committing"
        deadline = time.monotonic() + 180
        reached = False
        while time.monotonic() < deadline and not reached:
            reached = bool(node.query(f"SELECT 1 FROM outbox WHERE state IN ('{wanted}')"))
            time.sleep(0.01)
        if restart_pacs:
            config = json.loads(orthanc.config_path.read_text())
            config["DicomModalities"]["aenode"] = ["AENODE", "127.0.0.1", port]
            orthanc.config_path.write_text(json.dumps(config))
            orthanc.restart()
        else:
            node.stop(signal.SIGKILL)
            node.start(timeout=90)
        state = None
        limit = time.monotonic() + 180
        while time.monotonic() < limit:
            jobs = node.query("SELECT state FROM jobs WHERE model='hippocampus'")
            state = jobs[0]["state"] if jobs else None
            if state in ("committed", "failed"):
                break
            time.sleep(0.5)
        found = _results(orthanc, study)
        if state != "committed" or len(found) < 3:
            row.stopped = 1
        row.lost += sum(n - 1 for n in found.values() if n > 1)
        row.note = (
            f"{'stage reached' if reached else 'stage not seen'}; job {state}; "
            f"results in Orthanc: {sorted(found.values())}"
        )
    finally:
        if node.proc is not None:
            node.stop()
        orthanc.stop()
    return row


def run_commit(tmp: Path) -> list[Row]:
    rng = random.Random(15)
    return [
        _commit_case(tmp, "storage commitment, kill -9 while exporting", rng, restart_pacs=False),
        _commit_case(tmp, "storage commitment, PACS restart before report", rng, restart_pacs=True),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fuzz", type=int, default=10_000)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--pdu", type=int, default=500)
    parser.add_argument("--minutes", type=float, default=40.0, help="bound on the fuzz part")
    parser.add_argument("--only", default="fuzz,pdu,parallel,kill,commit")
    args = parser.parse_args(argv)
    parts = set(args.only.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="aenode-stress-"))
    rows: list[Row] = []
    plan: list[tuple[str, Callable[[], list[Row]]]] = [
        (
            "fuzz",
            lambda: [run_fuzz(tmp, args.fuzz, args.every, time.monotonic() + 60 * args.minutes)],
        ),
        ("pdu", lambda: [run_pdu(tmp, args.pdu)]),
        ("parallel", lambda: [run_parallel(tmp)]),
        ("kill", lambda: run_kill(tmp)),
        ("commit", lambda: run_commit(tmp)),
    ]
    try:
        for name, part in plan:
            if name not in parts:
                continue
            start = time.monotonic()
            print(f"--- {name}", flush=True)
            try:
                got = part()
            except BaseException as exc:  # a part that dies is a stopped pipeline
                traceback.print_exc()
                got = [Row(name, stopped=1, note=f"{type(exc).__name__}: {str(exc)[:200]}")]
            for row in got:
                row.note += f" ({time.monotonic() - start:.0f} s)" if row is got[-1] else ""
            rows.extend(got)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("\n| test | inputs tried | failures seen | data lost | pipeline stopped | note |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.test} | {r.tried} | {r.failures} | {r.lost} | {r.stopped} | {r.note} |")
    return 1 if any(r.lost or r.stopped for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
