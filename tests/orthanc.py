"""A real Orthanc (Debian ``/usr/sbin/Orthanc``) on free loopback ports, for integration tests.

Usage: ``from orthanc import orthanc_server`` in a test module (the fixture), or
``Orthanc(tmp_path).start()`` directly. Storage and index live in the given folder and
survive :meth:`Orthanc.restart`, so that an outage can be simulated.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port

__all__ = ["ORTHANC", "Orthanc", "orthanc_server"]

ORTHANC = "/usr/sbin/Orthanc"


class Orthanc:
    """One Orthanc process with a generated configuration.

    Parameters
    ----------
    folder : pathlib.Path
        Holds ``orthanc.json``, the storage, the index and the log.
    aet : str
        Orthanc's DICOM AE title.
    modalities : dict of str to (AE title, host, port)
        ``DicomModalities``: peers Orthanc may send to (for example our node).
    lua : str or None
        Lua script source, written next to the configuration and loaded via ``LuaScripts``.
    extra : dict or None
        More configuration keys (for example ``DicomTlsEnabled`` and its certificates).
    """

    def __init__(
        self,
        folder: Path,
        aet: str = "ORTHANC",
        modalities: dict[str, tuple[str, str, int] | dict[str, Any]] | None = None,
        lua: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.aet = aet
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.folder.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "Name": "aenode-test",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"),
            "DicomAet": aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomModalities": {
                k: v if isinstance(v, dict) else list(v) for k, v in (modalities or {}).items()
            },
            "StableAge": 1,
            "OverwriteInstances": True,
            "DicomCheckCalledAet": False,
            "HttpsVerifyPeers": False,
            "Plugins": [],
        }
        config.update(extra or {})
        if lua is not None:
            script = self.folder / "script.lua"
            script.write_text(lua, encoding="utf-8")
            config["LuaScripts"] = [str(script)]
        self.config_path = self.folder / "orthanc.json"
        self.config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")

    @property
    def url(self) -> str:
        """Base URL of the REST API."""
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 30.0) -> Orthanc:
        """Start the process and wait until ``/system`` answers."""
        if shutil.which(ORTHANC) is None:
            pytest.skip(f"Orthanc not installed at {ORTHANC}")
        log = open(self.folder / "orthanc.log", "ab")  # noqa: SIM115 (closed with the process)
        self.proc = subprocess.Popen(
            [ORTHANC, str(self.config_path)],
            env={**os.environ, "TCP_NODELAY": "1"},
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.folder,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"Orthanc exited with {self.proc.returncode}; see {self.folder}/orthanc.log"
                )
            try:
                self.get_json("/system")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"Orthanc did not answer on {self.url} within {timeout} s")

    def stop(self) -> None:
        """Stop the process (storage kept)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def restart(self) -> Orthanc:
        """Stop and start again on the same ports with the same storage."""
        self.stop()
        return self.start()

    # -- REST helpers -------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        content_type: str = "application/json",
    ) -> bytes:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", content_type)
        with urllib.request.urlopen(req, timeout=30) as resp:
            data: bytes = resp.read()
            return data

    def get_json(self, path: str) -> Any:
        """GET ``path`` and decode the JSON answer."""
        return json.loads(self._request("GET", path))

    def post(self, path: str, body: Any) -> Any:
        """POST ``body`` (bytes as-is, anything else as JSON) and decode the JSON answer."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        raw = self._request("POST", path, data)
        return json.loads(raw) if raw.strip() else None

    def upload(self, path: Path) -> str:
        """Upload one Part 10 file; returns Orthanc's instance id."""
        answer = self.post("/instances", Path(path).read_bytes())
        return str(answer["ID"])

    def find_study(self, study_uid: str) -> str | None:
        """Orthanc's id of a study by its StudyInstanceUID, or None."""
        found = self.post("/tools/lookup", study_uid.encode())
        for item in found or []:
            if item.get("Type") == "Study":
                return str(item["ID"])
        return None

    def study_instances(self, study_uid: str) -> list[dict[str, Any]]:
        """The instances of a study (``/studies/{id}/instances``); empty if unknown."""
        study = self.find_study(study_uid)
        if study is None:
            return []
        result: list[dict[str, Any]] = self.get_json(f"/studies/{study}/instances")
        return result

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        """``/instances/{id}/simplified-tags``: keyword to value."""
        result: dict[str, Any] = self.get_json(f"/instances/{instance_id}/simplified-tags")
        return result

    def instance_count(self) -> int:
        """``/statistics`` CountInstances."""
        return int(self.get_json("/statistics")["CountInstances"])


@pytest.fixture
def orthanc_server(tmp_path: Path) -> Iterator[Orthanc]:
    """A started Orthanc (AE ``ORTHANC``) in ``tmp_path/orthanc``, stopped in teardown."""
    server = Orthanc(tmp_path / "orthanc").start()
    try:
        yield server
    finally:
        server.stop()
