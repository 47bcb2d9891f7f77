"""Settings: pydantic models loaded once from YAML, with environment overrides.

Every key is validated at start-up; an unknown key or a bad value is an error
naming the key path (``node.port: must be between 1 and 65535``). Any setting
can be overridden by ``AENODE_<SECTION>__<KEY>`` (``AENODE_NODE__PORT=11113``).
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from aenode.errors import ConfigError
from aenode.select.rules import compile_rules
from aenode.select.spec import RuleSpec
from aenode.tls import client_context, server_context

__all__ = [
    "ConfigError",
    "DestinationSettings",
    "DestinationTlsSettings",
    "ExportSettings",
    "HttpSettings",
    "LoggingSettings",
    "ModelsSettings",
    "NodeSettings",
    "PeerSettings",
    "RaySettings",
    "ResourceSettings",
    "ResultsSettings",
    "RetrySettings",
    "RuntimeSettings",
    "SelectionSettings",
    "SeriesSettings",
    "Settings",
    "StorageSettings",
    "TlsSettings",
    "VolumeSettings",
    "load_settings",
]

ENV_PREFIX = "AENODE_"

log = logging.getLogger(__name__)


class _RuleErrors(ValueError):
    """Rule problems found by :func:`compile_rules`, each line already naming its key path."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _ae_title(value: str) -> str:
    if not 1 <= len(value) <= 16 or "\\" in value or not value.isprintable():
        raise ValueError("must be 1 to 16 printable characters without a backslash")
    return value


class PeerSettings(_Section):
    """A calling AE allowed to associate, optionally bound to a host."""

    ae_title: str
    host: str | None = None

    _check_ae = field_validator("ae_title")(_ae_title)


class TlsSettings(_Section):
    """The DICOM TLS listener (PS3.15 B.12, BCP 195: TLS 1.2 or later)."""

    port: int = Field(ge=1, le=65535, description="a port of its own, beside node.port")
    cert: Path = Field(description="PEM certificate (chain) of the node")
    key: Path = Field(description="its unencrypted PEM private key (keep it mode 0600)")
    ca: Path | None = Field(
        default=None, description="PEM CA certificate(s) that client certificates must chain to"
    )
    require_client_cert: bool = Field(
        default=True, description="refuse a peer without a certificate signed by ca"
    )


class NodeSettings(_Section):
    """The DIMSE listener."""

    ae_title: str = "AENODE"
    host: str = "0.0.0.0"
    port: int | None = Field(default=11112, description="the plain port; null turns it off")
    tls: TlsSettings | None = Field(default=None, description="null: no TLS listener")
    check_called_ae: bool = True
    allowed_peers: list[PeerSettings] | None = Field(
        default=None, description="calling AEs allowed to associate; null accepts any"
    )
    max_associations: int = Field(default=16, ge=1, le=1000)
    max_pdu_size: int = Field(default=0, ge=0, description="0 means unlimited")
    accept_unknown_storage: bool = True
    receivers: int = Field(
        default=0,
        ge=0,
        le=64,
        description=(
            "receiving processes sharing the port (SO_REUSEPORT); 0 picks twice the CPU count, "
            "at most 16"
        ),
    )
    stop_timeout_seconds: float = Field(
        default=20.0,
        gt=0,
        le=600,
        description="after SIGTERM/SIGINT the node exits within this many seconds in every "
        "state (loading models, receiving, running a job); unfinished jobs resume at the "
        "next start",
    )
    acse_timeout: float = Field(default=30.0, gt=0)
    dimse_timeout: float = Field(default=30.0, gt=0)
    network_timeout: float = Field(default=60.0, gt=0)
    artim_timeout: float = Field(
        default=5.0, gt=0, description="a new connection's A-ASSOCIATE-RQ must arrive within"
    )
    pdu_timeout: float = Field(
        default=15.0, gt=0, description="a started PDU may stall this long before the abort"
    )
    max_pdu_accept_mb: int = Field(
        default=1024, ge=1, description="a peer's PDU declaring more aborts the association"
    )
    listen_backlog: int = Field(default=128, ge=1, le=65535)

    _check_ae = field_validator("ae_title")(_ae_title)

    @field_validator("port")
    @classmethod
    def _port(cls, value: int | None) -> int | None:
        if value is not None and not 1 <= value <= 65535:
            raise ValueError("must be between 1 and 65535")
        return value

    @model_validator(mode="after")
    def _some_port(self) -> NodeSettings:
        if self.port is None and self.tls is None:
            raise ValueError("node.port is null and node.tls is not set: nothing would listen")
        if self.tls is not None and self.tls.port == self.port:
            raise ValueError("node.tls.port must differ from node.port")
        return self

    @property
    def ports(self) -> list[tuple[int, bool]]:
        """The listening ports, each with whether it is the TLS one."""
        out = [] if self.port is None else [(self.port, False)]
        return out + ([] if self.tls is None else [(self.tls.port, True)])

    @property
    def loopback_only(self) -> bool:
        """Whether ``host`` is a loopback address (nothing beyond this machine can connect)."""
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host == "localhost"


class StorageSettings(_Section):
    """Where the spool and the store live."""

    path: Path = Path("./var")
    min_free_mb: int = Field(default=500, ge=0, description="below this, C-STORE answers 0xA700")
    fsync: bool = True
    duplicate_policy: Literal["replace", "keep_first"] = "keep_first"


class SeriesSettings(_Section):
    """When a series is complete."""

    release_grace_seconds: float = Field(default=1.0, ge=0)
    quiet_seconds: float = Field(default=10.0, gt=0)
    max_wait_seconds: float = Field(default=3600.0, gt=0)
    late_instances: Literal["revise", "ignore"] = "revise"
    poll_seconds: float = Field(default=0.05, gt=0)


class SelectionSettings(_Section):
    """Rules mapping series (or studies of several series) to models."""

    study_timeout_seconds: float = Field(
        default=120.0, gt=0, description="a study rule's wait for its roles after the last match"
    )
    rules: list[RuleSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _rules_compile(self) -> SelectionSettings:
        # Meaning (keywords, regular expressions, one kind per condition) is checked at
        # load time; model names against the packages by `aenode config check` and serve.
        try:
            compile_rules(self.rules, prefix="selection.rules")
        except ConfigError as exc:
            raise _RuleErrors(str(exc)) from None
        return self


class VolumeSettings(_Section):
    """How strictly a series must form a regular volume before inference."""

    spacing_tolerance: float = Field(
        default=0.01, gt=0, lt=1, description="relative slice-spacing deviation allowed"
    )
    allow: list[Literal["tilt", "gaps", "spacing"]] = Field(
        default_factory=list,
        description="checks waived (e.g. tilt for gantry-tilted head CT); logged when used",
    )


class ModelsSettings(_Section):
    """Model packages: ``<path>/<name>/model.yaml`` plus weights."""

    path: Path = Path("./models")
    enabled: list[str] | None = Field(default=None, description="null loads every package")


class ResourceSettings(_Section):
    """What one actor of a model asks of the Ray cluster (overrides the card's ``resources``)."""

    num_gpus: float | None = Field(
        default=None, ge=0, description="GPUs per actor, fractional allowed; null keeps the card's"
    )
    num_cpus: float | None = Field(
        default=None, ge=0, description="CPUs per actor; null keeps the card's"
    )


class RaySettings(_Section):
    """The Ray cluster that runs inference when ``runtime.executor`` is ``ray``."""

    address: str | None = Field(
        default=None,
        description='"auto" (a cluster started with ray start on this machine), "HOST:PORT" '
        "(the head's GCS port), or null (start a local Ray inside the node: tests, dev)",
    )
    namespace: str = Field(
        default="aenode", min_length=1, description="Ray namespace of the node's named actors"
    )
    connect_timeout_seconds: float = Field(
        default=10.0, gt=0, description="start-up fails naming runtime.ray.address after this"
    )
    actors_per_model: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="actors (warm copies) per model; null: one per whole GPU in the cluster "
        "for a model that asks for GPUs, else one",
    )
    max_in_flight_per_actor: int = Field(
        default=2, ge=1, le=64, description="jobs handed to one actor at a time (it batches them)"
    )
    resources: dict[str, ResourceSettings] = Field(
        default_factory=dict, description="model name -> num_gpus/num_cpus per actor"
    )

    @field_validator("address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is None or value == "auto":
            return value
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f'must be "auto", "HOST:PORT" or null, got {value!r}')
        return value


class RuntimeSettings(_Section):
    """Inference workers."""

    executor: Literal["local", "ray"] = Field(
        default="local",
        description="local: device threads in the node; ray: warm actors on a Ray cluster "
        "(pip install aenode[ray])",
    )
    ray: RaySettings = Field(default_factory=RaySettings)

    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(
        default=0, ge=0, description="CPU threads for torch in this process; 0 uses every core"
    )
    job_timeout_seconds: float = Field(
        default=600.0, gt=0, description="per job, from submission to result (queueing included)"
    )
    mixed_precision: bool = Field(default=True, description="float16 autocast on CUDA only")
    deterministic: bool = Field(default=True, description="deterministic torch algorithms")

    @model_validator(mode="before")
    @classmethod
    def _renamed_threads(cls, data: Any) -> Any:
        # runtime.torch_threads (first release) is runtime.threads now; still accepted.
        if isinstance(data, dict) and "torch_threads" in data:
            data = dict(data)
            old = data.pop("torch_threads")
            if "threads" in data:
                raise ValueError(
                    "give runtime.threads only (runtime.torch_threads is its old name)"
                )
            data["threads"] = old
            log.warning("runtime.torch_threads is deprecated: it is now runtime.threads")
        return data


class ResultsSettings(_Section):
    """The DICOM objects written for each job."""

    seg: bool = True
    fractional: bool = False
    skip_empty_seg: bool = False
    report: bool = True
    sr: bool = True
    series_number_base: int = Field(default=9000, ge=1, le=2147483647)
    series_description: str = Field(
        default="AI {model} {kind} (aenode)",
        description="template; {model} is the card's name, {kind} SEG, report or SR",
    )
    manufacturer: str = "aenode"
    institution_name: str | None = None

    @field_validator("series_description")
    @classmethod
    def _description(cls, value: str) -> str:
        try:
            value.format(model="m", kind="k")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"bad template (only {{model}} and {{kind}} allowed): {exc}") from exc
        return value


class DestinationTlsSettings(_Section):
    """DICOM TLS to a destination: its certificate is verified, host name or IP included."""

    ca: Path = Field(description="PEM CA certificate(s) the destination's certificate chains to")
    cert: Path | None = Field(default=None, description="our client certificate (PEM)")
    key: Path | None = Field(default=None, description="its unencrypted PEM private key")


class DestinationSettings(_Section):
    """A C-STORE SCP that receives the results."""

    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    tls: DestinationTlsSettings | None = Field(
        default=None, description="null sends in the clear; never downgraded when set"
    )
    storage_commitment: bool = Field(
        default=False,
        description="after storing, ask for Storage Commitment (N-ACTION); the job is "
        "committed only after the N-EVENT-REPORT",
    )

    _check_ae = field_validator("ae_title")(_ae_title)


class RetrySettings(_Section):
    """Export retries: exponential back-off that survives restarts."""

    initial_seconds: float = Field(default=5.0, gt=0)
    max_interval_seconds: float = Field(default=600.0, gt=0)
    give_up_after_seconds: float = Field(default=86400.0, gt=0)
    timeout_seconds: float = Field(default=30.0, gt=0)


class ExportSettings(_Section):
    """Where results go."""

    calling_ae_title: str | None = Field(default=None, description="defaults to node.ae_title")
    destinations: list[DestinationSettings] = Field(default_factory=list)
    retry: RetrySettings = Field(default_factory=RetrySettings)
    commitment_timeout_seconds: float = Field(
        default=300.0,
        gt=0,
        description="a storage commitment report must arrive within; else it is asked again "
        "(with the retry back-off)",
    )


class HttpSettings(_Section):
    """The operations web server inside ``aenode serve``: dashboard, /healthz, /metrics."""

    host: str = Field(default="127.0.0.1", description="bind address; 0.0.0.0 exposes it")
    port: int | None = Field(
        default=8180, ge=1, le=65535, description="null turns the web server off"
    )
    allow_actions: bool = Field(
        default=False, description="allow POST actions (retry a job); needs http.token"
    )
    token: str | None = Field(
        default=None, description="bearer token the actions require (Authorization header)"
    )

    @model_validator(mode="after")
    def _token_for_actions(self) -> HttpSettings:
        if self.allow_actions and not self.token:
            raise ValueError("http.token: required when http.allow_actions is true")
        return self


class LoggingSettings(_Section):
    """Console logging, configured by the CLI only."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_format: bool = Field(default=False, alias="json")
    phi: bool = Field(default=False, description="allow patient name, ID, birth date in logs")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Settings(_Section):
    """All of aenode's settings."""

    node: NodeSettings = Field(default_factory=NodeSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    series: SeriesSettings = Field(default_factory=SeriesSettings)
    selection: SelectionSettings = Field(default_factory=SelectionSettings)
    volume: VolumeSettings = Field(default_factory=VolumeSettings)
    models: ModelsSettings = Field(default_factory=ModelsSettings)
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)
    results: ResultsSettings = Field(default_factory=ResultsSettings)
    export: ExportSettings = Field(default_factory=ExportSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)

    @property
    def calling_ae(self) -> str:
        """Our AE title when we associate: ``export.calling_ae_title``, else ``node.ae_title``."""
        return self.export.calling_ae_title or self.node.ae_title


def key_path(loc: tuple[int | str, ...]) -> str:
    """A pydantic error location as aenode spells key paths: ``selection.rules[0].name``."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "(root)"


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        cause = err.get("ctx", {}).get("error")
        if isinstance(cause, _RuleErrors):
            lines.extend(str(cause).splitlines())
            continue
        path = key_path(err["loc"])
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{path}: {msg}")
    return f"{source}: invalid configuration\n  " + "\n  ".join(lines)


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        keys = [k.lower() for k in name[len(ENV_PREFIX) :].split("__")]
        if not all(keys):
            raise ConfigError(f"{name}: malformed override (use AENODE_SECTION__KEY)")
        node = data
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{name}: {'.'.join(keys)} is not a section")
            node = child
        node[keys[-1]] = yaml.safe_load(raw) if raw != "" else ""
    return data


def load_settings(
    path: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Load and validate settings from YAML plus ``AENODE_*`` overrides.

    Parameters
    ----------
    path : str or pathlib.Path or None
        YAML file; ``None`` uses the defaults only.
    environ : Mapping[str, str] or None
        Environment to read overrides from; defaults to ``os.environ``.

    Returns
    -------
    Settings
        The validated settings. Relative paths stay relative to the working directory.

    Raises
    ------
    ConfigError
        If the file cannot be read or parsed, or a key is unknown or invalid;
        the message names the file and each offending key path.
    """
    source = str(path) if path is not None else "(defaults)"
    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read configuration: {exc.strerror}") from exc
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of sections")
        data = loaded
    data = _apply_env(data, os.environ if environ is None else environ)
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from exc
    problems = tls_problems(settings)
    if problems:
        raise ConfigError(f"{source}: invalid configuration\n  " + "\n  ".join(problems))
    return settings


def tls_problems(settings: Settings) -> list[str]:
    """Load every TLS file the settings name; one line per problem, naming the key path.

    Files exist and parse and each key matches its certificate (``ssl`` checks it).
    """
    problems = []
    tls = settings.node.tls
    if tls is not None:
        try:
            server_context(tls.cert, tls.key, tls.ca, tls.require_client_cert)
        except ConfigError as exc:
            problems.append(str(exc))
    for i, dest in enumerate(settings.export.destinations):
        if dest.tls is not None:
            try:
                prefix = f"export.destinations[{i}].tls"
                client_context(dest.tls.ca, dest.tls.cert, dest.tls.key, prefix)
            except ConfigError as exc:
                problems.append(str(exc))
    return problems
