"""The node's configuration: embedded defaults, a TOML file, ``TRIAGE_*`` variables.

Precedence (highest first): values passed in code, environment variables, the TOML file
named by ``--config`` or ``TRIAGE_CONFIG``, the defaults below. Nested settings use
``__`` in variable names: ``TRIAGE_RECEIVE__PORT=104``, ``TRIAGE_STORAGE__DATABASE_URL=
postgresql://triage@db/triage``. Lists and tables are given as JSON in variables
(``TRIAGE_RECEIVE__ALLOWED_CALLING_AES='["PACS1","PACS2"]'``).

A bad value fails at start-up with :class:`ConfigError`, whose message names the setting
and its variable.
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from ipaddress import ip_network
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

__all__ = ["ConfigError", "Settings", "load_settings"]

KINDS = ("cxr", "bct", "chestct")
_config_file: ContextVar[Path | None] = ContextVar("triage_config_file", default=None)


class ConfigError(ValueError):
    """The configuration is invalid; the message names each bad setting."""


def _ae_title(v: str) -> str:
    if not 1 <= len(v.strip()) <= 16 or "\\" in v or not v.isascii() or not v.isprintable():
        raise ValueError("an AE title is 1-16 printable ASCII characters without backslash")
    return v.strip()


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NodeSettings(_Section):
    data_dir: Path = Path("triage-data")  # database and blobs live here unless set below
    name: str = "triage-node"  # shown on the pages and in notifications


class StorageSettings(_Section):
    database_url: str = ""  # default: sqlite:///<data_dir>/triage.db
    blob_root: Path | None = None  # default: <data_dir>/blobs
    high_water: float = Field(0.95, gt=0, le=1)  # refuse (0xA700) above this disk use fraction
    fsync: bool = True  # never turn off in production: acknowledgement means durable


class TLSSettings(_Section):
    certificate: Path  # PEM certificate (chain) of this side
    key: Path  # PEM private key of the certificate
    client_ca: Path | None = None  # when set, clients must present a certificate it signed


class ReceiveSettings(_Section):
    ae_title: str = "TRIAGE"  # the node's AE title (the PACS sends to it)
    host: str = "0.0.0.0"  # listening address
    port: int = Field(11112, ge=0, le=65535)  # 0: any free port (tests)
    allowed_calling_aes: list[str] = []  # empty: any
    allowed_networks: list[str] = []  # CIDR, e.g. "10.1.0.0/16"; empty: any
    require_called_ae: bool = True  # refuse associations addressed to another AE title
    max_associations: int = Field(16, ge=1)  # concurrent associations; more are rejected (transient)
    acse_timeout: float = Field(30, gt=0)  # seconds for association negotiation
    dimse_timeout: float = Field(60, gt=0)  # seconds for a DIMSE message
    network_timeout: float = Field(60, gt=0)  # seconds of network silence before an association is aborted
    max_pdu: int = Field(0, ge=0)  # 0: unlimited, the fastest for large images
    max_side: int = Field(16384, ge=64)  # Rows/Columns above this are refused before decoding
    max_frames: int = Field(4096, ge=1)  # NumberOfFrames above this is refused before decoding
    tls: TLSSettings | None = None

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return _ae_title(v)

    @field_validator("allowed_calling_aes")
    @classmethod
    def _aes(cls, v: list[str]) -> list[str]:
        return [_ae_title(a) for a in v]

    @field_validator("allowed_networks")
    @classmethod
    def _nets(cls, v: list[str]) -> list[str]:
        for n in v:
            ip_network(n, strict=False)
        return v


class AssembleSettings(_Section):
    quiet_seconds: float = Field(5.0, gt=0)  # a series is complete after this long without a new instance
    early_finish: bool = True  # ... or at association release when it is geometrically complete
    poll_seconds: float = Field(0.5, gt=0)  # how often the assembler looks for quiet series
    spacing_tolerance: float = Field(0.05, ge=0, lt=1)  # relative slice-gap deviation still uniform


class RouteRule(_Section):
    """One routing rule; the first rule whose every given condition holds decides."""

    name: str  # shown as the routing reason
    # the model kind a matching series goes to (ignore: none)
    kind: Literal["cxr", "bct", "chestct", "ignore"]
    modalities: list[str] = []  # e.g. ["CT"]; empty: any
    sop_classes: list[str] = []  # SOP Class UIDs; empty: any
    body_parts: list[str] = []  # words searched in BodyPartExamined and descriptions
    exclude_words: list[str] = []  # any of these in the descriptions: no match
    image_types: list[str] = []  # any of these values in ImageType matches (e.g. LOCALIZER)
    view_positions: list[str] = []  # CXR: PA, AP
    axial: bool | None = None  # slices perpendicular to the feet-head axis (within 10 degrees)
    min_slice_mm: float | None = None  # slice thickness bounds (CT)
    max_slice_mm: float | None = None  # slice thickness bounds (CT)
    min_slices: int | None = None  # fewer slices: not this rule


def default_rules() -> list[RouteRule]:
    chest = ["CHEST", "THORAX", "LUNG", "THORAC", "CXR", "PULM"]
    head = ["HEAD", "BRAIN", "SKULL", "CRAN", "NEURO", "CEREB"]
    # CR and DX "for presentation" (DX "for processing" is raw detector data)
    image_sops = ["1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1"]
    return [
        RouteRule(name="localizer", kind="ignore", image_types=["LOCALIZER", "SCOUT", "TOPOGRAM"]),
        RouteRule(name="chest radiograph, frontal", kind="cxr", modalities=["CR", "DX"],
                  sop_classes=image_sops, body_parts=chest, view_positions=["PA", "AP"]),
        RouteRule(name="head CT, axial, 2.5-7 mm", kind="bct", modalities=["CT"],
                  sop_classes=["1.2.840.10008.5.1.4.1.1.2"], body_parts=head, axial=True,
                  min_slice_mm=2.5, max_slice_mm=7.0, min_slices=10),
        RouteRule(name="chest CT, axial, <= 3 mm", kind="chestct", modalities=["CT"],
                  sop_classes=["1.2.840.10008.5.1.4.1.1.2"], body_parts=chest, axial=True,
                  max_slice_mm=3.0, min_slices=20),
    ]


class RouteSettings(_Section):
    rules: list[RouteRule] = Field(default_factory=default_rules)


class ModelSettings(_Section):
    """Bundle directories per kind; a kind without a bundle is routed but fails with a reason."""

    cxr: Path | None = None  # bundle for chest radiographs
    bct: Path | None = None  # bundle for head CT (whole-volume posterior)
    chestct: Path | None = None  # a patch bundle (CT-3DFlow map) or a whole-volume bundle
    bct_patch: Path | None = None  # optional patch bundle for head CT maps
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1"


class Destination(_Section):
    """A DICOM node the results are sent to (C-STORE SCU)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")  # used in logs, pages and the API
    ae_title: str  # the destination's AE title
    host: str  # host name or address
    port: int = Field(ge=1, le=65535)  # DICOM port
    min_priority: int | None = Field(None, ge=1, le=4)  # only results at or above (1 = urgent); None: all
    tls: TLSSettings | None = None  # client side: certificate/key of the node, client_ca = CA to trust

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return _ae_title(v)


class DispatchSettings(_Section):
    """Where SR/SEG go and how failed deliveries are retried."""

    destinations: list[Destination] = []  # none: results stay on the node (web page, API)
    calling_ae_title: str = "TRIAGE"  # the node's AE title when it sends
    backoff_initial_seconds: float = Field(5.0, gt=0)  # first retry delay, doubled per attempt
    backoff_max_seconds: float = Field(600.0, gt=0)  # longest retry delay
    jitter: float = Field(0.2, ge=0, le=1)  # +- this fraction of each delay, so retries spread out
    max_age_seconds: float = Field(7 * 24 * 3600.0, gt=0)  # then the delivery is a dead letter
    poll_seconds: float = Field(1.0, gt=0)  # how often due deliveries are looked for
    timeout_seconds: float = Field(30.0, gt=0)  # association and DIMSE timeouts
    key_images: bool = False  # also Secondary Capture heat-map images, for viewers without SEG

    @field_validator("calling_ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return _ae_title(v)


def _http_url(v: str) -> str:
    parts = urlsplit(v)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("an http:// or https:// URL with a host is needed")
    return v


_RECEIVER_NAME = r"^[A-Za-z0-9_.-]{1,64}$"


class Webhook(_Section):
    """An HTTP endpoint that gets a signed JSON POST per notified result."""

    name: str = Field(pattern=_RECEIVER_NAME)  # unique among receivers
    url: str  # http(s) URL the JSON is POSTed to
    secret: SecretStr | None = None  # HMAC key of X-Triage-Signature; or secret_file
    secret_file: Path | None = None  # a file holding the key (surrounding whitespace ignored)
    timeout_seconds: float = Field(10.0, gt=0)  # per request
    verify_tls: bool = True  # check the server certificate (https)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return _http_url(v)

    @model_validator(mode="after")
    def _one_secret(self) -> Webhook:
        if (self.secret is None) == (self.secret_file is None):
            raise ValueError("give exactly one of secret and secret_file")
        if self.secret_file is not None:  # read now: a missing file fails at start-up
            try:
                key = self.secret_file.read_text().strip()
            except OSError as exc:
                raise ValueError(f"cannot read secret_file: {exc.strerror}") from None
            self.secret = SecretStr(key)
        if not self.key():
            raise ValueError("the secret is empty")
        return self

    def key(self) -> bytes:
        return self.secret.get_secret_value().encode() if self.secret is not None else b""


class Hl7Receiver(_Section):
    """A RIS (or interface engine) that takes HL7 v2.5.1 ORU^R01 messages over MLLP."""

    name: str = Field(pattern=_RECEIVER_NAME)  # unique among receivers
    host: str  # the RIS's MLLP listener
    port: int = Field(ge=1, le=65535)  # its port
    sending_application: str = "TRIAGE"  # MSH-3
    sending_facility: str = ""  # MSH-4
    receiving_application: str = ""  # MSH-5
    receiving_facility: str = ""  # MSH-6
    timeout_seconds: float = Field(30.0, gt=0)  # connecting, and then waiting for the ACK


class NotifySettings(_Section):
    """Webhooks and HL7 messages for results at or above ``min_priority``; retried with
    dispatch's backoff settings."""

    min_priority: int = Field(2, ge=1, le=4)  # 1 urgent .. 4 routine; 2: urgent and abnormal
    webhooks: list[Webhook] = []
    hl7: list[Hl7Receiver] = []
    include_patient_id: bool = False  # in webhook bodies (HL7 messages always carry it)
    base_url: str | None = None  # the web page's public address, for study links
    max_age_seconds: float = Field(24 * 3600.0, gt=0)  # then the notification is a dead letter

    @field_validator("base_url")
    @classmethod
    def _base(cls, v: str | None) -> str | None:
        return None if v is None else _http_url(v)

    @model_validator(mode="after")
    def _unique(self) -> NotifySettings:
        names = [w.name for w in self.webhooks] + [h.name for h in self.hl7]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"receiver names must be unique across webhooks and hl7; used twice: "
                             f"{', '.join(twice)}")
        return self


class WebSettings(_Section):
    enabled: bool = True  # triage serve also serves the web page and API
    host: str = "127.0.0.1"  # behind a TLS reverse proxy in production
    port: int = Field(8080, ge=0, le=65535)  # 0: any free port (tests)


class RankSettings(_Section):
    """Priority levels (1 urgent .. 4 routine); "abnormal" itself is the bundle's calibrated threshold."""

    urgent_percentile: float = Field(99.0, gt=0, le=100)  # abnormal and at least this percentile
    borderline_percentile: float = Field(90.0, gt=0, le=100)  # normal but at least this percentile
    urgent_volume_factor: float = Field(4.0, ge=1)  # maps: abnormal volume >= factor x T is urgent


class ExecutorSettings(_Section):
    kind: Literal["local", "celery"] = "local"  # local: threads in triage serve; celery: workers via Redis
    threads: int = Field(1, ge=1)  # local executor: concurrent analyses in the serve process
    lease_seconds: float = Field(1800, gt=0)  # a running job not finished by then is re-queued
    max_attempts: int = Field(3, ge=1)  # a crashing job is retried up to this often
    poll_seconds: float = Field(0.5, gt=0)  # how often queued jobs are looked for
    heartbeat_seconds: float = Field(10.0, gt=0)  # workers' "alive" beat for the dashboard


class CelerySettings(_Section):
    broker_url: str = "redis://127.0.0.1:6379/0"  # Redis only (redis:// or rediss://); a password goes here
    visibility_timeout: int = Field(7200, gt=0)  # > the longest analysis, or Redis redelivers it
    republish_seconds: float = Field(600, gt=0)  # dispatcher re-publishes queued jobs after this

    @field_validator("broker_url")
    @classmethod
    def _redis(cls, v: str) -> str:
        if not v.startswith(("redis://", "rediss://", "sentinel://")):
            raise ValueError("only a Redis broker is supported (redis://, rediss://, sentinel://)")
        return v


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TRIAGE_", env_nested_delimiter="__",
                                      extra="forbid", nested_model_default_partial_update=True)

    node: NodeSettings = NodeSettings()
    storage: StorageSettings = StorageSettings()
    receive: ReceiveSettings = ReceiveSettings()
    assemble: AssembleSettings = AssembleSettings()
    route: RouteSettings = RouteSettings()
    models: ModelSettings = ModelSettings()
    executor: ExecutorSettings = ExecutorSettings()
    dispatch: DispatchSettings = DispatchSettings()
    notify: NotifySettings = NotifySettings()
    rank: RankSettings = RankSettings()
    web: WebSettings = WebSettings()
    celery: CelerySettings = CelerySettings()

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings],
                                   init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = _config_file.get()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return (*sources, file_secret_settings)

    @property
    def database_url(self) -> str:
        return self.storage.database_url or f"sqlite:///{(self.node.data_dir / 'triage.db').resolve()}"

    @property
    def blob_root(self) -> Path:
        return self.storage.blob_root or self.node.data_dir / "blobs"


def _env_name(loc: tuple[int | str, ...]) -> str:
    """The variable that sets ``loc``; inside a list that is the whole list (as JSON)."""
    parts = []
    for p in loc:
        if isinstance(p, int):
            break
        parts.append(str(p).upper())
    return "TRIAGE_" + "__".join(parts)


def load_settings(config_file: Path | None = None, **overrides: object) -> Settings:
    """Settings from ``config_file`` (or ``$TRIAGE_CONFIG``), the environment and overrides."""
    path = config_file or (Path(os.environ["TRIAGE_CONFIG"]) if os.environ.get("TRIAGE_CONFIG") else None)
    if path is not None and not path.is_file():
        raise ConfigError(f"configuration file not found: {path}")
    token = _config_file.set(path)
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            dotted = ".".join(str(p) for p in loc)
            lines.append(f"{dotted} ({_env_name(loc)}): {err['msg']}")
        where = f" in {path} or the environment" if path else " in the environment"
        raise ConfigError(f"invalid configuration{where}:\n  " + "\n  ".join(lines)) from None
    except ValueError as exc:  # TOML syntax errors
        raise ConfigError(f"cannot read configuration {path}: {exc}") from None
    finally:
        _config_file.reset(token)
