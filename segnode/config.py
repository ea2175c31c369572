"""One YAML file -> typed, validated settings.

Every key has a default that works on one machine, so `segnode serve` runs with no file at
all; command-line flags override the file. Unknown keys are errors (a typo must not silently
fall back to a default).
"""

from __future__ import annotations

import ipaddress
import os
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from segnode import strict_yaml
from segnode.datadir import DataDir
from segnode.errors import ConfigurationError


class ConfigError(ConfigurationError):
    """The configuration cannot be used; the message names the key and the reason."""


def default_models_dir() -> Path:
    """SEGNODE_MODELS, else the models shipped inside the package (package data, so it works from a wheel)."""
    env = os.environ.get("SEGNODE_MODELS")
    return Path(env) if env else Path(str(resources.files("segnode") / "shipped_models"))


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _check_ae(value: str) -> str:
    if not (1 <= len(value) <= 16) or any(c in value for c in "\\") or not value.isprintable() or not value.strip():
        raise ValueError("an AE title is 1-16 printable characters, not all spaces, without backslash")
    return value.strip()


class PeerRule(_Model):
    """One allowed peer: its calling AE title (or '*') and the addresses it may come from."""

    ae_title: str = "*"
    hosts: list[str] = Field(default_factory=lambda: ["127.0.0.1/32", "::1/128"])

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return v if v == "*" else _check_ae(v)

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, v: list[str]) -> list[str]:
        for h in v:
            ipaddress.ip_network(h, strict=False)  # raises ValueError with the bad value
        return v

    def matches(self, ae_title: str, ip: str) -> bool:
        if self.ae_title not in ("*", ae_title):
            return False
        addr = ipaddress.ip_address(ip)
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped  # a dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d
        return any(addr in ipaddress.ip_network(h, strict=False) for h in self.hosts)


class TLSConfig(_Model):
    enabled: bool = False
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = Field(None, description="CA bundle for client certificates")
    require_client_cert: bool = False

    @model_validator(mode="after")
    def _files(self) -> "TLSConfig":
        if self.enabled and not (self.cert_file and self.key_file):
            raise ValueError("enabled: true needs cert_file and key_file (PEM certificate and private key)")
        if self.require_client_cert and not self.ca_file:
            raise ValueError("tls.require_client_cert needs ca_file")
        return self


class DimseConfig(_Model):
    ae_title: str = "SEGNODE"
    host: str = "127.0.0.1"
    port: int = Field(11112, ge=0, le=65535)
    check_called_ae: bool = True
    max_pdu: int = Field(4 * 1024 * 1024, ge=4096, le=64 * 1024 * 1024, description="largest PDU accepted")
    max_associations: int = Field(32, ge=1, le=1024)
    acse_timeout: float = Field(30.0, gt=0)
    network_timeout: float = Field(60.0, gt=0)
    allowed_peers: list[PeerRule] | None = Field(
        None, description="None accepts any peer (a warning is logged); [] accepts none"
    )
    tls: TLSConfig = Field(default_factory=TLSConfig)

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae(v)))


class HttpConfig(_Model):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    token: SecretStr | None = Field(None, description="bearer token required by STOW-RS and the API when set")
    header_timeout: float = Field(10.0, gt=0, description="s from connection (or last response) to complete headers")
    body_idle_timeout: float = Field(30.0, gt=0, description="s a request body may stall")
    min_body_rate: int = Field(1024, ge=1, description="bytes/s a request body must average once it has "
                               "been arriving for body_idle_timeout s (a trickle holds a connection at a cost)")
    keep_alive_timeout: float = Field(5.0, gt=0, description="s an idle kept-alive connection stays open")
    max_connections: int = Field(256, ge=1, le=65536, description="open connections at once; when full, the "
                                 "one waiting longest for request headers is closed, else the new one")
    viewer_url: str | None = Field(None, pattern=r"^https?://.*\{study_uid\}", description="the dashboard links each "
                                   "study to it, {study_uid} replaced, e.g. http://pacs:8042/ohif/viewer?"
                                   "StudyInstanceUIDs={study_uid}")


class SopClassPolicy(_Model):
    """Which SOP classes are stored (segnode.dicom.sop_classes): by default every storage class of the
    standard and private ones; `deny` takes some out, `allow` (when set) keeps only those."""

    private: bool = True
    deny: list[str] = Field(default_factory=list)
    allow: list[str] | None = None

    @field_validator("deny", "allow")
    @classmethod
    def _uids(cls, value: list[str] | None) -> list[str] | None:
        from segnode.dicom.uids import is_valid_uid

        bad = [v for v in value or [] if not is_valid_uid(v)]
        if bad:
            raise ValueError(f"not valid UIDs: {', '.join(map(repr, bad))}")
        return value


class StorageConfig(_Model):
    fsync: bool = True
    sop_classes: SopClassPolicy = Field(default_factory=SopClassPolicy)
    max_inflated_mb: int = Field(1024, ge=1, description="a deflated dataset inflating to more is refused (0xC210)")
    free_space_floor_mb: int = Field(512, ge=0, description="below it C-STORE/STOW answer out of resources")
    free_space_watermark_mb: int = Field(1024, ge=0, description="below it new associations are rejected (transient)")

    @model_validator(mode="after")
    def _order(self) -> "StorageConfig":
        if self.free_space_watermark_mb < self.free_space_floor_mb:
            raise ValueError("free_space_watermark_mb must be >= free_space_floor_mb")
        return self


class ClientTLS(_Model):
    enabled: bool = False
    ca_file: Path | None = Field(None, description="CA bundle that signed the peer's certificate")
    cert_file: Path | None = Field(None, description="our certificate, when the peer asks for one")
    key_file: Path | None = None


class Destination(_Model):
    """Where results go: a DIMSE peer (C-STORE) or a DICOMweb server (STOW-RS). With `orthanc_url`,
    delivery is confirmed by asking that Orthanc's REST API for every instance sent."""

    kind: Literal["dimse", "dicomweb"]
    ae_title: str | None = Field(None, max_length=16)
    host: str | None = None
    port: int | None = Field(None, ge=1, le=65535)
    tls: ClientTLS = Field(default_factory=ClientTLS)
    url: str | None = Field(None, description="DICOMweb root, e.g. http://pacs:8042/dicom-web")
    username: str | None = None
    password: SecretStr | None = None
    token: SecretStr | None = Field(None, description="bearer token (DICOMweb)")
    orthanc_url: str | None = Field(None, description="Orthanc REST root used to confirm delivery")
    timeout: float = Field(60.0, gt=0)

    @model_validator(mode="after")
    def _complete(self) -> "Destination":
        if self.kind == "dimse" and not (self.ae_title and self.host and self.port):
            raise ValueError("a dimse destination needs ae_title, host and port")
        if self.kind == "dicomweb" and not self.url:
            raise ValueError("a dicomweb destination needs url")
        return self


class RoutingConfig(_Model):
    rules: Path | None = Field(None, description="rule file (YAML); default: the built-in rules")
    stable_seconds: float = Field(10.0, gt=0, description="a study is complete after this long without an instance")
    poll_seconds: float = Field(1.0, gt=0, description="how often completion looks for quiet studies")
    default_destinations: list[str] = Field(default_factory=list,
                                            description="where results go when the matching rule names none")


class JobsConfig(_Model):
    """Workers, and how jobs are retried: a failure that may pass later waits backoff_seconds * 2**(n-1)
    after try n, at most backoff_max_seconds; one that cannot (segnode.errors) ends the job at once."""

    workers: int = Field(1, ge=0, le=64, description="worker processes (0: receive and route only)")
    max_attempts: int = Field(3, ge=1, description="tries before a segmentation job is dead")
    delivery_attempts: int = Field(16, ge=1, description="tries before a delivery is dead; with the default backoff "
                                                         "they span 5 h: a PACS outage of 4 h loses nothing")
    backoff_seconds: float = Field(30.0, ge=0, description="first retry delay; doubles with each try")
    backoff_max_seconds: float = Field(1800.0, gt=0, description="the longest delay between two tries")
    lease_seconds: float = Field(120.0, gt=0, description="a running job not renewed for this long is requeued")
    device: str = Field("auto", description="inference device: auto (CUDA when present), cpu, cuda, cuda:N")
    models_dir: Path | None = Field(None, description="model folders; default SEGNODE_MODELS or the shipped ones")
    warm_up: bool = Field(True, description="load the rules' models (and run one batch) when a worker starts, so "
                                            "the first study does not wait for it")
    executor: Literal["local", "celery"] = Field("local", description="local: the node's worker processes run "
                                                 "every job; celery: segmentations go through the broker to "
                                                 "`segnode worker` hosts, deliveries stay on the node")
    broker_url: SecretStr | None = Field(None, description="Celery broker (executor celery), e.g. "
                                         "amqp://segnode:secret@rabbitmq:5672//")
    queues: dict[str, str] = Field(default_factory=dict, description="model -> broker queue (e.g. a device class: "
                                   "gpu); a model not named goes to queue segnode.<model>")
    max_result_mb: int = Field(2048, ge=1, description="largest result a remote worker may return (MB)")

    @model_validator(mode="after")
    def _broker(self) -> "JobsConfig":
        if self.executor == "celery" and self.broker_url is None:
            raise ValueError("jobs.executor celery needs jobs.broker_url")
        return self


class OutputsConfig(_Model):
    seg_type: Literal["BINARY", "LABELMAP"] = Field("BINARY", description="DICOM-SEG encoding (LABELMAP: JPEG-LS)")
    secondary_capture: bool = Field(False, description="also send RGB images with the contours burned in, for "
                                                        "viewers that cannot show DICOM-SEG")


class SyslogDestination(_Model):
    """An audit record repository (ATNA): DICOM audit messages over syslog (segnode.audit.atna)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="names its cursor file and log lines")
    host: str
    port: int = Field(6514, ge=1, le=65535)
    transport: Literal["tls", "tcp", "udp"] = Field("tls", description="tls: RFC 5425; tcp: RFC 6587 octet "
                                                    "counting, no encryption; udp: RFC 5426 (may lose messages)")
    ca_file: Path | None = Field(None, description="CA bundle that signed the collector's certificate (tls)")
    cert_file: Path | None = Field(None, description="our certificate, for collectors that ask for one (tls)")
    key_file: Path | None = None
    timeout: float = Field(10.0, gt=0, description="s to connect or send before retrying")

    @model_validator(mode="after")
    def _tls_files(self) -> "SyslogDestination":
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError(f"audit.syslog {self.name}: cert_file and key_file go together")
        return self


class AuditConfig(_Model):
    syslog: list[SyslogDestination] = Field(default_factory=list, description="ATNA audit record repositories")
    source_id: str | None = Field(None, max_length=64, description="AuditSourceID in the messages (default: "
                                  "dimse.ae_title)")

    @model_validator(mode="after")
    def _unique(self) -> "AuditConfig":
        names = [d.name for d in self.syslog]
        if len(names) != len(set(names)):
            raise ValueError("audit.syslog: each destination needs its own name")
        return self


class Settings(_Model):
    data_dir: Path = Path("segnode-data")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default SQLite in data_dir")
    log_level: str = "INFO"
    dimse: DimseConfig = Field(default_factory=DimseConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    jobs: JobsConfig = Field(default_factory=JobsConfig)
    outputs: OutputsConfig = Field(default_factory=OutputsConfig)
    destinations: dict[str, Destination] = Field(default_factory=dict)
    audit: AuditConfig = Field(default_factory=AuditConfig)

    @model_validator(mode="after")
    def _known_destinations(self) -> "Settings":
        unknown = [d for d in self.routing.default_destinations if d not in self.destinations]
        if unknown:
            raise ValueError(f"routing.default_destinations names {', '.join(unknown)}, not among destinations "
                             f"({', '.join(self.destinations) or 'none configured'})")
        return self

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        if v.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError("log_level is one of DEBUG, INFO, WARNING, ERROR")
        return v.upper()

    @property
    def models_root(self) -> Path:
        """`jobs.models_dir`, else SEGNODE_MODELS, else the models shipped with the package."""
        return self.jobs.models_dir or default_models_dir()

    @property
    def data(self) -> DataDir:
        """The data directory's layout."""
        return DataDir(self.data_dir)

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data.database.resolve()}"


def _format(err: ValidationError, source: str) -> str:
    """One line per problem, after the file: 'invalid configuration in FILE: KEY: what is wrong; KEY: ...'."""
    problems = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        problems.append(f"{key}: {e['msg'].removeprefix('Value error, ')}")
    return f"invalid configuration in {source}: " + "; ".join(problems)


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in override.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_settings(path: Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Read `path` (optional), apply `overrides` (nested dict from flags), validate."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            loaded = strict_yaml.load(Path(path).read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"configuration file {path} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"configuration file {path} must hold a mapping at the top level")
        raw = loaded
    raw = _merge(raw, overrides or {})
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format(exc, source)) from exc
