"""The operator-facing files under deploy/ agree with the worker.

- every YAML and JSON file parses;
- every ``sluice_*`` metric named in the alert rules and the Grafana dashboard is one the
  worker exports (``workers.metrics.Metrics().registry``, with prometheus-client's
  ``_total`` / ``_bucket`` / ``_sum`` / ``_count`` / ``_info`` suffixes), and every label
  those selectors match on is one the metric has;
- every ``SLUICE_*`` variable in deploy/ names a real setting (``workers.config.Settings``);
- the config files the manifests ship (ConfigMap, Helm values, compose, systemd env) load
  with ``load_settings`` under the environment the manifests set;
- every ``.Values.x.y`` path in the Helm templates exists in values.yaml;
- with ``promtool`` / ``helm`` / ``kubectl`` / ``systemd-analyze`` on PATH or in the cache of
  scripts/deploy-tools, their own checks pass (tests/deploy/test_deploy_validators.py runs every
  validator through scripts/check-deploy and builds the tools when they are missing);
- compose publishes its ports on 127.0.0.1 unless the operator opts in; the dashboard shows
  `up` and readiness; the image leaves devbroker out.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")  # PyYAML: part of the `dev` extra

from workers.config import Settings, load_settings  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
HELM = DEPLOY / "helm" / "sluice"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "sluice.json"

# Metrics referenced by deploy/ before the worker exports them. Remove an entry once
# the metric exists (test_pending_metrics_still_pending says when).
# Metrics referenced by deploy/ before the worker exports them (none at present).
PENDING_METRICS: dict[str, set[str]] = {}
# Labels Prometheus attaches to every scraped series (target and operator labels).
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "container", "endpoint"}
# SLUICE_* variables that are not settings (test harness, documented as such).
NON_SETTING_ENV = {"SLUICE_TEST_BROKER", "SLUICE_TEST_BOOTSTRAP",
                   # scripts/deploy-tools and scripts/check-deploy (deploy/README.md, "Validating deploy/")
                   "SLUICE_SKIP_DEPLOY_TOOLS", "SLUICE_TOOLS_DIR", "SLUICE_CACHE_DIR", "SLUICE_K8S_VERSION",
                   "SLUICE_K8S_SCHEMAS", "SLUICE_CRD_SCHEMAS", "SLUICE_BIN"}
TOOLS_CACHE = Path(os.environ.get("SLUICE_TOOLS_DIR")
                   or Path(os.environ.get("SLUICE_CACHE_DIR") or Path.home() / ".cache" / "sluice") / "tools")

_SELECTOR = re.compile(r"\b(sluice_[a-zA-Z0-9_]+)\s*(\{[^}]*\})?")
_LABEL_MATCH = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_ENV = re.compile(r"\bSLUICE_[A-Z0-9_]*[A-Z0-9](?![A-Z0-9_]*\*)")


def _tool(name: str) -> str | None:
    """A validator on PATH, or the one scripts/deploy-tools cached (newest version first)."""
    found = shutil.which(name)
    if found:
        return found
    cached = sorted((p for p in TOOLS_CACHE.glob(f"{name}-*/bin/{name}") if not p.parent.parent.name.endswith(".tmp")),
                    reverse=True)
    return str(cached[0]) if cached else None


def _deploy_files(*suffixes: str) -> list[Path]:
    return sorted(
        p for p in DEPLOY.rglob("*")
        if p.is_file() and p.suffix in suffixes and "templates" not in p.relative_to(DEPLOY).parts
    )


def _exported() -> dict[str, set[str]]:
    """Every series name the worker exposes, mapped to its label names: deploy/ci/promql_refs.py's
    list, the one the deploy validators check alerts and the dashboard against."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("promql_refs", DEPLOY / "ci" / "promql_refs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.exported()


def _alert_exprs() -> list[str]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [r["expr"] for g in doc["groups"] for r in g["rules"]]


def _dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = []

    def walk(panels):
        for p in panels:
            exprs.extend(t["expr"] for t in p.get("targets", []) if t.get("expr"))
            walk(p.get("panels", []))

    walk(dash["panels"])
    for var in dash["templating"]["list"]:
        if var.get("type") == "query":
            exprs.append(var["definition"])
    return exprs


# ----------------------------------------------------------------------------- parsing

@pytest.mark.parametrize("path", _deploy_files(".yml", ".yaml"), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} holds no YAML document"
    for d in docs:
        assert isinstance(d, dict), f"{path}: top level is {type(d).__name__}, expected a mapping"
        if "kind" in d and d["kind"] != "Kustomization":  # a Kubernetes object
            assert d.get("apiVersion") and d.get("metadata", {}).get("name"), f"{path}: {d['kind']} lacks apiVersion/name"


@pytest.mark.parametrize("path", _deploy_files(".json"), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_json_parses(path: Path) -> None:
    assert isinstance(json.loads(path.read_text()), dict)


# ----------------------------------------------------------------------------- metrics

def _check_metric_refs(exprs: list[str], where: str) -> set[str]:
    exported = _exported()
    known = dict(exported)
    for name, labs in PENDING_METRICS.items():
        known.setdefault(name, labs)
    problems, seen = [], set()
    for expr in exprs:
        for name, selector in _SELECTOR.findall(expr):
            seen.add(name)
            if name not in known:
                problems.append(f"{where}: {name} is not exported by workers.metrics (in: {expr.strip()[:80]})")
                continue
            for label in _LABEL_MATCH.findall(selector or ""):
                if label not in known[name] and label not in TARGET_LABELS:
                    problems.append(f"{where}: {name} has no label {label!r} (has {sorted(known[name])})")
    assert not problems, "\n".join(problems)
    return seen


def test_alert_metrics_exist() -> None:
    seen = _check_metric_refs(_alert_exprs(), "alerts.yml")
    assert {"sluice_consumer_lag", "sluice_transactions_committed_total", "sluice_drift_psi"} <= seen


def test_dashboard_metrics_exist() -> None:
    seen = _check_metric_refs(_dashboard_exprs(), "grafana/sluice.json")
    assert {"sluice_batch_size_sum", "sluice_batch_size_count", "sluice_end_to_end_latency_seconds_bucket"} <= seen


def test_pending_metrics_still_pending() -> None:
    """Once a pending metric is exported, drop it from PENDING_METRICS so its labels are checked for real."""
    exported = _exported()
    arrived = sorted(n for n in PENDING_METRICS if n in exported)
    assert not arrived, f"{arrived} now exported by workers.metrics: remove from PENDING_METRICS"


def test_alerts_have_summary_and_severity() -> None:
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            assert rule["labels"].get("severity") in {"critical", "warning", "info"}, rule["alert"]
            assert rule["annotations"].get("summary"), rule["alert"]


# ----------------------------------------------------------------------------- settings

def _setting_env_names() -> set[str]:
    names = set()
    for section, field in Settings.model_fields.items():
        if section == "routes":  # a list: only SLUICE_ROUTES as a whole (JSON)
            names.add("SLUICE_ROUTES")
            continue
        for key in field.annotation.model_fields:  # type: ignore[union-attr]
            names.add(f"SLUICE_{section.upper()}__{key.upper()}")
    return names


def test_env_vars_name_real_settings() -> None:
    valid = _setting_env_names()
    problems = []
    for path in sorted(p for p in DEPLOY.rglob("*") if p.is_file()):
        for name in set(_ENV.findall(path.read_text(errors="replace"))):
            if name not in valid and name not in NON_SETTING_ENV:
                problems.append(f"{path.relative_to(ROOT)}: {name} names no setting")
    assert not problems, "\n".join(problems) + "\n(valid: `sluice check-config --reference`)"


def _k8s_docs(directory: Path) -> list[dict]:
    docs = []
    for p in sorted(directory.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(p.read_text()) if d]
    return docs


def _literal_env(container: dict, secrets: dict[str, str]) -> dict[str, str]:
    env = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = str(e["value"])
        elif e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env[e["name"]] = "sluice-0"
    for ref in container.get("envFrom", []):
        if "secretRef" in ref:
            env.update(secrets)
    return env


def test_k8s_config_loads(tmp_path: Path) -> None:
    docs = _k8s_docs(DEPLOY / "k8s")
    by_kind = {d["kind"]: d for d in docs}
    cfg = tmp_path / "sluice.toml"
    cfg.write_text(by_kind["ConfigMap"]["data"]["sluice.toml"])
    sts = by_kind["StatefulSet"]
    secrets = {k: v for k, v in by_kind["Secret"]["stringData"].items() if k.startswith("SLUICE_")}
    env = _literal_env(sts["spec"]["template"]["spec"]["containers"][0], secrets)
    s = load_settings(cfg, environ=env)
    assert s.kafka.replica_id == "sluice-0"
    assert s.kafka.client["security.protocol"] == "SASL_SSL"
    # The kubelet's SIGKILL must come after the worker's own drain deadline.
    grace = sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace * 1000 > s.transactions.shutdown_timeout_ms + 5000
    # KEDA watches the worker's group and topic, and never scales past what has work.
    so = by_kind["ScaledObject"]
    trig = so["spec"]["triggers"][0]["metadata"]
    assert trig["consumerGroup"] == s.kafka.group_id
    assert trig["topic"] in s.kafka.input_topics
    assert so["spec"]["scaleTargetRef"]["kind"] == "StatefulSet"
    probes = sts["spec"]["template"]["spec"]["containers"][0]
    assert probes["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_helm_values_config_loads(tmp_path: Path) -> None:
    values = yaml.safe_load((HELM / "values.yaml").read_text())
    cfg = tmp_path / "sluice.toml"
    cfg.write_text(values["config"])
    env = {
        "SLUICE_KAFKA__REPLICA_ID": "sluice-0",
        "SLUICE_KAFKA__BOOTSTRAP_SERVERS": values["kafka"]["bootstrapServers"],
        "SLUICE_KAFKA__GROUP_ID": values["kafka"]["groupId"],
        "SLUICE_KAFKA__INPUT_TOPICS": json.dumps(values["kafka"]["inputTopics"]),
        "SLUICE_METRICS__PORT": str(values["metrics"]["port"]),
    }
    s = load_settings(cfg, environ=env)
    assert values["terminationGracePeriodSeconds"] * 1000 > s.transactions.shutdown_timeout_ms + 5000


def test_compose_workers_config_loads() -> None:
    compose = yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())
    workers = {n: svc for n, svc in compose["services"].items() if n.startswith("sluice-")}
    assert len(workers) >= 2
    ids = set()
    for svc in workers.values():
        s = load_settings(DEPLOY / "sluice.toml", environ={k: str(v) for k, v in svc["environment"].items()})
        ids.add(s.kafka.replica_id)
    assert len(ids) == len(workers), "compose workers must have distinct replica ids"


def test_systemd_env_loads() -> None:
    unit = (DEPLOY / "systemd" / "sluice@.service").read_text()
    env = {"SLUICE_KAFKA__REPLICA_ID": "node1-a"}
    for line in unit.splitlines():
        if line.startswith("Environment=") and "%i" not in line:
            k, _, v = line.removeprefix("Environment=").partition("=")
            env[k] = v
    for name in ("sluice.env.example", "sluice-instance.env.example"):
        for line in (DEPLOY / "systemd" / name).read_text().splitlines():
            if line and not line.startswith("#"):
                k, _, v = line.partition("=")
                env[k] = v
    s = load_settings(DEPLOY / "sluice.toml", environ=env)
    assert s.kafka.client["sasl.mechanisms"] == "SCRAM-SHA-512"
    stop = int(re.search(r"^TimeoutStopSec=(\d+)$", unit, re.M).group(1))
    assert stop * 1000 > s.transactions.shutdown_timeout_ms + 5000
    assert re.search(r"^Environment=SLUICE_KAFKA__REPLICA_ID=%i$", unit, re.M)


# ----------------------------------------------------------------------------- helm

def test_helm_template_paths_exist_in_values() -> None:
    values = yaml.safe_load((HELM / "values.yaml").read_text())
    templates = sorted((HELM / "templates").glob("*"))
    text = "\n".join(p.read_text() for p in templates)
    problems = []
    for path in sorted(set(re.findall(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)", text))):
        node = values
        for part in path.strip(".").split("."):
            if not isinstance(node, dict) or part not in node:
                problems.append(f".Values{path} is not in values.yaml")
                break
            node = node[part]
    defined = set(re.findall(r'define\s+"([^"]+)"', text))
    for name in sorted(set(re.findall(r'include\s+"([^"]+)"', text)) - defined):
        problems.append(f'include "{name}" has no define')
    for p in templates:
        t = p.read_text()
        opens = len(re.findall(r"\{\{-?\s*(?:if|with|range|define)\b", t))
        ends = len(re.findall(r"\{\{-?\s*end\s*-?\}\}", t))
        if opens != ends:
            problems.append(f"{p.name}: {opens} if/with/range/define blocks but {ends} end")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("flags", [[], ["--set", "keda.enabled=true", "--set", "serviceMonitor.enabled=true",
                                        "--set", "kafka.clientSecret=s", "--set", "keda.useClientSecret=true"]])
def test_helm_renders(flags: list[str]) -> None:
    # Looked up when the test runs, not when it is collected: tests/deploy (which runs first)
    # builds the tools on a fresh machine.
    helm = _tool("helm")
    if helm is None:
        pytest.skip("helm not installed (scripts/deploy-tools helm)")
    subprocess.run([helm, "lint", str(HELM), *flags], check=True, capture_output=True)
    out = subprocess.run([helm, "template", "t", str(HELM), *flags], check=True, capture_output=True, text=True)
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    kinds = {d["kind"] for d in docs}
    assert {"StatefulSet", "ConfigMap", "Service"} <= kinds
    valid = _setting_env_names()
    for name in set(_ENV.findall(out.stdout)):
        assert name in valid, name


# ----------------------------------------------------------------------------- external tools

def test_promtool_checks(tmp_path: Path) -> None:
    promtool = _tool("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (scripts/deploy-tools promtool)")
    subprocess.run([promtool, "check", "rules", str(ALERTS)], check=True, capture_output=True)
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (tmp_path / "alerts.yml").write_text(ALERTS.read_text())
    subprocess.run([promtool, "check", "config", str(cfg)], check=True, capture_output=True)
    # The dashboard's queries are valid PromQL once Grafana's variables are substituted.
    rules = [
        {"record": f"dashboard:query{i}", "expr": e.replace("$__rate_interval", "1m").replace("$job", ".*")
         .replace("$instance", ".*")}
        for i, e in enumerate(_dashboard_exprs()) if not e.startswith("label_values")
    ]
    f = tmp_path / "dashboard_rules.yml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = subprocess.run([promtool, "check", "rules", str(f)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kustomize_builds() -> None:
    out = subprocess.run(["kubectl", "kustomize", str(DEPLOY / "k8s")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    kinds = {d["kind"] for d in yaml.safe_load_all(out.stdout) if d}
    assert {"StatefulSet", "ConfigMap", "Service", "PodDisruptionBudget"} <= kinds


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    unit = tmp_path / "sluice@test.service"
    unit.write_text((DEPLOY / "systemd" / "sluice@.service").read_text())
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True)
    # The binary is not installed here; anything else is a defect in the unit.
    problems = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip() and "is not executable" not in ln]
    assert not problems, "\n".join(problems)


# ----------------------------------------------------------------------------- exposure, dashboard, image

def test_compose_publishes_on_loopback_unless_opted_in() -> None:
    """Kafka here is PLAINTEXT, Prometheus and Grafana (anonymous) have no login: loopback by default."""
    compose = yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())
    published = []
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            published.append(name)
            assert isinstance(port, str) and port.startswith("${BIND_ADDRESS:-127.0.0.1}:"), (
                f"compose service {name} publishes {port!r} on every interface; "
                "use \"${BIND_ADDRESS:-127.0.0.1}:HOST:CONTAINER\""
            )
    assert {"kafka", "prometheus", "grafana", "sluice-0", "sluice-1"} <= set(published)


def _dashboard_panels() -> list[dict]:
    out = []

    def walk(panels):
        for p in panels:
            out.append(p)
            walk(p.get("panels", []))

    walk(json.loads(DASHBOARD.read_text())["panels"])
    return out


def test_dashboard_shows_up_and_readiness() -> None:
    exprs = [t["expr"] for p in _dashboard_panels() for t in p.get("targets", []) if t.get("expr")]
    assert any(re.search(r"\bup\{", e) for e in exprs), "no panel queries up (replica scraped)"
    assert any("sluice_ready" in e for e in exprs), "no panel queries sluice_ready (/readyz)"


def test_dashboard_titles_name_scoring_processes() -> None:
    for p in _dashboard_panels():
        text = (p.get("title", "") + " " + p.get("description", "")).lower()
        assert "inference thread" not in text, f"panel {p.get('title')!r} still speaks of inference threads"


def test_dashboard_panels_do_not_overlap() -> None:
    cells = {}
    for p in _dashboard_panels():
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panels {cells[(x, y)]!r} and {p.get('title')!r} overlap"
                cells[(x, y)] = p.get("title")
    ids = [p["id"] for p in _dashboard_panels()]
    assert len(ids) == len(set(ids)), "duplicate panel ids"


def test_image_leaves_devbroker_out() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    assert not re.search(r"^COPY\s+devbroker", dockerfile, re.M), "the image copies devbroker/"
    assert "!devbroker/" not in ignore, "the build context lets devbroker/ in"
    # Nothing the worker runs imports it at module level (demo and bench import it lazily).
    for path in (ROOT / "workers").rglob("*.py"):
        for line in path.read_text().splitlines():
            if re.match(r"(from|import)\s+devbroker\b", line):
                pytest.fail(f"{path.relative_to(ROOT)} imports devbroker at module level: {line}")
