"""python -m devbroker: run the development broker (not for production)."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import signal
import sys

from .broker import Broker, Config
from .server import Server

DESCRIPTION = (
    "devbroker: a single-node, Kafka-wire-compatible broker FOR DEVELOPMENT AND TESTS ONLY, "
    "NOT FOR PRODUCTION (no replication, no security, no retention). Prints "
    "'bootstrap.servers=HOST:PORT' as its first line once it accepts connections."
)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m devbroker", description=DESCRIPTION)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (loopback unless --allow-remote)")
    p.add_argument("--port", type=int, default=9092, help="port to bind; 0 picks a free one")
    p.add_argument("--data-dir", required=True, help="directory for logs and the metadata journal")
    p.add_argument("--partitions", type=int, default=1,
                   help="default partition count of auto-created topics (default 1)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow binding a non-loopback address (still not for production)")
    p.add_argument("--no-auto-create-topics", action="store_true",
                   help="disable auto topic creation on Metadata/Produce")
    p.add_argument("--initial-rebalance-delay-ms", type=int, default=50,
                   help="group.initial.rebalance.delay.ms (default 50)")
    p.add_argument("--min-session-timeout-ms", type=int, default=6000,
                   help="group.min.session.timeout.ms (default 6000, as Kafka)")
    p.add_argument("--max-transaction-timeout-ms", type=int, default=900_000,
                   help="transaction.max.timeout.ms (default 900000)")
    p.add_argument("--message-max-bytes", type=int, default=1_048_588,
                   help="message.max.bytes: the largest record batch a topic without its own "
                        "max.message.bytes accepts (default 1048588, as Kafka)")
    p.add_argument("--log-level", default="WARNING")
    return p.parse_args(argv)


async def _run(cfg: Config) -> None:
    broker = Broker(cfg)
    server = Server(broker)
    port = await server.start()
    sys.stdout.write(f"bootstrap.servers={cfg.host}:{port}\n")
    sys.stdout.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()
    broker.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s devbroker %(levelname)s %(message)s")
    if not _is_loopback(args.host) and not args.allow_remote:
        print(f"devbroker: refusing to bind non-loopback address {args.host!r} without --allow-remote "
              "(devbroker is for development and tests, not production)", file=sys.stderr)
        return 2
    cfg = Config(data_dir=args.data_dir, host=args.host, port=args.port,
                 default_partitions=args.partitions, auto_create_topics=not args.no_auto_create_topics,
                 initial_rebalance_delay_ms=args.initial_rebalance_delay_ms,
                 min_session_timeout_ms=args.min_session_timeout_ms,
                 max_transaction_timeout_ms=args.max_transaction_timeout_ms,
                 message_max_bytes=args.message_max_bytes)
    try:
        import uvloop  # type: ignore[import-not-found]

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    runner(_run(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
