"""Wire framing helpers on top of kio: request header parsing, response encoding,
the table of API versions devbroker implements, and small entity helpers."""

from __future__ import annotations

import dataclasses
import importlib
import io
import struct
from datetime import timedelta
from typing import Any

from kio.schema.errors import ErrorCode
from kio.schema.index import api_key_map
from kio.schema.request_header.v1.header import RequestHeader as RequestHeaderV1
from kio.schema.request_header.v2.header import RequestHeader as RequestHeaderV2
from kio.schema.response_header.v0.header import ResponseHeader as ResponseHeaderV0
from kio.schema.response_header.v1.header import ResponseHeader as ResponseHeaderV1
from kio.serial import entity_reader, entity_writer

# api key -> (min, max) version devbroker implements. The ranges start at the
# lowest version kio carries and stop before versions whose semantics we do not
# implement (topic ids, KIP-848, KIP-890 part 2, batched coordinator lookups).
SUPPORTED_VERSIONS: dict[int, tuple[int, int]] = {
    0: (3, 9),  # Produce
    1: (4, 12),  # Fetch
    2: (1, 7),  # ListOffsets
    3: (0, 12),  # Metadata
    8: (2, 8),  # OffsetCommit
    9: (1, 7),  # OffsetFetch
    10: (0, 3),  # FindCoordinator
    11: (0, 7),  # JoinGroup
    12: (0, 4),  # Heartbeat
    13: (0, 4),  # LeaveGroup
    14: (0, 5),  # SyncGroup
    15: (0, 5),  # DescribeGroups
    16: (0, 4),  # ListGroups
    18: (0, 3),  # ApiVersions
    19: (2, 7),  # CreateTopics
    20: (1, 5),  # DeleteTopics
    22: (0, 4),  # InitProducerId
    24: (0, 3),  # AddPartitionsToTxn
    25: (0, 3),  # AddOffsetsToTxn
    26: (0, 3),  # EndTxn
    28: (0, 3),  # TxnOffsetCommit
    32: (1, 4),  # DescribeConfigs
    42: (0, 2),  # DeleteGroups
    60: (0, 1),  # DescribeCluster
}

ZERO = timedelta(0)
_ERR = ErrorCode


def err(name: str) -> ErrorCode:
    return getattr(_ERR, name)


class ApiSpec:
    """Everything needed to decode one (api key, version) request and encode its response."""

    __slots__ = ("key", "version", "name", "flexible", "req_cls", "req_reader", "resp", "resp_cls",
                 "resp_writer", "resp_header_writer", "header_reader")

    def __init__(self, key: int, version: int):
        self.key = key
        self.version = version
        self.name = api_key_map[key]
        req_mod = importlib.import_module(f"kio.schema.{self.name}.v{version}.request")
        self.resp = importlib.import_module(f"kio.schema.{self.name}.v{version}.response")
        self.req_cls = _entity_of(req_mod, "request")
        self.resp_cls = _entity_of(self.resp, "response")
        self.flexible = self.req_cls.__flexible__
        self.req_reader = entity_reader(self.req_cls)
        self.resp_writer = entity_writer(self.resp_cls)
        hdr = self.resp_cls.__header_schema__
        self.resp_header_writer = entity_writer(hdr)
        self.header_reader = entity_reader(RequestHeaderV2 if self.flexible else RequestHeaderV1)

    def encode(self, correlation_id: int, resp: Any) -> bytes:
        buf = io.BytesIO()
        buf.write(b"\0\0\0\0")
        hdr_cls = self.resp_cls.__header_schema__
        self.resp_header_writer(buf, hdr_cls(correlation_id=correlation_id))
        self.resp_writer(buf, resp)
        out = buf.getbuffer()
        struct.pack_into(">i", out, 0, len(out) - 4)
        return bytes(out)

    def make(self, cls_name: str, **kw: Any) -> Any:
        """Build response entity `cls_name` of this version, dropping fields it lacks."""
        return build(getattr(self.resp, cls_name), **kw)


def _entity_of(mod: Any, kind: str) -> type:
    for v in vars(mod).values():
        if isinstance(v, type) and dataclasses.is_dataclass(v) and v.__module__ == mod.__name__:
            if getattr(v, "__type__", None) is not None and v.__type__.name == kind:
                return v
    raise LookupError(f"no {kind} entity in {mod.__name__}")


_FIELDS: dict[type, frozenset[str]] = {}


def build(cls: type, **kw: Any) -> Any:
    names = _FIELDS.get(cls)
    if names is None:
        names = _FIELDS[cls] = frozenset(f.name for f in dataclasses.fields(cls))
    return cls(**{k: v for k, v in kw.items() if k in names})


_SPECS: dict[tuple[int, int], ApiSpec] = {}


def spec_for(key: int, version: int) -> ApiSpec | None:
    s = _SPECS.get((key, version))
    if s is None:
        rng = SUPPORTED_VERSIONS.get(key)
        if rng is None or not (rng[0] <= version <= rng[1]):
            return None
        s = _SPECS[(key, version)] = ApiSpec(key, version)
    return s


def api_versions_v0_unsupported(correlation_id: int) -> bytes:
    """Answer an ApiVersions request of a version we do not know: v0 body, error 35, and (as
    Kafka's ApiVersionsRequest.getErrorResponse) only ApiVersions' own version range, from
    which the client picks a version to ask again."""
    s = spec_for(18, 0)
    assert s is not None
    lo, hi = SUPPORTED_VERSIONS[18]
    resp = s.make("ApiVersionsResponse", error_code=_ERR.unsupported_version,
                  api_keys=(s.resp.ApiVersion(api_key=18, min_version=lo, max_version=hi),),
                  throttle_time=ZERO)
    return s.encode(correlation_id, resp)


def api_version_list(s: ApiSpec) -> tuple:
    cls = s.resp.ApiVersion
    return tuple(cls(api_key=k, min_version=lo, max_version=hi)
                 for k, (lo, hi) in sorted(SUPPORTED_VERSIONS.items()))
