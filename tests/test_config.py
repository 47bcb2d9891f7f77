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


def _models_config(tmp_path: Path, model: str) -> Path:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"models:\n  path: {ROOT / 'models'}\n"
        "selection:\n  rules:\n"
        "    - name: hippo\n      models: [hippocampus]\n"
        "      series: {tag: Modality, equals: MR}\n"
        f"    - name: lungs\n      models: [hippocampus, {model}]\n"
        "      series: {tag: Modality, equals: CT}\n"
    )
    return cfg


def test_config_check_names_the_key_path_of_an_unknown_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["config", "check", str(_models_config(tmp_path, "lungs"))]) == 2
    err = capsys.readouterr().err
    assert "selection.rules[1].models[1]: unknown model 'lungs' (known: " in err
    assert "hippocampus" in err.split("(known: ", 1)[1]
    assert main(["config", "check", str(_models_config(tmp_path, "hippocampus"))]) == 0
    out = capsys.readouterr().out
    assert "OK (2 selection rule(s), models: " in out and "hippocampus" in out


@pytest.mark.parametrize("where", ["before", "after"])
def test_global_options_before_or_after_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"storage:\n  path: {tmp_path / 'nowhere'}\n")
    args = ["--config", str(cfg), "jobs"] if where == "before" else ["jobs", "--config", str(cfg)]
    assert main(args) == 1
    assert f"no store at {tmp_path / 'nowhere' / 'aenode.db'}" in capsys.readouterr().out


def test_runtime_threads_and_its_old_name(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert load_settings(None, environ={}).runtime.threads == 0  # every core
    cfg = tmp_path / "c.yaml"
    cfg.write_text("runtime:\n  torch_threads: 3\n")
    with caplog.at_level("WARNING", logger="aenode.config"):
        assert load_settings(cfg, environ={}).runtime.threads == 3
    assert "runtime.torch_threads is deprecated: it is now runtime.threads" in caplog.text
    cfg.write_text("runtime:\n  torch_threads: 3\n  threads: 2\n")
    with pytest.raises(ConfigError, match=r"runtime: give runtime\.threads only"):
        load_settings(cfg, environ={})


def test_process_settings_apply_threads_once() -> None:
    import torch

    from aenode.config import RuntimeSettings
    from aenode.process import apply_process_settings

    before = torch.get_num_threads()
    try:
        applied = apply_process_settings(RuntimeSettings(threads=1))
        assert applied.threads == 1 and torch.get_num_threads() == 1
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.set_num_threads(before)
