"""Synthetic security telemetry: the generator behind the demo, tests, bench and training.

``generate(kind, count, seed, ...)`` yields Kafka records ``(key, value, headers)``.
Generation is vectorized per chunk with numpy and formatted with orjson, so it
runs well above 100k events/s. Output is a pure function of the arguments
(except ``ts`` when neither ``start_ts`` nor ``rate`` is given: then events are
stamped with the wall clock at generation time).

Kinds plug in through ``KINDS``: a kind is a class with ``chunk(rng, n, ...)``
returning column arrays + attack labels, and ``events(cols)`` turning them into
dicts. ``flow`` (network flows) and ``auth`` (sign-ins, see :class:`AuthKind`) exist;
``process`` comes later. Each kind has a fixed ``kind_no`` that seeds its stream,
so adding a kind never changes the data another kind generates.

Flow events look like network flow telemetry (NetFlow/Zeek conn.log-ish):

    {"event_id": "…", "ts": 1795000000.123, "src_ip": "10.1.4.17", "dst_ip": "142.250.74.3",
     "src_port": 51234, "dst_port": 443, "protocol": "tcp", "direction": "outbound",
     "bytes_in": 48211, "bytes_out": 1733, "packets_in": 41, "packets_out": 12,
     "duration_ms": 412.5, "tcp_flags": "FSPA"}

``tcp_flags`` is the union of TCP flags seen in the flow, letters in the order
``FSRPAUEC`` (``""`` for udp/icmp). Benign traffic (web, DNS, SMB, databases,
SSH/RDP administration, NTP, ICMP) has heavy-tailed sizes; attacks mixed in are
port scans, brute force (22/3389/445), exfiltration (large bytes_out to a rare
external host) and beaconing (small regular flows to one external host).

Malformed records (``bad_fraction``) carry a header ``sluice-synthetic-defect``
naming the reject reason the worker is expected to give them (see ``DEFECTS``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import orjson

Record = tuple[Optional[bytes], Optional[bytes], list[tuple[str, bytes]]]  # (key, value, headers)

CHUNK = 4096
DEFECT_HEADER = "sluice-synthetic-defect"

# defect name -> reject reason the featurizer gives it (workers.features reason codes)
DEFECTS: dict[str, str] = {
    "bad_utf8": "bad_utf8",
    "bad_json": "bad_json",
    "not_object": "not_object",
    "missing_field": "missing_field",
    "wrong_type": "wrong_type",
    "nan_literal": "non_finite",
    "huge_float": "non_finite",      # 1e400 overflows a double
    "huge_int": "out_of_range",      # 10**30 bytes
    "too_deep": "too_deep",
    "tombstone": "tombstone",
    "negative_bytes": "out_of_range",  # a count below the schema minimum (flow: bytes; auth: failures)
    "bad_port": "out_of_range",        # a value above the schema maximum (flow: port; auth: hour)
    "too_large": "too_large",
}
_DEFECT_NAMES = list(DEFECTS)
# too_large records are big (70 kB); keep them rarer than the others.
_DEFECT_P = np.array([1.0] * len(DEFECTS))
_DEFECT_P[_DEFECT_NAMES.index("too_large")] = 0.2
_DEFECT_P /= _DEFECT_P.sum()

# ----------------------------------------------------------------------------- flow

FLOW_SUBTYPES = (
    # benign
    "web", "web_upload", "dns", "smb", "db", "ssh_admin", "rdp_admin", "ntp", "icmp",
    # attacks
    "port_scan", "brute_force", "exfiltration", "beaconing",
)
ATTACKS = ("port_scan", "brute_force", "exfiltration", "beaconing")
_BENIGN_P = np.array([0.52, 0.01, 0.20, 0.07, 0.08, 0.03, 0.015, 0.025, 0.05])
_BENIGN_P = _BENIGN_P / _BENIGN_P.sum()
_ATTACK_P = np.array([0.35, 0.30, 0.15, 0.20])

_FLAG_BITS = {"F": 1, "S": 2, "R": 4, "P": 8, "A": 16, "U": 32, "E": 64, "C": 128}
TCP_FLAG_ORDER = "FSRPAUEC"

# These globals are the "network": pools are derived from a fixed seed so every
# generator (any seed) sees the same hosts and the same popular destinations.
_NET_SEED = 20261122
_N_HOSTS = 2048
_N_POPULAR = 4096


def _ip_strings(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray) -> list[str]:
    return [f"{w}.{x}.{y}.{z}" for w, x, y, z in zip(a.tolist(), b.tolist(), c.tolist(), d.tolist())]


def _public_octets(rng: np.random.Generator, n: int):
    a = rng.integers(1, 224, n)
    # avoid private / loopback / link-local / CGNAT first octets
    bad = (a == 10) | (a == 127) | (a == 100) | (a == 169) | (a == 172) | (a == 192) | (a == 0)
    a[bad] = rng.choice(np.array([23, 34, 52, 104, 142, 151, 185, 203]), int(bad.sum()))
    return a, rng.integers(0, 256, n), rng.integers(0, 256, n), rng.integers(1, 255, n)


class _Network:
    def __init__(self) -> None:
        rng = np.random.default_rng(_NET_SEED)
        n = _N_HOSTS
        self.hosts = np.array(
            _ip_strings(np.full(n, 10), rng.integers(1, 64, n), rng.integers(0, 256, n), rng.integers(2, 255, n)),
            dtype=object,
        )
        self.dns = np.array(["10.0.0.53", "10.0.1.53"], dtype=object)
        self.smb = np.array([f"10.0.2.{i}" for i in range(10, 22)], dtype=object)
        self.db = np.array([f"10.0.3.{i}" for i in range(10, 30)], dtype=object)
        self.servers = np.concatenate([self.smb, self.db, np.array([f"10.0.4.{i}" for i in range(2, 40)], dtype=object)])
        self.admins = self.hosts[:24]
        self.popular = np.array(_ip_strings(*_public_octets(rng, _N_POPULAR)), dtype=object)
        # Zipf-ish popularity over the popular pool
        w = 1.0 / np.arange(1, _N_POPULAR + 1) ** 1.1
        self.popular_p = w / w.sum()
        self.ntp = self.popular[-8:]


_NET: _Network | None = None


def _net() -> _Network:
    global _NET
    if _NET is None:
        _NET = _Network()
    return _NET


def _lognormal(rng, n, median, sigma):
    return rng.lognormal(np.log(median), sigma, n)


class FlowKind:
    """Network flow telemetry."""

    name = "flow"
    subtypes = FLOW_SUBTYPES
    attacks = ATTACKS

    # Scales --drift so that X = 1.0 is a clearly actionable shift (max feature PSI about 0.3,
    # over the 0.25 that usually means "retrain") while X = 0 stays the training distribution.
    DRIFT_GAIN = 1.7

    def chunk(self, rng: np.random.Generator, n: int, attack_fraction: float, drift: float):
        """Column arrays for n flows and their subtype codes."""
        drift = drift * self.DRIFT_GAIN
        net = _net()
        is_attack = rng.random(n) < attack_fraction
        bp = _BENIGN_P.copy()
        if drift:
            # drift: more DNS/ICMP/NTP, less web; the share moves with magnitude X
            bp = bp * np.exp(drift * np.array([-0.3, 0.2, 0.4, 0.0, 0.0, 0.0, 0.0, 0.3, 0.5]))
            bp /= bp.sum()
        sub = np.where(
            is_attack,
            9 + rng.choice(4, n, p=_ATTACK_P),
            rng.choice(9, n, p=bp),
        ).astype(np.int8)

        src = np.empty(n, dtype=object)
        dst = np.empty(n, dtype=object)
        sport = rng.integers(32768, 61000, n)
        dport = np.zeros(n, dtype=np.int64)
        proto = np.full(n, "tcp", dtype=object)
        direction = np.full(n, "outbound", dtype=object)
        b_out = np.zeros(n)
        b_in = np.zeros(n)
        dur = np.zeros(n)
        flags = np.full(n, "FSPA", dtype=object)
        # average payload bytes per packet, per direction
        ppo = rng.uniform(300, 900, n)
        ppi = rng.uniform(700, 1400, n)
        size_shift = np.exp(0.5 * drift)  # drift scales benign sizes

        def pick(mask_code):
            return np.nonzero(sub == mask_code)[0]

        # --- web (https/http to popular external sites), heavy-tailed responses
        i = pick(0)
        k = len(i)
        src[i] = rng.choice(net.hosts, k)
        dst[i] = rng.choice(net.popular, k, p=net.popular_p)
        web_ports = np.array([443, 80, 8443 if drift > 0.5 else 443])
        dport[i] = rng.choice(web_ports, k, p=[0.85, 0.12, 0.03])
        b_out[i] = _lognormal(rng, k, 900, 0.9) * size_shift
        b_in[i] = np.minimum(_lognormal(rng, k, 14000, 1.8) * size_shift, 4e9)
        dur[i] = _lognormal(rng, k, 350, 1.3)
        flags[i] = rng.choice(np.array(["FSPA", "FSRPA", "SRPA", "SA"], dtype=object), k, p=[0.86, 0.06, 0.06, 0.02])
        # --- web uploads: benign large bytes_out, but to popular sites
        i = pick(1)
        k = len(i)
        src[i] = rng.choice(net.hosts, k)
        dst[i] = rng.choice(net.popular[:256], k)
        dport[i] = 443
        b_out[i] = _lognormal(rng, k, 3e6, 1.5) * size_shift
        b_in[i] = _lognormal(rng, k, 20000, 1.0)
        dur[i] = _lognormal(rng, k, 20000, 1.0)
        # --- dns (udp to internal resolvers)
        i = pick(2)
        k = len(i)
        src[i] = rng.choice(net.hosts, k)
        dst[i] = rng.choice(net.dns, k)
        dport[i] = 53
        proto[i] = "udp"
        direction[i] = "internal"
        b_out[i] = rng.integers(38, 110, k)
        b_in[i] = rng.integers(54, 480, k)
        dur[i] = _lognormal(rng, k, 4, 1.0)
        flags[i] = ""
        # --- smb (internal file servers)
        i = pick(3)
        k = len(i)
        src[i] = rng.choice(net.hosts, k)
        dst[i] = rng.choice(net.smb, k)
        dport[i] = 445
        direction[i] = "internal"
        b_out[i] = _lognormal(rng, k, 6000, 1.8) * size_shift
        b_in[i] = _lognormal(rng, k, 60000, 2.2) * size_shift
        dur[i] = _lognormal(rng, k, 3000, 1.8)
        # --- db (internal databases, long-lived)
        i = pick(4)
        k = len(i)
        src[i] = rng.choice(net.hosts[:256], k)
        dst[i] = rng.choice(net.db, k)
        dport[i] = rng.choice(np.array([5432, 3306, 1433, 6379]), k, p=[0.4, 0.3, 0.1, 0.2])
        direction[i] = "internal"
        b_out[i] = _lognormal(rng, k, 3000, 1.5)
        b_in[i] = _lognormal(rng, k, 40000, 2.0)
        dur[i] = _lognormal(rng, k, 8000, 2.0)
        # --- ssh administration: long sessions, a few admin hosts
        i = pick(5)
        k = len(i)
        src[i] = rng.choice(net.admins, k)
        dst[i] = rng.choice(net.servers, k)
        dport[i] = 22
        direction[i] = "internal"
        b_out[i] = _lognormal(rng, k, 40000, 1.5)
        b_in[i] = _lognormal(rng, k, 120000, 1.7)
        dur[i] = _lognormal(rng, k, 600000, 1.2)
        # --- rdp administration
        i = pick(6)
        k = len(i)
        src[i] = rng.choice(net.admins, k)
        dst[i] = rng.choice(net.servers, k)
        dport[i] = 3389
        direction[i] = "internal"
        b_out[i] = _lognormal(rng, k, 300000, 1.2)
        b_in[i] = _lognormal(rng, k, 3e6, 1.3)
        dur[i] = _lognormal(rng, k, 1.2e6, 1.0)
        # --- ntp
        i = pick(7)
        k = len(i)
        src[i] = rng.choice(net.hosts, k)
        dst[i] = rng.choice(net.ntp, k)
        dport[i] = 123
        sport[i] = 123
        proto[i] = "udp"
        b_out[i] = 76
        b_in[i] = 76
        dur[i] = _lognormal(rng, k, 25, 0.6)
        flags[i] = ""
        # --- icmp echo
        i = pick(8)
        k = len(i)
        src[i] = rng.choice(net.hosts, k)
        internal = rng.random(k) < 0.6
        dst[i] = np.where(internal, rng.choice(net.servers, k), rng.choice(net.popular[:64], k))
        direction[i] = np.where(internal, "internal", "outbound")
        dport[i] = 0
        sport[i] = 0
        proto[i] = "icmp"
        npk = rng.integers(1, 5, k)
        b_out[i] = npk * 84
        b_in[i] = npk * 84 * (rng.random(k) < 0.95)
        dur[i] = npk * 1000.0 + rng.uniform(0, 30, k)
        flags[i] = ""

        # --- attacks -----------------------------------------------------------------
        scanners = net.hosts[-16:]
        # port scan: SYN probes, tiny, many distinct ports
        i = pick(9)
        k = len(i)
        src[i] = rng.choice(scanners, k)
        dst[i] = rng.choice(np.concatenate([net.servers, net.hosts[:512]]), k)
        dport[i] = np.where(rng.random(k) < 0.7, rng.integers(1, 1025, k), rng.integers(1, 65536, k))
        direction[i] = "internal"
        udp = rng.random(k) < 0.1
        proto[i] = np.where(udp, "udp", "tcp")
        open_ = rng.random(k) < 0.1
        flags[i] = np.where(udp, "", np.where(open_, "SRA", rng.choice(np.array(["S", "SR"], dtype=object), k)))
        npk_o = rng.integers(1, 3, k)
        b_out[i] = np.where(udp, 28 + rng.integers(0, 40, k), npk_o * 44)
        b_in[i] = np.where(open_ & ~udp, 44, np.where(rng.random(k) < 0.5, 40, 0))
        dur[i] = rng.exponential(1.5, k)
        # brute force: many similar small logins to 22/3389/445
        i = pick(10)
        k = len(i)
        outside = rng.random(k) < 0.6
        src[i] = np.where(outside, rng.choice(np.array(_ip_strings(*_public_octets(rng, 64)), dtype=object), k),
                          rng.choice(scanners, k))
        dst[i] = rng.choice(net.servers, k)
        direction[i] = np.where(outside, "inbound", "internal")
        svc = rng.choice(3, k, p=[0.5, 0.3, 0.2])
        dport[i] = np.array([22, 3389, 445])[svc]
        base_out = np.array([2300.0, 3900.0, 1800.0])[svc]
        base_in = np.array([3100.0, 5200.0, 1500.0])[svc]
        b_out[i] = base_out + rng.normal(0, 60, k)
        b_in[i] = base_in + rng.normal(0, 80, k)
        dur[i] = rng.uniform(300, 2500, k)
        flags[i] = rng.choice(np.array(["FSPA", "SRPA"], dtype=object), k, p=[0.7, 0.3])
        # exfiltration: big uploads to rare external hosts
        i = pick(11)
        k = len(i)
        src[i] = rng.choice(net.hosts, k)
        dst[i] = np.array(_ip_strings(*_public_octets(rng, k)), dtype=object)
        dport[i] = rng.choice(np.array([443, 8443, 4444, 9001, 53, 22]), k, p=[0.5, 0.15, 0.1, 0.1, 0.05, 0.1])
        b_out[i] = np.minimum(_lognormal(rng, k, 4e7, 1.3), 5e10)
        b_in[i] = _lognormal(rng, k, 5000, 1.0)
        dur[i] = _lognormal(rng, k, 90000, 1.0)
        # beaconing: small, regular flows to one external C2 per infected host
        i = pick(12)
        k = len(i)
        infected = rng.integers(0, 32, k)
        c2 = _c2_hosts()
        src[i] = net.hosts[100 + infected]
        dst[i] = c2[infected]
        dport[i] = np.array([443, 8443, 8080, 4444])[infected % 4]
        b_out[i] = rng.normal(360, 12, k)
        b_in[i] = rng.normal(240, 10, k)
        dur[i] = rng.normal(180, 20, k)
        flags[i] = "FSPA"

        # packets from payload sizes (+ handshake/teardown overhead for tcp)
        b_out = np.maximum(np.rint(b_out), 0)
        b_in = np.maximum(np.rint(b_in), 0)
        tcp = proto == "tcp"
        p_out = np.ceil(b_out / ppo) + np.where(tcp, 2, 0)
        p_in = np.ceil(b_in / ppi) + np.where(tcp & (b_in > 0), 1, 0)
        scan = sub == 9
        p_out = np.where(scan, np.maximum(1, np.rint(b_out / 44)), p_out)
        p_in = np.where(scan, np.where(b_in > 0, 1, 0), p_in)
        p_in = np.where((sub == 2) | (sub == 7), 1, p_in)
        p_out = np.where((sub == 2) | (sub == 7), 1, p_out)
        p_out = np.where(sub == 8, b_out // 84, p_out)
        p_in = np.where(sub == 8, b_in // 84, p_in)
        dur = np.round(np.maximum(dur, 0.0), 3)
        cols = {
            "src_ip": src, "dst_ip": dst, "src_port": sport, "dst_port": dport, "protocol": proto,
            "direction": direction, "bytes_in": b_in.astype(np.int64), "bytes_out": b_out.astype(np.int64),
            "packets_in": p_in.astype(np.int64), "packets_out": p_out.astype(np.int64),
            "duration_ms": dur, "tcp_flags": flags,
        }
        return cols, sub

    def events(self, ids: list[str], ts: list[float], cols: dict) -> list[dict]:
        keys = ("src_ip", "dst_ip", "src_port", "dst_port", "protocol", "direction",
                "bytes_in", "bytes_out", "packets_in", "packets_out", "duration_ms", "tcp_flags")
        lists = [cols[k].tolist() for k in keys]
        out = []
        append = out.append
        for eid, t, si, di, sp, dp, pr, dr, bi, bo, pi, po, du, fl in zip(ids, ts, *lists):
            append({"event_id": eid, "ts": t, "src_ip": si, "dst_ip": di, "src_port": sp, "dst_port": dp,
                    "protocol": pr, "direction": dr, "bytes_in": bi, "bytes_out": bo, "packets_in": pi,
                    "packets_out": po, "duration_ms": du, "tcp_flags": fl})
        return out

    key_field = "src_ip"
    kind_no = 0
    required = ("event_id", "src_ip", "dst_ip", "dst_port", "protocol", "bytes_in", "bytes_out",
                "packets_in", "packets_out", "duration_ms")
    numeric = ("src_port", "dst_port", "bytes_in", "bytes_out", "packets_in", "packets_out", "duration_ms")
    # fields the value defects aim at (see _defect)
    nan_fields = ("bytes_in", "duration_ms", "ts")
    huge_float_field = "duration_ms"
    huge_int_field = "bytes_out"
    negative_fields = ("bytes_in", "bytes_out", "packets_out")
    above_max_fields = ("dst_port", "src_port")
    above_max_range = (65536, 100000)


_C2: np.ndarray | None = None


def _c2_hosts() -> np.ndarray:
    global _C2
    if _C2 is None:
        _C2 = np.array(_ip_strings(*_public_octets(np.random.default_rng(_NET_SEED + 1), 32)), dtype=object)
    return _C2


# ----------------------------------------------------------------------------- auth

AUTH_SUBTYPES = (
    # benign
    "office_login", "remote_login", "typo_failure", "travel", "admin_work", "oncall_admin", "service_account",
    # attacks
    "password_spray", "impossible_travel", "offhours_admin",
)
AUTH_ATTACKS = ("password_spray", "impossible_travel", "offhours_admin")
_AUTH_BENIGN_P = np.array([0.45, 0.22, 0.05, 0.03, 0.08, 0.01, 0.16])
_AUTH_BENIGN_P = _AUTH_BENIGN_P / _AUTH_BENIGN_P.sum()
_AUTH_ATTACK_P = np.array([0.5, 0.3, 0.2])

AUTH_APPS = ("sso", "vpn", "mail", "ssh", "rdp", "admin_console")
AUTH_NETWORKS = ("corporate", "residential", "mobile", "hosting", "tor")
AUTH_MFA = ("none", "push", "totp", "sms", "webauthn")
_HOME_COUNTRIES = np.array(["US", "GB", "DE", "IN", "CA", "FR"], dtype=object)
_HOME_P = np.array([0.55, 0.15, 0.12, 0.10, 0.04, 0.04])
_TRAVEL_COUNTRIES = np.array(["US", "GB", "DE", "FR", "NL", "JP", "SG", "BR", "MX", "AE", "ES", "IT"], dtype=object)
_ATTACK_COUNTRIES = np.array(["RU", "CN", "VN", "NG", "IR", "UA", "BR", "US", "NL", "RO"], dtype=object)
_ATTACK_COUNTRY_P = np.array([0.18, 0.16, 0.1, 0.1, 0.06, 0.06, 0.08, 0.14, 0.08, 0.04])
_N_EMPLOYEES = 6000
_N_ADMINS = 48
_N_SERVICES = 160


class _Directory:
    """Users (employees, admins, service accounts) with a home country, and the org's egress IPs."""

    def __init__(self) -> None:
        rng = np.random.default_rng(_NET_SEED + 7)
        self.employees = np.array([f"e{i:05d}" for i in range(_N_EMPLOYEES)], dtype=object)
        self.employee_home = rng.choice(_HOME_COUNTRIES, _N_EMPLOYEES, p=_HOME_P)
        self.admins = np.array([f"adm-{i:03d}" for i in range(_N_ADMINS)], dtype=object)
        self.admin_home = rng.choice(_HOME_COUNTRIES[:4], _N_ADMINS, p=[0.6, 0.2, 0.1, 0.1])
        self.services = np.array([f"svc-{n}-{i:02d}" for i, n in enumerate(
            rng.choice(["backup", "ci", "etl", "monitor", "deploy", "ldap-sync", "report"], _N_SERVICES))], dtype=object)
        self.egress = np.array(_ip_strings(*_public_octets(rng, 12)), dtype=object)   # corporate NAT / proxies
        self.datacenter = np.array([f"10.0.9.{i}" for i in range(10, 60)], dtype=object)
        self.tor = np.array(_ip_strings(*_public_octets(rng, 300)), dtype=object)
        self.hosting = np.array(_ip_strings(np.full(2000, 45), rng.integers(0, 256, 2000), rng.integers(0, 256, 2000),
                                            rng.integers(1, 255, 2000)), dtype=object)
        self.servers = np.array([f"srv-{i:04d}" for i in range(400)], dtype=object)


_DIR: _Directory | None = None


def _directory() -> _Directory:
    global _DIR
    if _DIR is None:
        _DIR = _Directory()
    return _DIR


def _public_ips(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.array(_ip_strings(*_public_octets(rng, n)), dtype=object)


class AuthKind:
    """Authentication events (IdP / VPN / SSH / RDP sign-ins, as a SIEM sees them after enrichment).

    Each event is one sign-in attempt, keyed by ``user``. Besides the raw attempt
    (user, source address, application, method, result, MFA) it carries the
    context an IdP or SIEM enrichment adds (Okta/Entra-style sign-in risk
    context): geolocation of the source (``src_country``, ``src_network``),
    distance and implied travel speed from the user's previous sign-in, local
    hour and weekday for the user, recent failures from the source and for the
    user, distinct users tried from the source in the last hour, and whether the
    device is new for the user. The detector scores each event on its own, so
    the context must be in the event.

    Benign: office and remote sign-ins in business/evening hours, typos, business
    travel (far, but at plane speed), admins at work and on call, service
    accounts around the clock. Attacks: password spraying (one source, many
    users, few failures each, before MFA), impossible travel (a success from far
    away faster than a plane), off-hours admin sign-ins (night/weekend, new
    device, weak or no MFA).
    """

    name = "auth"
    kind_no = 1
    subtypes = AUTH_SUBTYPES
    attacks = AUTH_ATTACKS
    key_field = "user"
    required = ("event_id", "user", "user_type", "src_ip", "app", "auth_method", "result", "mfa", "src_network",
                "src_country", "hour_local", "weekday", "src_failures_1h", "src_users_1h", "user_failures_1h")
    numeric = ("hour_local", "weekday", "geo_distance_km", "geo_speed_kmh", "src_failures_1h", "src_users_1h",
               "user_failures_1h")
    nan_fields = ("geo_distance_km", "geo_speed_kmh", "ts")
    huge_float_field = "geo_speed_kmh"
    huge_int_field = "src_failures_1h"
    negative_fields = ("src_failures_1h", "src_users_1h", "user_failures_1h")
    above_max_fields = ("hour_local", "weekday")
    above_max_range = (24, 1000)

    def chunk(self, rng: np.random.Generator, n: int, attack_fraction: float, drift: float):
        d = _directory()
        is_attack = rng.random(n) < attack_fraction
        bp = _AUTH_BENIGN_P.copy()
        if drift:
            # drift: the workforce goes remote and travels more (more remote/mobile/travel, fewer office sign-ins)
            bp = bp * np.exp(drift * np.array([-0.5, 0.5, 0.1, 0.5, 0.0, 0.2, 0.0]))
            bp /= bp.sum()
        sub = np.where(is_attack, 7 + rng.choice(3, n, p=_AUTH_ATTACK_P), rng.choice(7, n, p=bp)).astype(np.int8)

        user = np.empty(n, dtype=object)
        utype = np.full(n, "employee", dtype=object)
        src = np.empty(n, dtype=object)
        host = np.full(n, "sso.corp.example", dtype=object)
        app = np.full(n, "sso", dtype=object)
        method = np.full(n, "password", dtype=object)
        result = np.full(n, "success", dtype=object)
        reason = np.full(n, None, dtype=object)
        mfa = np.full(n, "push", dtype=object)
        network = np.full(n, "corporate", dtype=object)
        country = np.full(n, "US", dtype=object)
        hour = np.zeros(n, dtype=np.int64)
        weekday = np.zeros(n, dtype=np.int64)
        dist = np.zeros(n)
        hours_since = rng.lognormal(np.log(16.0), 1.0, n) + 0.25  # since the user's previous sign-in
        src_fail = np.zeros(n, dtype=np.int64)
        src_users = np.ones(n, dtype=np.int64)
        user_fail = np.zeros(n, dtype=np.int64)
        new_device = rng.random(n) < 0.02

        def pick(code):
            return np.nonzero(sub == code)[0]

        def employees(k):
            j = rng.integers(0, _N_EMPLOYEES, k)
            return d.employees[j], d.employee_home[j]

        def admins(k):
            j = rng.integers(0, _N_ADMINS, k)
            return d.admins[j], d.admin_home[j]

        def business_hours(k, mu=11.5, sd=2.6, lo=7, hi=19):
            return np.clip(np.rint(rng.normal(mu, sd, k)), lo, hi).astype(np.int64)

        def weekdays(k, weekend=0.03):
            return np.where(rng.random(k) < weekend, rng.integers(5, 7, k), rng.integers(0, 5, k))

        def app_hosts(a):
            k = len(a)
            srv = rng.choice(d.servers, k)
            return np.select([a == "vpn", a == "mail", a == "ssh", a == "rdp", a == "admin_console"],
                             ["vpn-gw.corp.example", "mail.corp.example", srv, srv, "admin.corp.example"],
                             "sso.corp.example").astype(object)

        # --- office sign-ins: corporate egress (NAT: many users per address), business hours
        i = pick(0)
        k = len(i)
        user[i], country[i] = employees(k)
        src[i] = rng.choice(d.egress, k)
        app[i] = rng.choice(np.array(["sso", "mail", "vpn", "rdp"], dtype=object), k, p=[0.55, 0.33, 0.04, 0.08])
        kerb = rng.random(k) < 0.45
        method[i] = np.where(kerb, "kerberos", "password")
        mfa[i] = np.where(kerb, "none", rng.choice(np.array(["push", "webauthn", "totp"], dtype=object), k, p=[0.6, 0.3, 0.1]))
        hour[i] = business_hours(k)
        weekday[i] = weekdays(k)
        dist[i] = rng.exponential(8.0, k)
        src_users[i] = rng.integers(5, 250, k)
        src_fail[i] = rng.poisson(1.5, k)
        # --- remote sign-ins: home broadband / mobile, longer day, some weekends
        i = pick(1)
        k = len(i)
        user[i], country[i] = employees(k)
        mob = rng.random(k) < 0.3
        network[i] = np.where(mob, "mobile", "residential")
        src[i] = _public_ips(rng, k)
        app[i] = rng.choice(np.array(["vpn", "sso", "mail"], dtype=object), k, p=[0.5, 0.3, 0.2])
        mfa[i] = rng.choice(np.array(["push", "totp", "webauthn", "sms"], dtype=object), k, p=[0.55, 0.2, 0.2, 0.05])
        hour[i] = business_hours(k, 14.0, 3.8, 6, 23)
        weekday[i] = weekdays(k, 0.12)
        dist[i] = rng.exponential(25.0, k)
        src_users[i] = rng.integers(1, 3, k)
        src_fail[i] = rng.poisson(0.1, k)
        new_device[i] = rng.random(k) < 0.05
        # --- typos: a failed password, a few for that user and source
        i = pick(2)
        k = len(i)
        user[i], country[i] = employees(k)
        office = rng.random(k) < 0.5
        network[i] = np.where(office, "corporate", "residential")
        src[i] = np.where(office, rng.choice(d.egress, k), _public_ips(rng, k))
        app[i] = rng.choice(np.array(["sso", "vpn", "mail"], dtype=object), k, p=[0.5, 0.3, 0.2])
        result[i] = "failure"
        reason[i] = rng.choice(np.array(["bad_password", "locked", "mfa_denied"], dtype=object), k, p=[0.88, 0.04, 0.08])
        mfa[i] = np.where(reason[i] == "mfa_denied", "push", "none")
        hour[i] = business_hours(k, 12.5, 3.5, 6, 23)
        weekday[i] = weekdays(k, 0.08)
        dist[i] = rng.exponential(10.0, k)
        user_fail[i] = rng.integers(1, 4, k)
        src_fail[i] = np.where(office, rng.poisson(2.0, k) + 1, user_fail[i])
        src_users[i] = np.where(office, rng.integers(5, 250, k), 1)
        # --- business travel: far away, but at plane speed
        i = pick(3)
        k = len(i)
        user[i], home = employees(k)
        country[i] = rng.choice(_TRAVEL_COUNTRIES, k)
        network[i] = rng.choice(np.array(["mobile", "residential", "hosting"], dtype=object), k, p=[0.5, 0.35, 0.15])
        src[i] = _public_ips(rng, k)
        app[i] = rng.choice(np.array(["sso", "mail", "vpn"], dtype=object), k, p=[0.4, 0.35, 0.25])
        mfa[i] = rng.choice(np.array(["push", "totp", "webauthn"], dtype=object), k, p=[0.6, 0.2, 0.2])
        hour[i] = business_hours(k, 13.0, 4.5, 5, 23)
        weekday[i] = weekdays(k, 0.25)
        dist[i] = rng.uniform(400, 11000, k)
        hours_since[i] = dist[i] / rng.uniform(150, 750, k) + rng.uniform(1, 10, k)  # flight + transfers
        new_device[i] = rng.random(k) < 0.08
        # --- admins at work: ssh/rdp/admin console from the office, strong MFA
        i = pick(4)
        k = len(i)
        user[i], country[i] = admins(k)
        utype[i] = "admin"
        office = rng.random(k) < 0.8
        network[i] = np.where(office, "corporate", "residential")
        src[i] = np.where(office, rng.choice(d.egress, k), _public_ips(rng, k))
        app[i] = rng.choice(np.array(["ssh", "rdp", "admin_console", "sso"], dtype=object), k, p=[0.35, 0.2, 0.35, 0.1])
        method[i] = rng.choice(np.array(["password", "certificate"], dtype=object), k, p=[0.4, 0.6])
        mfa[i] = rng.choice(np.array(["webauthn", "totp"], dtype=object), k, p=[0.7, 0.3])
        hour[i] = business_hours(k, 12.0, 2.8, 7, 20)
        weekday[i] = weekdays(k, 0.04)
        dist[i] = rng.exponential(10.0, k)
        src_users[i] = np.where(office, rng.integers(5, 250, k), 1)
        src_fail[i] = np.where(office, rng.poisson(1.5, k), 0)
        new_device[i] = rng.random(k) < 0.01
        # --- on-call admins: nights and weekends, but from home, known device, strong MFA
        i = pick(5)
        k = len(i)
        user[i], country[i] = admins(k)
        utype[i] = "admin"
        network[i] = "residential"
        src[i] = _public_ips(rng, k)
        app[i] = rng.choice(np.array(["vpn", "ssh", "admin_console"], dtype=object), k, p=[0.4, 0.35, 0.25])
        method[i] = rng.choice(np.array(["password", "certificate"], dtype=object), k, p=[0.4, 0.6])
        mfa[i] = "webauthn"
        hour[i] = rng.integers(0, 24, k)
        weekday[i] = rng.integers(0, 7, k)
        dist[i] = rng.exponential(15.0, k)
        new_device[i] = rng.random(k) < 0.02
        # --- service accounts: any hour, certificates/kerberos from the data centre, no MFA
        i = pick(6)
        k = len(i)
        user[i] = rng.choice(d.services, k)
        utype[i] = "service"
        country[i] = "US"
        network[i] = "corporate"
        src[i] = rng.choice(d.datacenter, k)
        app[i] = rng.choice(np.array(["ssh", "sso", "admin_console"], dtype=object), k, p=[0.6, 0.3, 0.1])
        method[i] = rng.choice(np.array(["certificate", "kerberos", "token"], dtype=object), k, p=[0.5, 0.3, 0.2])
        mfa[i] = "none"
        hour[i] = rng.integers(0, 24, k)
        weekday[i] = rng.integers(0, 7, k)
        dist[i] = 0.0
        hours_since[i] = rng.uniform(0.05, 2.0, k)
        src_users[i] = rng.integers(1, 4, k)
        fail = rng.random(k) < 0.005
        result[i] = np.where(fail, "failure", "success")
        reason[i] = np.where(fail, "bad_password", None)
        user_fail[i] = fail.astype(np.int64)
        src_fail[i] = fail.astype(np.int64)
        new_device[i] = False

        # --- attacks ---------------------------------------------------------------------
        # password spraying: one source tries a common password on many accounts, before MFA
        i = pick(7)
        k = len(i)
        user[i], _home = employees(k)
        unknown = rng.random(k) < 0.15
        user[i] = np.where(unknown, np.array([f"e{x:05d}" for x in rng.integers(_N_EMPLOYEES, 99999, k)], dtype=object), user[i])
        network[i] = rng.choice(np.array(["hosting", "tor", "residential"], dtype=object), k, p=[0.6, 0.2, 0.2])
        src[i] = np.select([network[i] == "hosting", network[i] == "tor"],
                           [rng.choice(d.hosting, k), rng.choice(d.tor, k)], _public_ips(rng, k)).astype(object)
        country[i] = rng.choice(_ATTACK_COUNTRIES, k, p=_ATTACK_COUNTRY_P)
        app[i] = rng.choice(np.array(["sso", "mail", "vpn"], dtype=object), k, p=[0.5, 0.4, 0.1])
        result[i] = "failure"
        reason[i] = np.where(unknown, "unknown_user", "bad_password")
        mfa[i] = "none"
        hour[i] = rng.integers(0, 24, k)
        weekday[i] = rng.integers(0, 7, k)
        dist[i] = rng.uniform(800, 15000, k)
        src_fail[i] = np.rint(np.exp(rng.uniform(np.log(25), np.log(3000), k))).astype(np.int64)
        src_users[i] = np.maximum(1, np.rint(src_fail[i] * rng.uniform(0.7, 1.0, k))).astype(np.int64)
        user_fail[i] = rng.integers(1, 3, k)
        new_device[i] = rng.random(k) < 0.9
        # impossible travel: a success from far away, faster than any plane
        i = pick(8)
        k = len(i)
        user[i], _home = employees(k)
        country[i] = rng.choice(_ATTACK_COUNTRIES, k, p=_ATTACK_COUNTRY_P)
        network[i] = rng.choice(np.array(["hosting", "residential", "mobile"], dtype=object), k, p=[0.45, 0.4, 0.15])
        src[i] = np.where(network[i] == "hosting", rng.choice(d.hosting, k), _public_ips(rng, k))
        app[i] = rng.choice(np.array(["mail", "sso", "vpn"], dtype=object), k, p=[0.5, 0.4, 0.1])
        legacy = rng.random(k) < 0.4   # legacy mail protocols bypass MFA; else push fatigue approved
        mfa[i] = np.where(legacy, "none", "push")
        hour[i] = rng.integers(0, 24, k)
        weekday[i] = rng.integers(0, 7, k)
        dist[i] = rng.uniform(2500, 16000, k)
        hours_since[i] = rng.uniform(0.1, 2.5, k)
        user_fail[i] = rng.integers(0, 4, k)
        src_fail[i] = user_fail[i]
        new_device[i] = rng.random(k) < 0.8
        # off-hours admin sign-in: night or weekend, new device, weak or no MFA
        i = pick(9)
        k = len(i)
        user[i], country[i] = admins(k)
        utype[i] = "admin"
        abroad = rng.random(k) < 0.4
        country[i] = np.where(abroad, rng.choice(_ATTACK_COUNTRIES, k, p=_ATTACK_COUNTRY_P), country[i])
        network[i] = rng.choice(np.array(["residential", "hosting"], dtype=object), k)
        src[i] = np.where(network[i] == "hosting", rng.choice(d.hosting, k), _public_ips(rng, k))
        app[i] = rng.choice(np.array(["admin_console", "ssh", "rdp"], dtype=object), k, p=[0.5, 0.3, 0.2])
        method[i] = "password"
        mfa[i] = rng.choice(np.array(["none", "sms"], dtype=object), k)
        hour[i] = rng.choice(np.array([22, 23, 0, 1, 2, 3, 4, 5]), k)
        weekday[i] = np.where(rng.random(k) < 0.4, rng.integers(5, 7, k), rng.integers(0, 5, k))
        dist[i] = np.where(abroad, rng.uniform(1500, 12000, k), rng.exponential(60.0, k))
        user_fail[i] = rng.integers(0, 5, k)
        src_fail[i] = user_fail[i]
        new_device[i] = rng.random(k) < 0.85

        host[:] = app_hosts(app)
        dist = np.round(np.minimum(dist, 20037.0), 1)
        speed = np.round(np.minimum(dist / hours_since, 1e5), 1)
        cols = {
            "user": user, "user_type": utype, "src_ip": src, "src_country": country, "src_network": network,
            "host": host, "app": app, "auth_method": method, "result": result, "failure_reason": reason, "mfa": mfa,
            "hour_local": hour, "weekday": weekday, "geo_distance_km": dist, "geo_speed_kmh": speed,
            "src_failures_1h": src_fail.astype(np.int64), "src_users_1h": src_users.astype(np.int64),
            "user_failures_1h": user_fail.astype(np.int64), "new_device": new_device,
        }
        return cols, sub

    _keys = ("user", "user_type", "src_ip", "src_country", "src_network", "host", "app", "auth_method", "result",
             "failure_reason", "mfa", "hour_local", "weekday", "geo_distance_km", "geo_speed_kmh", "src_failures_1h",
             "src_users_1h", "user_failures_1h", "new_device")

    def events(self, ids: list[str], ts: list[float], cols: dict) -> list[dict]:
        keys = self._keys
        lists = [cols[k].tolist() for k in keys]
        out = []
        append = out.append
        for eid, t, *vals in zip(ids, ts, *lists):
            ev = {"event_id": eid, "ts": t}
            ev.update(zip(keys, vals))
            if ev["failure_reason"] is None:
                del ev["failure_reason"]  # only failures carry a reason
            append(ev)
        return out


KINDS: dict[str, "FlowKind | AuthKind"] = {"flow": FlowKind(), "auth": AuthKind()}


def _kind(kind: str) -> "FlowKind | AuthKind":
    try:
        return KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown telemetry kind {kind!r}; supported kinds: {', '.join(sorted(KINDS))}") from None


# ----------------------------------------------------------------------------- records

def _event_ids(rng: np.random.Generator, n: int, seed: int) -> list[str]:
    """uuid4-shaped ids from the seeded RNG; the seed is folded in so seeds never collide."""
    raw = np.frombuffer(rng.bytes(16 * n), dtype=np.uint8).reshape(n, 16).copy()
    # fold the seed into bytes 0..3 (xor), then set version 4 / variant bits
    sb = np.frombuffer((seed & 0xFFFFFFFF).to_bytes(4, "big"), dtype=np.uint8)
    raw[:, 12:16] = sb  # last 4 bytes = seed: distinct seeds -> disjoint id spaces
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80
    h = raw.tobytes().hex()
    return [f"{h[j:j+8]}-{h[j+8:j+12]}-{h[j+12:j+16]}-{h[j+16:j+20]}-{h[j+20:j+32]}" for j in range(0, 32 * n, 32)]


def _defect(rng: np.random.Generator, name: str, ev: dict, kind: FlowKind) -> bytes | None:
    if name == "tombstone":
        return None
    if name == "bad_utf8":
        v = orjson.dumps(ev)
        j = v.index(b'"event_id":"') + 13
        return v[:j] + b"\xff\xfe" + v[j:]
    if name == "bad_json":
        v = orjson.dumps(ev)
        style = int(rng.integers(0, 4))
        if style == 0:
            return v[: int(rng.integers(1, len(v) - 1))]  # truncated
        if style == 1:
            return v + b"}garbage"
        if style == 2:
            return v.replace(b'"', b"'")
        return b""
    if name == "not_object":
        return [b"null", b"[1,2,3]", b'"flow"', b"42", orjson.dumps([ev])][int(rng.integers(0, 5))]
    if name == "missing_field":
        ev = dict(ev)
        ev.pop(kind.required[int(rng.integers(0, len(kind.required)))])
        return orjson.dumps(ev)
    if name == "wrong_type":
        ev = dict(ev)
        f = kind.numeric[int(rng.integers(0, len(kind.numeric)))]
        ev[f] = [str(ev[f]), True, [ev[f]], {"v": ev[f]}][int(rng.integers(0, 4))]
        return orjson.dumps(ev)
    if name == "nan_literal":
        f = kind.nan_fields[int(rng.integers(0, len(kind.nan_fields)))]
        lit = [b"NaN", b"Infinity", b"-Infinity"][int(rng.integers(0, 3))]
        ev = dict(ev)
        ev[f] = "__X__"
        return orjson.dumps(ev).replace(b'"__X__"', lit)
    if name == "huge_float":
        ev = dict(ev)
        ev[kind.huge_float_field] = "__X__"
        return orjson.dumps(ev).replace(b'"__X__"', b"1e400")
    if name == "huge_int":
        ev = dict(ev)
        ev[kind.huge_int_field] = "__X__"
        return orjson.dumps(ev).replace(b'"__X__"', str(10**30).encode())
    if name == "too_deep":
        ev = dict(ev)
        ev["context"] = "__X__"
        depth = 5000
        return orjson.dumps(ev).replace(b'"__X__"', b"[" * depth + b"]" * depth)
    if name == "negative_bytes":
        ev = dict(ev)
        ev[kind.negative_fields[int(rng.integers(0, len(kind.negative_fields)))]] = -int(rng.integers(1, 5000))
        return orjson.dumps(ev)
    if name == "bad_port":
        ev = dict(ev)
        ev[kind.above_max_fields[int(rng.integers(0, len(kind.above_max_fields)))]] = int(rng.integers(*kind.above_max_range))
        return orjson.dumps(ev)
    if name == "too_large":
        ev = dict(ev)
        ev["padding"] = "x" * 70_000
        return orjson.dumps(ev)
    raise AssertionError(name)


_HEAD = b'{"event_id":'
_SEP = b'},{"event_id":'


def _dumps_many(events: list[dict]) -> list[bytes]:
    """orjson-encode many events 3x faster than one dumps() per event.

    One dumps() of the whole list, split at ``},{"event_id":``. That byte sequence
    cannot occur inside a JSON string (its quote would be escaped), and every
    event starts with ``event_id``, so the split is exact.
    """
    if not events:
        return []
    body = orjson.dumps(events)[len(_HEAD) + 1 : -2]
    out = [_HEAD + p + b"}" for p in body.split(_SEP)]
    if len(out) != len(events):  # cannot happen; be safe rather than misalign
        return [orjson.dumps(e) for e in events]
    return out


@dataclass
class _Chunk:
    events: list[dict]
    subtype: np.ndarray  # int8 codes into kind.subtypes
    bad: list[str | None]  # defect name per event, None when valid


def _chunks(kind: FlowKind, count: int | None, seed: int, bad_fraction: float, start_ts: float | None,
            rate: float | None, attack_fraction: float, drift: float) -> Iterator[_Chunk]:
    if count is not None and count < 0:
        raise ValueError("count must be >= 0")
    if not 0.0 <= bad_fraction <= 1.0:
        raise ValueError("bad_fraction must be within [0, 1]")
    if not 0.0 <= attack_fraction <= 1.0:
        raise ValueError("attack_fraction must be within [0, 1]")
    if rate is not None and rate <= 0:
        raise ValueError("rate must be > 0 events/s")
    kind_no = kind.kind_no  # fixed per kind: adding a kind never changes another kind's stream
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFF, kind_no, 0x51C3])
    rng_val, rng_id, rng_bad = (np.random.default_rng(s) for s in ss.spawn(3))
    if rate is not None and start_ts is None:
        start_ts = time.time()
    step = (1.0 / rate) if rate is not None else 0.001
    done = 0
    while count is None or done < count:
        n = CHUNK if count is None else min(CHUNK, count - done)
        cols, sub = kind.chunk(rng_val, CHUNK, attack_fraction, drift)
        if n < CHUNK:
            cols = {k: v[:n] for k, v in cols.items()}
            sub = sub[:n]
        ids = _event_ids(rng_id, CHUNK, seed)[:n]
        if start_ts is None:
            ts = np.full(n, round(time.time(), 6))
        else:
            ts = np.round(start_ts + (done + np.arange(n)) * step, 6)
        events = kind.events(ids, ts.tolist(), cols)
        bad: list[str | None] = [None] * n
        if bad_fraction > 0:
            u = rng_bad.random(CHUNK)[:n]
            which = rng_bad.choice(len(_DEFECT_NAMES), CHUNK, p=_DEFECT_P)[:n]
            for j in np.nonzero(u < bad_fraction)[0].tolist():
                bad[j] = _DEFECT_NAMES[which[j]]
        yield _Chunk(events, sub, bad)
        done += n


def generate(kind: str = "flow", count: int | None = 1000, seed: int = 0, bad_fraction: float = 0.0,
             start_ts: float | None = None, rate: float | None = None, *, attack_fraction: float = 0.05,
             drift: float = 0.0, with_labels: bool = False) -> Iterator[Record]:
    """Yield ``count`` Kafka records ``(key, value, headers)`` of synthetic telemetry.

    - ``count=None`` streams forever.
    - ``ts``: with ``rate`` events are stamped ``start_ts + i/rate`` (``start_ts`` defaults to now);
      with only ``start_ts`` they are 1 ms apart; with neither, the wall clock at generation.
      Nothing sleeps: pacing to ``rate`` is the producer's job.
    - ``bad_fraction`` of records are malformed (see ``DEFECTS``); they carry the header
      ``sluice-synthetic-defect: <expected reject reason>``.
    - ``attack_fraction``: share of valid events that are attacks.
    - ``drift``: magnitude X of a distribution shift (0 = training distribution).
    - ``with_labels``: add the ground-truth ``label`` field (attack name or ``"benign"``); training only.
    """
    k = _kind(kind)
    headers_ok = [("content-type", b"application/json"), ("sluice-event-kind", k.name.encode())]
    key_field = k.key_field
    rng_def = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFF, 0xBAD]))
    names = k.subtypes
    for ch in _chunks(k, count, seed, bad_fraction, start_ts, rate, attack_fraction, drift):
        if with_labels:
            for ev, s in zip(ch.events, ch.subtype.tolist()):
                ev["label"] = names[s] if names[s] in k.attacks else "benign"
        values = _dumps_many(ch.events)
        for ev, value, defect in zip(ch.events, values, ch.bad):
            key = ev[key_field].encode()
            if defect is None:
                yield key, value, headers_ok
            else:
                yield key, _defect(rng_def, defect, ev, k), headers_ok + [(DEFECT_HEADER, DEFECTS[defect].encode())]


@dataclass
class Labelled:
    """Training data: values exactly as the worker would see them, plus ground truth."""

    values: list[bytes]
    label: np.ndarray      # int8 [n]: 1 = attack
    subtype: np.ndarray    # object [n]: subtype name ("web", "port_scan", ...)


def generate_labelled(kind: str = "flow", count: int = 10000, seed: int = 0, *, attack_fraction: float = 0.2,
                      drift: float = 0.0, start_ts: float = 1_790_000_000.0) -> Labelled:
    """Valid events (no label field in the JSON) with labels in separate arrays."""
    k = _kind(kind)
    values: list[bytes] = []
    subs = []
    for ch in _chunks(k, count, seed, 0.0, start_ts, None, attack_fraction, drift):
        values.extend(_dumps_many(ch.events))
        subs.append(ch.subtype)
    sub = np.concatenate(subs) if subs else np.zeros(0, dtype=np.int8)
    names = np.array(k.subtypes, dtype=object)
    is_attack = np.array([s in k.attacks for s in k.subtypes])
    return Labelled(values, is_attack[sub].astype(np.int8), names[sub])


def supported_kinds() -> list[str]:
    return sorted(KINDS)
