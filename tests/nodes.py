"""The receiving processes of a node as a subprocess (tests/receiver_only.py), on loopback."""

from __future__ import annotations

import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT, free_port


class Receivers:
    """``node.receivers`` receiving processes with storage in a tmp folder."""

    def __init__(self, tmp: Path, overrides: dict[str, dict[str, Any]] | None = None) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.storage = tmp / "var"
        config: dict[str, dict[str, Any]] = {
            "node": {"host": "127.0.0.1", "port": self.port, "receivers": 2},
            "storage": {"path": str(self.storage), "min_free_mb": 10},
            "logging": {"level": "INFO"},
        }
        for section, values in (overrides or {}).items():
            config.setdefault(section, {}).update(values)
        node = config["node"]
        self.port = node["port"]
        # The port start() waits for: the plain one, else the TLS one (node.port null).
        self.listen_port = int(node["port"] if node["port"] is not None else node["tls"]["port"])
        self.storage = Path(config["storage"]["path"])
        self.config = tmp / "receivers.yaml"
        self.config.write_text(yaml.safe_dump(config))
        self.log = tmp / "receivers.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120.0) -> Receivers:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(ROOT / "tests" / "receiver_only.py"), str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.tmp,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"receivers exited with {self.proc.returncode}:\n{self.log_text()}")
            if "listening\n" in self.log_text():
                with socket.create_connection(("127.0.0.1", self.listen_port), timeout=1):
                    return self
            time.sleep(0.05)
        pytest.fail(f"receivers did not listen within {timeout} s:\n{self.log_text()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        conn = sqlite3.connect(self.storage / "aenode.db", timeout=30)
        conn.row_factory = sqlite3.Row
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()

    def spooled(self) -> list[Path]:
        spool = self.storage / "spool"
        return sorted(p for p in spool.rglob("*") if p.is_file()) if spool.exists() else []
