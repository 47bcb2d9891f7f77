"""docker/compose.yaml, checked without Docker (these machines have no engine, so
``docker compose config`` cannot run): its structure, every file it mounts, the ports that
must agree between aenode, Orthanc and Prometheus, and aenode's environment validated as
settings by aenode itself."""

from __future__ import annotations

import json
from typing import Any

import yaml
from conftest import ROOT

from aenode.config import load_settings

DOCKER = ROOT / "docker"


def _compose() -> dict[str, Any]:
    data = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


def _published(service: dict[str, Any]) -> dict[int, int]:
    ports = {}
    for spec in service.get("ports", []):
        *_, host, container = str(spec).split(":")
        ports[int(container)] = int(host)
    return ports


def test_services_and_the_optional_prometheus_profile() -> None:
    services = _compose()["services"]
    assert set(services) == {"aenode", "orthanc", "prometheus"}
    assert "profiles" not in services["aenode"] and "profiles" not in services["orthanc"]
    assert services["prometheus"]["profiles"] == ["prometheus"]
    build = services["aenode"]["build"]
    assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == DOCKER / "Dockerfile"
    assert "8180" in (DOCKER / "Dockerfile").read_text().split("EXPOSE", 1)[1].splitlines()[0]


def test_every_mounted_file_exists_and_named_volumes_are_declared() -> None:
    compose = _compose()
    for name, service in compose["services"].items():
        for spec in service.get("volumes", []):
            source, target = spec.split(":")[:2]
            if source.startswith("."):
                assert (DOCKER / source).is_file(), f"{name}: {source} missing"
            else:
                assert source in compose["volumes"], f"{name}: volume {source} not declared"
            assert target.startswith("/")


def test_aenode_environment_is_valid_settings_routing_back_to_orthanc() -> None:
    services = _compose()["services"]
    env = {k: str(v) for k, v in services["aenode"]["environment"].items()}
    settings = load_settings(ROOT / "config.yaml", environ=env)  # what the container loads
    assert settings.http.host == "0.0.0.0" and settings.http.port == 8180
    orthanc = json.loads((DOCKER / "orthanc" / "orthanc.json").read_text())
    (dest,) = settings.export.destinations
    assert (dest.ae_title, dest.host, dest.port) == ("ORTHANC", "orthanc", orthanc["DicomPort"])
    # Orthanc routes to the aenode service on its DICOM port and AE title.
    ae, host, port = orthanc["DicomModalities"]["aenode"]
    assert (ae, host, port) == (settings.node.ae_title, "aenode", settings.node.port)
    assert orthanc["OverwriteInstances"] is True  # results sent again replace the old ones
    ports = _published(services["aenode"])
    assert ports[settings.node.port] == settings.node.port and 8180 in ports
    assert _published(services["orthanc"]) == {4242: 4242, 8042: 8042}


def test_orthanc_loads_the_mounted_routing_script() -> None:
    orthanc_service = _compose()["services"]["orthanc"]
    mounts = dict(spec.split(":")[1::-1] for spec in orthanc_service["volumes"])
    orthanc = json.loads((DOCKER / "orthanc" / "orthanc.json").read_text())
    assert orthanc["LuaScripts"]
    for script in orthanc["LuaScripts"]:
        source = DOCKER / mounts[script]
        assert source.parent == DOCKER / "orthanc" and source.suffix == ".lua"
        assert "/modalities/aenode/store" in source.read_text()


def test_prometheus_scrapes_aenode_metrics() -> None:
    config = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["aenode:8180"]
