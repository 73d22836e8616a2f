"""TCP server: connections, Kafka framing (4-byte size prefix), request header
decoding and dispatch to the handlers, one request at a time per connection
(responses keep request order, as Kafka guarantees), plus the coordinators'
periodic timer (session and transaction timeouts)."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import traceback

from . import api, api_groups, api_txn
from .broker import Broker
from .protocol import api_versions_v0_unsupported, spec_for

log = logging.getLogger("devbroker")

HANDLERS = {
    0: api.produce,
    1: api.fetch,
    2: api.list_offsets,
    3: api.metadata,
    8: api_groups.offset_commit,
    9: api_groups.offset_fetch,
    10: api.find_coordinator,
    11: api_groups.join_group,
    12: api_groups.heartbeat,
    13: api_groups.leave_group,
    14: api_groups.sync_group,
    15: api_groups.describe_groups,
    16: api_groups.list_groups,
    18: api.api_versions,
    19: api.create_topics,
    20: api.delete_topics,
    22: api_txn.init_producer_id,
    24: api_txn.add_partitions_to_txn,
    25: api_txn.add_offsets_to_txn,
    26: api_txn.end_txn,
    28: api_txn.txn_offset_commit,
    32: api.describe_configs,
    42: api_groups.delete_groups,
    60: api.describe_cluster,
}

_head = struct.Struct(">hhi")
SOCK_BUF = 4 * 1024 * 1024
WRITE_HIGH_WATER = 8 * 1024 * 1024


class Server:
    def __init__(self, broker: Broker):
        self.broker = broker
        self.server: asyncio.base_events.Server | None = None
        self._timer: asyncio.Task | None = None
        self._conns: set[asyncio.StreamWriter] = set()

    async def start(self) -> int:
        cfg = self.broker.config
        self.server = await asyncio.start_server(self._serve, cfg.host, cfg.port, limit=SOCK_BUF,
                                                 reuse_address=True, backlog=256)
        port = self.server.sockets[0].getsockname()[1]
        self.broker.advertised_port = port
        self._timer = asyncio.get_running_loop().create_task(self._tick())
        return port

    async def stop(self) -> None:
        if self._timer:
            self._timer.cancel()
        if self.server:
            self.server.close()
        for w in list(self._conns):
            w.close()
        if self.server:
            try:
                await asyncio.wait_for(self.server.wait_closed(), 2)
            except (asyncio.TimeoutError, Exception):
                pass

    async def _tick(self) -> None:
        interval = self.broker.config.timer_interval_ms / 1000.0
        b = self.broker
        while True:
            await asyncio.sleep(interval)
            try:
                b.groups.tick()
                b.txns.tick()
            except Exception:  # pragma: no cover - keep the timer alive
                log.error("timer failed:\n%s", traceback.format_exc())

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCK_BUF)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCK_BUF)
            except OSError:
                pass
        peer = writer.get_extra_info("peername")
        host = peer[0] if peer else ""
        writer.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self._conns.add(writer)
        b = self.broker
        try:
            while True:
                head = await reader.readexactly(4)
                size = int.from_bytes(head, "big")
                frame = await reader.readexactly(size)
                key, version, corr = _head.unpack_from(frame, 0)
                spec = spec_for(key, version)
                if spec is None:
                    if key == 18:
                        writer.write(api_versions_v0_unsupported(corr))
                        continue
                    log.warning("unsupported api key %s version %s from %s; closing", key, version, host)
                    break
                hdr, n = spec.header_reader(frame, 0)
                req, _ = spec.req_reader(frame, n)
                try:
                    resp = await HANDLERS[key](b, spec, req, api.Ctx(hdr.client_id or "", host))
                except Exception:
                    log.error("handler %s v%s failed:\n%s", spec.name, version, traceback.format_exc())
                    break
                if resp is not None:
                    writer.write(spec.encode(corr, resp))
                    if writer.transport.get_write_buffer_size() > WRITE_HIGH_WATER:
                        await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self._conns.discard(writer)
            try:
                writer.close()
            except Exception:
                pass
