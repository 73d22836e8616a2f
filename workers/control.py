"""Live deployments: the records of the control and audit topics, and the artifact digest.

A *deployment* says, for one route of one consumer group, which model is the primary, which
(if any) is the canary and for what share of events, and which models score in shadow. It is
one JSON record on the compacted control topic (``[topics] control``), keyed
``<group_id>/<route>``, so the topic's latest record per key is the deployment in force. Every
replica follows the topic (:class:`workers.lifecycle.ControlFollower`); ``sluice models
deploy|rollback`` write it (:mod:`workers.models_cli`). Schema: ``schemas/records/deployment.json``::

    {"type": "sluice.deployment", "format": 1, "group": "sluice-flows", "route": "flow_classifier",
     "deployment": "flow_classifier-20261130T170102Z-3fa2c1", "kind": "deploy",
     "created_at": 1764522062.1,
     "primary": {"path": "models/flow_classifier", "name": "flow_classifier", "version": "1.0.0",
                 "sha256": "…", "backend": null, "device": null},
     "canary": {... as primary ..., "fraction": 0.1} | null,
     "shadow": [{... as primary ...}],
     "reason": "weekly retrain", "requested_by": {"user": "ana", "host": "ops-1", "tool": "sluice models deploy"},
     "supersedes": "<the deployment id it replaced>" | null,
     "history": [<earlier deployments of the route, newest first, without their own history>]}

``kind`` is ``deploy``, ``rollback`` (an operator's) or ``guard_rollback`` (the canary guard's).
``history`` lets ``rollback`` restore the previous deployment although compaction keeps only the
latest record; it is capped at :data:`HISTORY_LIMIT`.

An *audit record* (``[topics] audit``, key ``<group_id>/<route>``, ``schemas/records/audit.json``)
is written by a replica in the same transaction as the first outputs it produces under a
deployment on some partitions (``event: "applied"``, with the first input offset per partition),
when it refuses a deployment whose models do not load or do not pass their check (``refused``),
and when its canary guard rolls a canary back (``guard_rollback``).

The model digest (``sha256``) covers every file of the model folder (names and contents, in name
order, caches excluded), so two folders with the same version but different weights differ.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import pathlib
import secrets
import socket
import time
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

DEPLOYMENT_TYPE = "sluice.deployment"
AUDIT_TYPE = "sluice.audit"
FORMAT_VERSION = 1
# How many earlier deployments a record carries for rollback: enough for any realistic chain of
# rollbacks, small enough that a record stays a few kB.
HISTORY_LIMIT = 20
# Files of a model folder that are not artifacts (caches written next to the model).
_NOT_ARTIFACTS = ("__pycache__", ".pyc", ".trt-cache", ".engine-cache")
_HASH_CHUNK = 1 << 20


class ControlRecordError(ValueError):
    """A control or audit record that does not follow the format (named field, why)."""


def artifacts_sha256(path: str | os.PathLike) -> str:
    """SHA-256 over a model folder's files: relative name and content of each, in name order."""
    root = pathlib.Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: model folder not found")
    digest = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file()
                   and not any(part.endswith(_NOT_ARTIFACTS) or part in _NOT_ARTIFACTS for part in p.parts))
    for p in files:
        rel = p.relative_to(root).as_posix().encode()
        digest.update(len(rel).to_bytes(4, "big") + rel)
        digest.update(p.stat().st_size.to_bytes(8, "big"))
        with open(p, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelRef:
    """One model of a deployment: where it is, what it is, and its exact artifacts."""

    path: str
    name: str
    version: str
    sha256: str
    backend: str | None = None   # None: the route's [model] backend
    device: str | None = None    # None: the route's [model] device

    @classmethod
    def from_folder(cls, path: str | os.PathLike, backend: str | None = None, device: str | None = None) -> "ModelRef":
        """Read the manifest's name and version and digest the folder (raises ValueError if not a model)."""
        from workers.features import ModelSpec

        spec = ModelSpec.load(path)
        return cls(str(path), spec.name, spec.version, artifacts_sha256(spec.path), backend, device)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "name": self.name, "version": self.version, "sha256": self.sha256,
                "backend": self.backend, "device": self.device}

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "ModelRef":
        if not isinstance(d, dict):
            raise ControlRecordError(f"{where}: expected an object, got {type(d).__name__}")
        try:
            return cls(str(d["path"]), str(d["name"]), str(d["version"]), str(d["sha256"]),
                       d.get("backend"), d.get("device"))
        except KeyError as exc:
            raise ControlRecordError(f"{where}: missing {exc.args[0]!r}") from None

    def lineage(self) -> dict[str, str]:
        """The ``model`` object of a score record."""
        return {"name": self.name, "version": self.version, "sha256": self.sha256}


@dataclass(frozen=True)
class Deployment:
    """What one route of one group runs: primary, optional canary (with its share), shadows."""

    group: str
    route: str
    id: str
    primary: ModelRef
    canary: ModelRef | None = None
    fraction: float = 0.0
    shadow: tuple[ModelRef, ...] = ()
    kind: str = "deploy"
    reason: str = ""
    requested_by: dict[str, str] = field(default_factory=dict)
    created_at: float = 0.0
    supersedes: str | None = None
    history: tuple[dict[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.canary is not None and not 0.0 < self.fraction < 1.0:
            raise ControlRecordError(f"deployment {self.id}: canary fraction must lie in (0, 1), got {self.fraction}")
        if self.canary is None and self.fraction:
            raise ControlRecordError(f"deployment {self.id}: a fraction without a canary")

    @property
    def key(self) -> bytes:
        return control_key(self.group, self.route)

    def models(self) -> list[tuple[str, ModelRef]]:
        """(role, model) for every model the deployment loads."""
        out = [("primary", self.primary)]
        if self.canary is not None:
            out.append(("canary", self.canary))
        out += [("shadow", m) for m in self.shadow]
        return out

    def to_dict(self, with_history: bool = True) -> dict[str, Any]:
        d: dict[str, Any] = {
            "type": DEPLOYMENT_TYPE, "format": FORMAT_VERSION, "group": self.group, "route": self.route,
            "deployment": self.id, "kind": self.kind, "created_at": self.created_at,
            "primary": self.primary.to_dict(),
            "canary": None if self.canary is None else {**self.canary.to_dict(), "fraction": self.fraction},
            "shadow": [m.to_dict() for m in self.shadow],
            "reason": self.reason, "requested_by": dict(self.requested_by), "supersedes": self.supersedes,
        }
        if with_history:
            d["history"] = list(self.history)
        return d

    def encode(self) -> bytes:
        return orjson.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: Any) -> "Deployment":
        if not isinstance(d, dict) or d.get("type") != DEPLOYMENT_TYPE:
            raise ControlRecordError(f"not a deployment record (type {d.get('type') if isinstance(d, dict) else d!r})")
        if d.get("format") != FORMAT_VERSION:
            raise ControlRecordError(f"deployment record format {d.get('format')!r}; this Sluice reads {FORMAT_VERSION}")
        try:
            did = str(d["deployment"])
            canary = d.get("canary")
            shadow = d.get("shadow") or []
            if not isinstance(shadow, list):
                raise ControlRecordError(f"deployment {did}: shadow must be a list")
            return cls(
                group=str(d["group"]), route=str(d["route"]), id=did,
                primary=ModelRef.from_dict(d["primary"], f"deployment {did}: primary"),
                canary=None if canary is None else ModelRef.from_dict(canary, f"deployment {did}: canary"),
                fraction=0.0 if canary is None else float(canary.get("fraction", 0.0)),
                shadow=tuple(ModelRef.from_dict(m, f"deployment {did}: shadow") for m in shadow),
                kind=str(d.get("kind", "deploy")), reason=str(d.get("reason", "")),
                requested_by={str(k): str(v) for k, v in (d.get("requested_by") or {}).items()},
                created_at=float(d.get("created_at", 0.0)), supersedes=d.get("supersedes"),
                history=tuple(d.get("history") or ()),
            )
        except KeyError as exc:
            raise ControlRecordError(f"deployment record: missing {exc.args[0]!r}") from None
        except (TypeError, ValueError, AttributeError) as exc:
            # AttributeError: a field of the wrong JSON type (e.g. requested_by not an object).
            # Every bad record must be this error: the follower and the start-up read skip it,
            # anything else would stop the follower or fail every start (a poison record).
            if isinstance(exc, ControlRecordError):
                raise
            raise ControlRecordError(f"deployment record: {exc}") from None

    @classmethod
    def decode(cls, value: bytes) -> "Deployment":
        try:
            doc = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            raise ControlRecordError(f"deployment record is not JSON: {exc}") from None
        return cls.from_dict(doc)

    def succeeded_by(self, *, primary: ModelRef, canary: ModelRef | None = None, fraction: float = 0.0,
                     shadow: tuple[ModelRef, ...] = (), kind: str = "deploy", reason: str = "",
                     requested_by: dict[str, str] | None = None) -> "Deployment":
        """The deployment that replaces this one (this one goes on top of its history)."""
        history = (self.to_dict(with_history=False), *self.history)[:HISTORY_LIMIT]
        return new_deployment(self.group, self.route, primary=primary, canary=canary, fraction=fraction,
                              shadow=shadow, kind=kind, reason=reason, requested_by=requested_by,
                              supersedes=self.id, history=history)

    def rolled_back(self, *, kind: str = "rollback", reason: str = "",
                    requested_by: dict[str, str] | None = None) -> "Deployment":
        """A new deployment equal to the one before this (ValueError when there is none)."""
        if not self.history:
            raise ValueError(f"route {self.route!r}: deployment {self.id} has no earlier deployment to roll back to")
        prev = Deployment.from_dict({**self.history[0], "history": []})
        return replace(
            new_deployment(self.group, self.route, primary=prev.primary, canary=prev.canary, fraction=prev.fraction,
                           shadow=prev.shadow, kind=kind, reason=reason, requested_by=requested_by,
                           supersedes=self.id, history=self.history[1:]),
        )

    def without_canary(self, *, reason: str, requested_by: dict[str, str] | None = None) -> "Deployment":
        """The guard's rollback: the same deployment with its canary removed."""
        return self.succeeded_by(primary=self.primary, shadow=self.shadow, kind="guard_rollback", reason=reason,
                                 requested_by=requested_by)


def control_key(group: str, route: str) -> bytes:
    """The control and audit topics' record key for one route of one group."""
    return f"{group}/{route}".encode()


def new_id(route: str, now: float | None = None) -> str:
    """A deployment id: route, UTC time, and a random suffix (unique across operators)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    return f"{route}-{stamp}-{secrets.token_hex(3)}"


def requester(tool: str) -> dict[str, str]:
    """Who asks: the OS user and host, and the tool."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return {"user": user, "host": socket.gethostname(), "tool": tool}


def new_deployment(group: str, route: str, *, primary: ModelRef, canary: ModelRef | None = None,
                   fraction: float = 0.0, shadow: tuple[ModelRef, ...] = (), kind: str = "deploy",
                   reason: str = "", requested_by: dict[str, str] | None = None, supersedes: str | None = None,
                   history: tuple[dict[str, Any], ...] = ()) -> Deployment:
    now = time.time()
    return Deployment(group=group, route=route, id=new_id(route, now), primary=primary, canary=canary,
                      fraction=fraction if canary is not None else 0.0, shadow=tuple(shadow), kind=kind,
                      reason=reason, requested_by=requested_by or {}, created_at=now, supersedes=supersedes,
                      history=tuple(history))


def initial_deployment(group: str, route: str, model_path: str | os.PathLike, backend: str, device: str,
                       sha256: str | None = None) -> Deployment:
    """The deployment a route runs before any control record: its configured model.

    Its id is derived from the artifacts' digest (``<route>@config-<sha12>``), so every replica
    with the same model names it alike without having to agree on anything.
    """
    from workers.features import ModelSpec

    spec = ModelSpec.load(model_path)
    digest = sha256 or artifacts_sha256(spec.path)
    ref = ModelRef(str(model_path), spec.name, spec.version, digest, backend, device)
    return Deployment(group=group, route=route, id=f"{route}@config-{digest[:12]}", primary=ref,
                      kind="config", reason="the route's [model] setting")


def audit_record(event: str, deployment: Deployment, *, replica: str, worker: dict[str, str],
                 offsets: list[tuple[str, int, int]] = (), reason: str = "", error: str = "",
                 extra: dict[str, Any] | None = None) -> bytes:
    """One audit record (see the module docstring); ``offsets`` are (topic, partition, first offset)."""
    doc: dict[str, Any] = {
        "type": AUDIT_TYPE, "format": FORMAT_VERSION, "event": event, "group": deployment.group,
        "route": deployment.route, "deployment": deployment.id, "kind": deployment.kind,
        "replica": replica, "worker": worker, "at": time.time(),
        "offsets": [{"topic": t, "partition": p, "offset": o} for t, p, o in offsets],
        "reason": reason or deployment.reason, "requested_by": deployment.requested_by,
        "models": {role: m.lineage() for role, m in deployment.models() if role != "shadow"},
    }
    if deployment.shadow:
        doc["models"]["shadow"] = [m.lineage() for m in deployment.shadow]
    if deployment.canary is not None:
        doc["fraction"] = deployment.fraction
    if error:
        doc["error"] = error
    if extra:
        doc.update(extra)
    return orjson.dumps(doc)
