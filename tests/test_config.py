from __future__ import annotations

from pathlib import Path

import pytest

from aenode.cli import main
from aenode.config import ConfigError, load_settings

ROOT = Path(__file__).resolve().parents[1]


def test_default_config_file_loads() -> None:
    s = load_settings(ROOT / "config.yaml", environ={})
    assert s.node.ae_title == "AENODE"
    assert s.node.port == 11112
    assert s.storage.path == Path("./var")


def test_bad_port_names_key(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("node:\n  port: 70000\n")
    with pytest.raises(ConfigError, match=r"node\.port: must be between 1 and 65535"):
        load_settings(cfg, environ={})


def test_unknown_key_names_path(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("node:\n  prot: 1\n")
    with pytest.raises(ConfigError, match=r"node\.prot: unknown key"):
        load_settings(cfg, environ={})


def test_env_override() -> None:
    s = load_settings(
        None, environ={"AENODE_NODE__PORT": "11113", "AENODE_STORAGE__PATH": "/tmp/x"}
    )
    assert s.node.port == 11113
    assert s.storage.path == Path("/tmp/x")


def test_env_override_invalid_names_key() -> None:
    with pytest.raises(ConfigError, match=r"node\.port"):
        load_settings(None, environ={"AENODE_NODE__PORT": "0"})


def test_cli_config_check_reports_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("series:\n  quiet_seconds: -1\n")
    assert main(["config", "check", str(cfg)]) == 2
    assert "series.quiet_seconds" in capsys.readouterr().err
