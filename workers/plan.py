"""``sluice plan``: size a fleet and its monthly cost from measured throughput and latency.

    sluice plan --rate 500000 --p99-ms 500 --bench bench.json --prices deploy/prices.example.toml
    sluice plan --rate 2e6 --p99-ms 250 --bench bench.json --bench sweep-gpu.json --prices prices.toml --json

Measurements (``--bench``, repeatable):

- ``sluice bench --json FILE``: the whole worker (Kafka, decode, featurize, infer, exactly-once
  commits) on one replica: ``worker.eps`` is its maximum, ``latency.visible_p99_ms`` the p99 from
  event to readable score at ``latency.offered_eps`` (half the maximum). This is what a CPU
  replica is planned from.
- ``sluice bench-inference --sweep --json > FILE``: engines alone (no Kafka, no featurizing),
  per backend, device, precision and batch size. A CPU row is an upper bound for a replica,
  planned from only when no worker bench is given; a GPU row is how a GPU replica is planned,
  bounded by the worker's own measured rate when a worker bench is given too (the replica
  still decodes and featurizes on its CPU cores).

For each kind of replica the plan gives the replicas, partitions, cores and GPUs for ``--rate``
with headroom, the monthly cost from ``--prices`` (a TOML price table; an example ships in
deploy/prices.example.toml), and the rate above which GPU replicas cost less than CPU replicas.
Every figure names the file and field it came from.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

#: Replicas are planned to run at this share of their measured maximum. The rest is headroom:
#: a spike, a rebalance (partitions stop for seconds, then the backlog must be caught up), and
#: one replica lost with its partitions landing on the others.
TARGET_UTILISATION = 0.70
#: Partitions planned per replica: room to double the replicas (autoscaling on lag) without
#: adding partitions later, which would move keys to other partitions and break per-key order.
PARTITIONS_PER_REPLICA = 2
#: Host cores of a GPU replica when no worker bench says how many the worker uses: the
#: orchestrator and one scoring process that feeds the GPU (the worker's default layout).
GPU_REPLICA_HOST_CORES = 2
#: Hours in a month when the price table does not say (365 * 24 / 12).
HOURS_PER_MONTH = 730.0
#: At most this many rate intervals are compared when looking for the GPU break-even rate;
#: beyond it the bound that guarantees GPU is cheaper is reported instead of the exact rate.
BREAK_EVEN_SCAN_LIMIT = 200_000


class PlanError(ValueError):
    """Bad input (a missing or malformed file, a bad flag): one line naming the file, key and fix."""


def figure(value, source: str) -> dict:
    """A planned or measured number with where it came from (file: field, or the rule applied)."""
    return {"value": value, "from": source}


@dataclass
class Replica:
    """One way to run a replica, as measured: its maximum rate, its p99 and what it occupies."""

    kind: str                    # "cpu" or "gpu"
    label: str                   # e.g. "worker (sluice bench)", "onnxruntime cuda fp32 batch 1024"
    model: str
    eps: dict                    # figure: events/s at 100% of the replica
    p99_ms: dict                 # figure: the p99 that goes with it
    p99_load: float              # the share of eps at which p99 was measured (1.0: back-to-back calls)
    cores: dict                  # figure
    gpus: dict                   # figure
    whole_worker: bool           # measured through Kafka (sluice bench) or the engine alone (sweep)
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- measurements


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise PlanError(f"--bench {path}: no such file (make one with `sluice bench --json {path}` or "
                        f"`sluice bench-inference --sweep --json > {path}`)")
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise PlanError(f"--bench {path}: not valid JSON ({e}); pass the file `sluice bench --json` "
                        f"or `bench-inference --sweep --json` wrote") from None
    if not isinstance(doc, dict):
        raise PlanError(f"--bench {path}: expected a JSON object from sluice bench or bench-inference --sweep")
    return doc


def _num(doc: dict, dotted: str, path: Path, positive: bool = True) -> float:
    """``doc``'s number at a dotted key, or PlanError naming the file and the key."""
    v = doc
    for part in dotted.split("."):
        v = v.get(part) if isinstance(v, dict) else None
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or (positive and v <= 0):
        raise PlanError(f"--bench {path}: field {dotted!r} is {v!r}, expected a positive number; "
                        f"rerun the bench that wrote it")
    return float(v)


def from_worker_bench(doc: dict, path: Path) -> Replica:
    """A CPU replica from ``sluice bench --json``: the whole worker, measured through Kafka."""
    eps = _num(doc, "worker.eps", path)
    p99 = _num(doc, "latency.visible_p99_ms", path)
    offered = _num(doc, "latency.offered_eps", path)
    settings = doc.get("settings") if isinstance(doc.get("settings"), dict) else {}
    processes = settings.get("processes")
    threads = settings.get("threads", 1)
    if not isinstance(processes, int) or processes < 0 or not isinstance(threads, int) or threads < 1:
        raise PlanError(f"--bench {path}: fields 'settings.processes' and 'settings.threads' are "
                        f"{processes!r}, {threads!r}; rerun sluice bench")
    cpus = doc.get("machine", {}).get("cpus") if isinstance(doc.get("machine"), dict) else None
    # the orchestrator thread needs a core of its own; the scoring work runs in `processes`
    # processes, or on `threads` threads inside the worker when processes = 0
    want = (processes if processes > 0 else threads) + 1
    cores = min(want, cpus) if isinstance(cpus, int) and cpus > 0 else want
    core_src = (f"{path}: settings.processes={processes} scoring processes + 1 orchestrator"
                if processes > 0 else f"{path}: settings.threads={threads} scoring threads + 1 orchestrator")
    if cores < want:
        core_src += f", at most machine.cpus={cpus}"
    notes = []
    if isinstance(cpus, int) and cpus <= cores:
        notes.append(f"measured on {cpus} CPUs shared with the broker and the load generator: a replica "
                     f"on cores of its own likely does more, so this plan errs on the safe side")
    return Replica(
        kind="cpu", label="whole worker (sluice bench)", model=str(doc.get("model", "flow_classifier")),
        eps=figure(eps, f"{path}: worker.eps"),
        p99_ms=figure(p99, f"{path}: latency.visible_p99_ms (event to readable score, read_committed)"),
        p99_load=offered / eps, cores=figure(cores, core_src), gpus=figure(0, "CPU replica"),
        whole_worker=True, notes=notes)


def from_sweep(doc: dict, path: Path, p99_target: float, precision: str) -> tuple[list[Replica], list[str]]:
    """Replicas from a sweep: per backend/device of ``precision``, the fastest batch size whose
    per-call p99 meets the target. Also the reasons for engines that cannot meet it."""
    rows = doc.get("rows")
    if not isinstance(rows, list):
        raise PlanError(f"--bench {path}: field 'rows' missing: not a `bench-inference --sweep --json` file")
    threads = doc.get("threads", 1)
    groups: dict[tuple[str, str], list[tuple[int, dict]]] = {}
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not all(k in r for k in ("backend", "device", "precision", "batch_size",
                                                                "rows_per_s", "p99_ms")):
            raise PlanError(f"--bench {path}: rows[{i}] lacks backend, device, precision, batch_size, rows_per_s "
                            f"or p99_ms; rerun bench-inference --sweep --json")
        if r["precision"] == precision:
            groups.setdefault((r["backend"], r["device"]), []).append((i, r))
    if not groups:
        have = sorted({str(r.get("precision")) for r in rows})
        raise PlanError(f"--bench {path}: no sweep rows of precision {precision!r} (the file has {have}); "
                        f"choose one with --precision")
    out, refused = [], []
    for (backend, device), rs in sorted(groups.items()):
        ok = [(i, r) for i, r in rs if r["p99_ms"] <= p99_target]
        if not ok:
            i, best = min(rs, key=lambda ir: ir[1]["p99_ms"])
            refused.append(f"{backend} {device} {precision}: its lowest per-call p99 is {best['p99_ms']:g} ms "
                           f"(batch {best['batch_size']}, {path}: rows[{i}].p99_ms), above the {p99_target:g} ms target")
            continue
        i, r = max(ok, key=lambda ir: ir[1]["rows_per_s"])
        gpu = str(device).startswith("cuda")
        label = f"{backend} {device} {precision} batch {r['batch_size']} (engine alone, bench-inference --sweep)"
        out.append(Replica(
            kind="gpu" if gpu else "cpu", label=label, model=str(doc.get("model", "?")),
            eps=figure(float(r["rows_per_s"]), f"{path}: rows[{i}].rows_per_s"),
            p99_ms=figure(float(r["p99_ms"]), f"{path}: rows[{i}].p99_ms (one inference call; end to end adds "
                                              f"the batch delay and the commit interval)"),
            p99_load=1.0,
            cores=figure(GPU_REPLICA_HOST_CORES, "GPU_REPLICA_HOST_CORES (orchestrator + one scoring process)")
            if gpu else figure(int(threads) + 1, f"{path}: threads={threads} engine threads + 1 orchestrator"),
            gpus=figure(1 if gpu else 0, "one GPU per replica" if gpu else "CPU replica"),
            whole_worker=False,
            notes=["engine alone: no Kafka, decoding or featurizing in this rate, so it is an upper bound; "
                   "`sluice bench --json` measures the whole worker"] if not gpu else []))
    return out, refused


def load_measurements(paths: list[Path], p99_target: float, precision: str) -> tuple[list[Replica], list[str]]:
    """Every replica kind measured in ``paths``, and the reasons some cannot meet the p99 target."""
    if not paths:
        raise PlanError("plan needs a measurement: --bench FILE from `sluice bench --json FILE` (the whole worker) "
                        "or `sluice bench-inference --sweep --json > FILE` (engines, GPU included)")
    replicas, refused = [], []
    for path in paths:
        doc = _read_json(path)
        if "worker" in doc and "latency" in doc:
            replicas.append(from_worker_bench(doc, path))
        elif "rows" in doc:
            got, why = from_sweep(doc, path, p99_target, precision)
            replicas += got
            refused += why
        elif "runs" in doc:
            raise PlanError(f"--bench {path}: a bench-inference file without --sweep; rerun it with --sweep --json")
        else:
            raise PlanError(f"--bench {path}: neither `sluice bench --json` (fields worker, latency) nor "
                            f"`bench-inference --sweep --json` (field rows)")
    models = sorted({r.model for r in replicas if r.model != "?"})
    if len(models) > 1:
        raise PlanError(f"--bench files measure different models ({', '.join(models)}); plan one model at a time")
    # A GPU replica still consumes, decodes and featurizes on its host cores: it cannot beat the
    # whole worker measured on CPU (a conservative bound: that rate includes CPU inference).
    worker = max((r for r in replicas if r.whole_worker), key=lambda r: r.eps["value"], default=None)
    if worker is not None:  # the whole CPU replica is measured: engine-alone CPU rows would only overstate it
        replicas = [r for r in replicas if r.kind != "cpu" or r.whole_worker]
    for r in replicas:
        if r.kind != "gpu":
            continue
        if worker is None:
            r.notes.append("engine alone: no worker bench given (--bench from `sluice bench --json`) to bound "
                           "the CPU side of the replica, so this rate is an upper bound")
            continue
        r.cores = figure(worker.cores["value"], f"as the worker bench: {worker.cores['from']}")
        if worker.eps["value"] < r.eps["value"]:
            r.notes.append(f"the engine alone does {r.eps['value']:,.0f} rows/s ({r.eps['from']}); the replica is "
                           f"bounded by its CPU side, the whole worker's rate")
            r.eps = figure(worker.eps["value"], f"{worker.eps['from']} (the CPU side bounds a GPU replica)")
    return replicas, refused


# ----------------------------------------------------------------------------- prices


@dataclass
class Prices:
    """A user's price table: per-core-hour and per-GPU-hour prices, and/or instance shapes."""

    path: Path
    currency: str
    hours: float
    per_core_hour: float | None
    per_gpu_hour: float | None
    shapes: list[dict]


def load_prices(path: Path) -> Prices:
    """Read a price table (see deploy/prices.example.toml); PlanError names the file and key."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    if not path.is_file():
        raise PlanError(f"--prices {path}: no such file (deploy/prices.example.toml shows the format)")
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise PlanError(f"--prices {path}: not valid TOML: {e}") from None

    def num(d: dict, key: str, where: str, required: bool = False, allow_zero: bool = True):
        v = d.get(key)
        if v is None and not required:
            return None
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0 or (not allow_zero and v == 0):
            raise PlanError(f"--prices {path}: key '{where}{key}' is {v!r}, expected a "
                            f"{'positive' if not allow_zero else 'non-negative'} number")
        return float(v)

    unit = doc.get("unit", {})
    if not isinstance(unit, dict):
        raise PlanError(f"--prices {path}: key 'unit' must be a table ([unit])")
    shapes = []
    for i, s in enumerate(doc.get("shapes", []) or []):
        where = f"shapes[{i}]."
        if not isinstance(s, dict) or not isinstance(s.get("name"), str):
            raise PlanError(f"--prices {path}: key '{where}name' missing ([[shapes]] need name, cores, gpus, per_hour)")
        cores = num(s, "cores", where, required=True, allow_zero=False)
        gpus = num(s, "gpus", where) or 0.0
        shapes.append({"name": s["name"], "cores": int(cores), "gpus": int(gpus),
                       "per_hour": num(s, "per_hour", where, required=True), "index": i})
    prices = Prices(path=path, currency=str(doc.get("currency", "USD")),
                    hours=num(doc, "hours_per_month", "", allow_zero=False) or HOURS_PER_MONTH,
                    per_core_hour=num(unit, "per_core_hour", "unit."), per_gpu_hour=num(unit, "per_gpu_hour", "unit."),
                    shapes=shapes)
    if prices.per_core_hour is None and not shapes:
        raise PlanError(f"--prices {path}: needs [unit] per_core_hour (and per_gpu_hour for GPUs) or [[shapes]]")
    return prices


def price_options(r: Replica, prices: Prices) -> list[dict]:
    """Ways to pay for replicas like ``r``: per-unit prices (cores and GPUs) and each instance shape
    that holds at least one. Each is {"price": per hour of one unit, "fit": replicas per unit, "from"}."""
    cores, gpus = r.cores["value"], r.gpus["value"]
    options = []
    if prices.per_core_hour is not None and (gpus == 0 or prices.per_gpu_hour is not None):
        options.append({"price": cores * prices.per_core_hour + gpus * (prices.per_gpu_hour or 0.0), "fit": 1,
                        "shape": None,
                        "from": f"{prices.path}: unit.per_core_hour" + (", unit.per_gpu_hour" if gpus else "")
                                + f" for {cores} cores" + (f" + {gpus} GPU" if gpus else "") + " per replica"})
    for s in prices.shapes:
        fit = s["cores"] // cores if cores else 10**9
        if gpus:
            fit = min(fit, s["gpus"] // gpus)
        if fit >= 1:
            options.append({"price": s["per_hour"], "fit": fit, "shape": s["name"],
                            "from": f"{prices.path}: shapes[{s['index']}] {s['name']} ({s['cores']} cores, "
                                    f"{s['gpus']} GPUs, per_hour {s['per_hour']:g}), {fit} replicas each"})
    return options


def cost_of(replicas: int, r: Replica, prices: Prices) -> dict | None:
    """The cheapest monthly cost of ``replicas`` replicas like ``r``, with how it was priced; None if unpriced.

    Instance shapes hold whole replicas (cores and GPUs per instance); per-unit prices charge
    cores and GPUs. The cheapest way is the cost.
    """
    best = None
    for o in price_options(r, prices):
        units = math.ceil(replicas / o["fit"])
        monthly = units * o["price"] * prices.hours
        if best is None or monthly < best["monthly"]:
            what = f"{units} instances" if o["shape"] else f"{replicas} replicas"
            best = {"monthly": monthly, "shape": o["shape"], "instances": units if o["shape"] else None,
                    "from": f"{o['from']}; {what} x {o['price']:g}/h x {prices.hours:g} h"}
    return best


# ----------------------------------------------------------------------------- the plan


def utilisation(r: Replica) -> tuple[float, str]:
    """The share of its maximum a replica is planned at, and why."""
    if r.p99_load < TARGET_UTILISATION:
        return r.p99_load, (f"{r.p99_load:.0%}: the load at which its p99 was measured (above it the p99 is "
                            f"not known); TARGET_UTILISATION {TARGET_UTILISATION:.0%} otherwise")
    return TARGET_UTILISATION, f"TARGET_UTILISATION {TARGET_UTILISATION:.0%} (headroom for spikes, rebalances, a lost replica)"


def plan_replica(rate: float, p99_target: float, r: Replica, prices: Prices | None) -> dict:
    """Replicas, partitions, cores, GPUs and cost to serve ``rate`` with replicas like ``r``."""
    out = {"kind": r.kind, "label": r.label, "model": r.model, "per_replica_eps": r.eps, "p99_ms": r.p99_ms,
           "cores_per_replica": r.cores, "gpus_per_replica": r.gpus, "whole_worker": r.whole_worker,
           "notes": list(r.notes)}
    p99 = r.p99_ms["value"]
    if p99 > p99_target:
        where = (f"at {r.p99_load:.0%} of the replica's maximum" if r.whole_worker else "per inference call")
        why = (f"the p99 target {p99_target:g} ms cannot be met: the measured p99 is {p99:.4g} ms {where} "
               f"({r.p99_ms['from']})")
        if r.whole_worker:
            why += ("; more replicas only lower each one's load, and it was measured at half load already: "
                    "most of it is the commit interval ([transactions] commit_interval_ms, 100 ms in the bench): "
                    "lower it and bench again")
        return {**out, "feasible": False, "reason": why}
    u, u_why = utilisation(r)
    planned = r.eps["value"] * u
    n = max(1, math.ceil(rate / planned))
    out.update({
        "feasible": True,
        "utilisation": figure(u, u_why),
        "replicas": figure(n, f"ceil({rate:g} / ({r.eps['value']:,.0f} x {u:.2f}))"),
        "partitions": figure(n * PARTITIONS_PER_REPLICA,
                             f"{n} replicas x PARTITIONS_PER_REPLICA {PARTITIONS_PER_REPLICA} (room to double the "
                             f"replicas without repartitioning)"),
        "cores": figure(n * r.cores["value"], f"{n} x {r.cores['value']} cores per replica"),
        "gpus": figure(n * r.gpus["value"], f"{n} x {r.gpus['value']} GPUs per replica"),
        "load_per_replica": figure(rate / n / r.eps["value"], "rate / replicas / per-replica maximum"),
    })
    if prices is not None:
        c = cost_of(n, r, prices)
        out["monthly_cost"] = (figure(round(c["monthly"], 2), c["from"]) if c else
                               figure(None, f"{prices.path}: no price fits this replica (needs per_gpu_hour or a "
                                            f"shape with {r.cores['value']} cores and {r.gpus['value']} GPUs)"))
        out["currency"] = prices.currency
    return out


def break_even(cpu: Replica, gpu: Replica, prices: Prices) -> dict:
    """The rate above which GPU replicas cost no more than CPU replicas, both planned as in plan_replica."""
    ucpu, ugpu = utilisation(cpu)[0], utilisation(gpu)[0]
    cap_c, cap_g = cpu.eps["value"] * ucpu, gpu.eps["value"] * ugpu
    opt_c, opt_g = price_options(cpu, prices), price_options(gpu, prices)
    if not opt_c or not opt_g:
        return {"rate": None, "reason": f"not computed: {prices.path} prices only one of the two replica kinds"}

    def slope(o: dict, cap: float) -> float:  # monthly cost per planned event/s, far out
        return o["price"] * prices.hours / (o["fit"] * cap)

    slope_c = min(slope(o, cap_c) for o in opt_c)
    best_g = min(opt_g, key=lambda o: slope(o, cap_g))
    slope_g = slope(best_g, cap_g)
    per_k = {"cpu": slope_c * 1000, "gpu": slope_g * 1000}
    src = (f"CPU {cpu.eps['from']}, GPU {gpu.eps['from']}, planned at {ucpu:.0%} / {ugpu:.0%}; "
           f"prices {prices.path}")
    if slope_g >= slope_c:
        return {"rate": None, "monthly_per_1k_eps": per_k, "from": src,
                "reason": f"never at these measurements: GPU replicas cost {per_k['gpu']:.4g} {prices.currency} per "
                          f"1k events/s a month, CPU replicas {per_k['cpu']:.4g}"}
    # Both fleet costs are step functions of the rate, constant between multiples of the replicas'
    # planned capacities. The CPU fleet costs at least rate * slope_c; the GPU fleet at most
    # rate * slope_g + 2 units of its cheapest-per-event option (rounding up replicas, then
    # instances), so above `guard` the GPU fleet is cheaper whatever the steps.
    guard = 2 * best_g["price"] * prices.hours / (slope_c - slope_g)
    if guard / min(cap_c, cap_g) > BREAK_EVEN_SCAN_LIMIT:
        return {"rate": round(guard), "exact": False, "monthly_per_1k_eps": per_k, "from": src,
                "reason": "an upper bound: GPU replicas are cheaper at every rate above it (exact scan skipped)"}
    points = sorted({k * cap_c for k in range(1, int(guard / cap_c) + 2)} |
                    {k * cap_g for k in range(1, int(guard / cap_g) + 2)})
    last_dearer = 0.0
    for right in points:  # every rate in (previous point, right] needs the same replica counts
        n_c, n_g = math.ceil(right / cap_c - 1e-9), math.ceil(right / cap_g - 1e-9)
        if cost_of(n_g, gpu, prices)["monthly"] > cost_of(n_c, cpu, prices)["monthly"]:
            last_dearer = right
    if not last_dearer:
        return {"rate": 0, "exact": True, "monthly_per_1k_eps": per_k, "from": src,
                "reason": "GPU replicas cost no more than CPU replicas at every rate"}
    n_c, n_g = math.ceil(last_dearer / cap_c - 1e-9), math.ceil(last_dearer / cap_g - 1e-9)
    c_c, c_g = cost_of(n_c, cpu, prices)["monthly"], cost_of(n_g, gpu, prices)["monthly"]
    return {"rate": round(last_dearer), "exact": True, "monthly_per_1k_eps": per_k, "from": src,
            "reason": (f"above it GPU replicas cost no more than CPU replicas; at it {n_g} GPU replicas cost "
                       f"{c_g:,.2f} and {n_c} CPU replicas {c_c:,.2f} {prices.currency}/month")}


def make_plan(rate: float, p99_target: float, bench: list[Path], prices_path: Path | None = None,
              precision: str = "fp32") -> dict:
    """The whole plan as a JSON-ready dict; raises PlanError for bad input."""
    if not rate > 0:
        raise PlanError(f"--rate {rate:g}: must be a positive number of events per second")
    if not p99_target > 0:
        raise PlanError(f"--p99-ms {p99_target:g}: must be a positive number of milliseconds")
    replicas, refused = load_measurements(list(bench), p99_target, precision)
    prices = load_prices(prices_path) if prices_path is not None else None
    plans = [plan_replica(rate, p99_target, r, prices) for r in replicas]
    best = {}
    for kind in ("cpu", "gpu"):
        ok = [(p, r) for p, r in zip(plans, replicas) if p["kind"] == kind and p["feasible"]]
        if not ok:
            continue
        # prefer the whole-worker measurement (it is the real replica), then the cheapest, then the fewest
        key = (lambda pr: (not pr[0]["whole_worker"],
                           (pr[0].get("monthly_cost") or {}).get("value") or 0.0, pr[0]["replicas"]["value"]))
        best[kind] = min(ok, key=key)
    result = {
        "rate_eps": rate, "p99_target_ms": p99_target, "precision": precision,
        "target_utilisation": TARGET_UTILISATION, "partitions_per_replica": PARTITIONS_PER_REPLICA,
        "bench_files": [str(p) for p in bench], "prices": str(prices_path) if prices_path else None,
        "plans": plans, "cannot_meet": refused,
        "chosen": {k: v[0]["label"] for k, v in best.items()},
        "feasible": bool(best),
    }
    if "cpu" in best and "gpu" in best and prices is not None:
        result["break_even"] = break_even(best["cpu"][1], best["gpu"][1], prices)
    else:
        missing = [w for w, ok in (("a GPU replica that meets the target (measured by bench-inference --sweep "
                                    "--json on a GPU machine)", "gpu" in best),
                                   ("a CPU replica that meets the target", "cpu" in best),
                                   ("--prices", prices is not None)) if not ok]
        result["break_even"] = {"rate": None, "reason": "not computed: needs " + ", ".join(missing)}
    return result


def _v(f: dict, fmt: str = ",.0f") -> str:
    v = f["value"]
    return "-" if v is None else format(v, fmt)


def format_plan(plan: dict) -> str:
    """The plan as text: per replica kind the figures, each followed by where it came from."""
    lines = [f"sluice plan: {plan['rate_eps']:,.0f} events/s with p99 <= {plan['p99_target_ms']:g} ms "
             f"(replicas planned at <= {plan['target_utilisation']:.0%} of their measured maximum)"]
    for p in plan["plans"]:
        chosen = plan["chosen"].get(p["kind"]) == p["label"]
        lines.append("")
        lines.append(f"{p['kind'].upper()} replicas: {p['label']}{'  <- chosen' if chosen else ''}")
        eps, p99 = f"{_v(p['per_replica_eps'])} events/s max", f"p99 {_v(p['p99_ms'], '.4g')} ms"
        lines.append(f"  per replica  {eps:<24} [{p['per_replica_eps']['from']}]")
        lines.append(f"               {p99:<24} [{p['p99_ms']['from']}]")
        cores = f"{_v(p['cores_per_replica'])} cores, {_v(p['gpus_per_replica'])} GPUs"
        lines.append(f"               {cores:<24} [{p['cores_per_replica']['from']}]")
        for n in p["notes"]:
            lines.append(f"  note: {n}")
        if not p["feasible"]:
            lines.append(f"  CANNOT MEET: {p['reason']}")
            continue
        lines.append(f"  planned at   {format(p['utilisation']['value'], '.0%'):<24} [{p['utilisation']['from']}]")
        for key, name in (("replicas", "replicas"), ("partitions", "partitions"), ("cores", "cores"), ("gpus", "GPUs")):
            lines.append(f"  {name:<12} {_v(p[key]):<24} [{p[key]['from']}]")
        if "monthly_cost" in p:
            mc = p["monthly_cost"]
            lines.append(f"  monthly cost {p['currency'] + ' ' + _v(mc, ',.2f'):<24} [{mc['from']}]")
        else:
            lines.append("  monthly cost not computed: no --prices (deploy/prices.example.toml shows the format)")
    for r in plan["cannot_meet"]:
        lines.append(f"cannot meet the p99 target: {r}")
    be = plan["break_even"]
    lines.append("")
    if be.get("rate") is not None:
        lines.append(f"GPU break-even: {be['rate']:,} events/s: {be['reason']}")
    else:
        lines.append(f"GPU break-even: {be['reason']}")
    if be.get("monthly_per_1k_eps"):
        lines.append(f"  per 1k events/s a month: CPU {be['monthly_per_1k_eps']['cpu']:.4g}, GPU "
                     f"{be['monthly_per_1k_eps']['gpu']:.4g}  [{be['from']}]")
    if not plan["feasible"]:
        lines.append("no measured replica meets the p99 target (see CANNOT MEET above)")
    return "\n".join(lines)


def run_cli(args) -> int:
    """``sluice plan``: 0 with a plan, 1 when no measured replica can meet the p99 target, 2 for bad input."""
    try:
        plan = make_plan(args.rate, args.p99_ms, args.bench or [], args.prices, args.precision)
    except PlanError as e:
        print(f"sluice plan: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(plan, indent=1))
    else:
        print(format_plan(plan))
    if not plan["feasible"]:
        print("sluice plan: the p99 target cannot be met by any measured replica (reasons above)", file=sys.stderr)
        return 1
    return 0
