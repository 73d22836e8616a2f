"""Cross-checks between deploy/ and the worker that no single tool makes; run by scripts/check-deploy.

    python deploy/ci/promql_refs.py alerts ALERTS.yml ALERTS.test.yml
        every alert of ALERTS.yml fires (non-empty exp_alerts) in some promtool test case of
        ALERTS.test.yml; every series those tests feed, and every sluice_* metric the alert
        expressions select, is one the worker exports (workers.metrics), with its labels
    python deploy/ci/promql_refs.py dashboard DASHBOARD.json
        every sluice_* metric the dashboard queries is exported, with its labels
    python deploy/ci/promql_refs.py dashboard-rules DASHBOARD.json
        prints a Prometheus rules file with one recording rule per dashboard query (Grafana
        variables substituted), for `promtool check rules`
    python deploy/ci/promql_refs.py kustomization KUSTOMIZATION.yaml
        every resource the kustomization lists exists beside it

Why: `promtool test rules` proves an alert fires on the series the test feeds it; this proves
those series are the ones the worker really exports, so a metric renamed in the worker or
misspelt in an alert cannot pass with a test written to match the mistake.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

_SELECTOR = re.compile(r"\b(sluice_[a-zA-Z0-9_]+)\s*(\{[^}]*\})?")
_LABEL_MATCH = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_SERIES = re.compile(r"^\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{.*\})?\s*$")
# Series Prometheus makes itself, and labels it attaches to every scraped series.
PROMETHEUS_SERIES = {"up": set(), "scrape_duration_seconds": set(), "scrape_samples_scraped": set()}
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "container", "endpoint"}


def exported() -> dict[str, set[str]]:
    """Every series name the worker exposes (workers.metrics.Metrics().registry) with its labels."""
    from workers.metrics import Metrics

    m = Metrics()
    labels: dict[str, set[str]] = {}
    for attr in vars(m).values():
        names = getattr(attr, "_labelnames", None)
        if names is not None:
            labels[attr._name] = set(names)
    out: dict[str, set[str]] = {}
    for fam in m.registry.collect():
        lab = labels.get(fam.name, set())
        if fam.type == "counter":
            suffixes = ("_total", "_created")
        elif fam.type == "histogram":
            suffixes = ("_bucket", "_sum", "_count", "_created")
        elif fam.type == "info":
            suffixes = ("_info",)
            lab = lab | {"name", "version", "backend", "device"}  # the dict given to .info()
        else:
            suffixes = ("",)
        for s in suffixes:
            out[fam.name + s] = lab | ({"le"} if s == "_bucket" else set())
    return out


def check_selectors(exprs: list[str], where: str, known: dict[str, set[str]]) -> list[str]:
    problems = []
    for expr in exprs:
        for name, selector in _SELECTOR.findall(expr):
            if name not in known:
                problems.append(f"{where}: {name} is not a metric the worker exports (in: {' '.join(expr.split())[:100]})")
                continue
            for label in _LABEL_MATCH.findall(selector or ""):
                if label not in known[name] and label not in TARGET_LABELS:
                    problems.append(f"{where}: {name} has no label {label!r} (it has {sorted(known[name])})")
    return problems


def cmd_alerts(alerts_path: str, tests_path: str) -> list[str]:
    known = exported()
    alerts = yaml.safe_load(Path(alerts_path).read_text())
    rules = [r for g in alerts["groups"] for r in g["rules"]]
    problems = check_selectors([r["expr"] for r in rules], Path(alerts_path).name, known)

    tests = yaml.safe_load(Path(tests_path).read_text())
    fired: set[str] = set()
    for case in tests.get("tests", []):
        for exp in case.get("alert_rule_test", []):
            if exp.get("exp_alerts"):
                fired.add(exp["alertname"])
        for s in case.get("input_series", []):
            m = _SERIES.match(s["series"])
            if not m:
                problems.append(f"{Path(tests_path).name}: cannot read series {s['series']!r}")
                continue
            name, selector = m.groups()
            labs = known.get(name, PROMETHEUS_SERIES.get(name))
            if labs is None:
                problems.append(f"{Path(tests_path).name}: input series {name} is not a metric the worker exports")
                continue
            for label in _LABEL_MATCH.findall(selector or ""):
                if label not in labs and label not in TARGET_LABELS and label != "__name__":
                    problems.append(f"{Path(tests_path).name}: input series {name} has no label {label!r} (it has {sorted(labs)})")
    for r in rules:
        if "alert" in r and r["alert"] not in fired:
            problems.append(f"{Path(tests_path).name}: no test case in which {r['alert']} fires (exp_alerts)")
    return problems


def _dashboard_exprs(path: str) -> list[str]:
    dash = json.loads(Path(path).read_text())
    exprs: list[str] = []

    def walk(panels):
        for p in panels:
            exprs.extend(t["expr"] for t in p.get("targets", []) if t.get("expr"))
            walk(p.get("panels", []))

    walk(dash["panels"])
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            exprs.append(var["definition"])
    return exprs


def cmd_dashboard(path: str) -> list[str]:
    return check_selectors(_dashboard_exprs(path), Path(path).name, exported())


def cmd_dashboard_rules(path: str) -> list[str]:
    rules = []
    for i, e in enumerate(_dashboard_exprs(path)):
        m = re.fullmatch(r"\s*label_values\((.*),\s*[a-zA-Z_]+\)\s*", e, re.S)
        if m:  # Grafana's label_values(selector, label): the selector must be valid PromQL
            e = m.group(1)
        for var, value in (("$__rate_interval", "1m"), ("$__interval", "1m"), ("$__range", "1h"),
                           ("$job", ".*"), ("$instance", ".*")):
            e = e.replace(var, value)
        rules.append({"record": f"dashboard:query{i}", "expr": e})
    print(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    return []


def cmd_kustomization(path: str) -> list[str]:
    k = yaml.safe_load(Path(path).read_text())
    base = Path(path).parent
    return [f"{path}: resource {r} does not exist" for r in k.get("resources", []) if not (base / r).exists()]


def main(argv: list[str]) -> int:
    cmds = {"alerts": cmd_alerts, "dashboard": cmd_dashboard, "dashboard-rules": cmd_dashboard_rules,
            "kustomization": cmd_kustomization}
    if len(argv) < 3 or argv[1] not in cmds:
        print(__doc__, file=sys.stderr)
        return 2
    problems = cmds[argv[1]](*argv[2:])
    for p in problems:
        print(p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
