"""deploy/ passes the validators made for each artifact, and a deliberate break in any of them fails.

Runs scripts/check-deploy (hadolint, docker compose config, promtool check/test rules, helm
lint/template + kubeconform, kubeconform on deploy/k8s against the Kubernetes and CRD schemas,
systemd-analyze verify). The tools are built or installed by scripts/deploy-tools on first use
and cached in ~/.cache/sluice/tools: on a fresh machine the first run spends about ten
minutes building them (deploy/README.md, "Validating deploy/").

A tool that cannot be built fails these tests with the tool's name; they never skip silently.
SLUICE_SKIP_DEPLOY_TOOLS=1 skips them on purpose (a machine without Go or network, say).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CHECK = ROOT / "scripts" / "check-deploy"
TOOLS = ROOT / "scripts" / "deploy-tools"

pytestmark = [
    pytest.mark.skipif(os.environ.get("SLUICE_SKIP_DEPLOY_TOOLS") == "1",
                       reason="SLUICE_SKIP_DEPLOY_TOOLS=1: deploy validators skipped on request"),
    # The first run on a machine builds the tools (helm, promtool, compose: minutes each).
    pytest.mark.timeout(2400),
]


@pytest.fixture(scope="session")
def tools() -> None:
    """Build or find every validator once per session; fail naming the tool that could not be had."""
    r = subprocess.run([str(TOOLS)], capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        failed = [ln for ln in r.stderr.splitlines() if "FAILED" in ln]
        pytest.fail(
            "scripts/deploy-tools could not build or install a deploy validator: "
            + ("; ".join(failed) or "(no FAILED line)") + "\n--- stderr tail ---\n" + r.stderr[-4000:],
            pytrace=False,
        )


def check_deploy(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(CHECK), *args], capture_output=True, text=True, cwd=ROOT)


def test_deploy_artifacts_pass_their_validators(tools) -> None:
    r = check_deploy()
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    for name in ("hadolint Dockerfile", "docker compose config", "promtool test rules alerts.test.yml",
                 "alerts: every alert fires in a test", "helm lint --strict (values 2)",
                 "helm template | kubeconform -strict (values 2)", "kubeconform -strict deploy/k8s",
                 "systemd-analyze verify sluice@.service"):
        assert f"ok      {name}" in out, f"check-deploy did not run {name!r}:\n{out}"


# (check, file under deploy/, text, replacement, what the failure output must say)
BREAKS = {
    "scaledobject-misspelt-key": (
        "k8s", "k8s/keda-scaledobject.yaml", "  maxReplicaCount: 12", "  maxReplicaCont: 12",
        "'maxReplicaCont' not allowed"),
    "triggerauthentication-misspelt-key": (
        "k8s", "k8s/keda-scaledobject.yaml", "  secretTargetRef:", "  secretTargetRefs:",
        "'secretTargetRefs' not allowed"),
    "servicemonitor-misspelt-key": (
        "k8s", "k8s/servicemonitor.yaml", "      interval: 15s", "      intervall: 15s",
        "'intervall' not allowed"),
    "statefulset-misspelt-key": (
        "k8s", "k8s/statefulset.yaml", "terminationGracePeriodSeconds: 45", "terminationGracePeriodSecond: 45",
        "'terminationGracePeriodSecond' not allowed"),
    "helm-scaledobject-misspelt-key": (
        "helm", "helm/sluice/templates/scaledobject.yaml", "  cooldownPeriod:", "  cooldownPeriods:",
        "'cooldownPeriods' not allowed"),
    "helm-servicemonitor-misspelt-key": (
        "helm", "helm/sluice/templates/servicemonitor.yaml", "  jobLabel:", "  jobLable:",
        "'jobLable' not allowed"),
    "alert-wrong-metric-name": (
        "promtool", "prometheus/alerts.yml", "expr: sluice_ready == 0", "expr: sluice_readiness == 0",
        "sluice_readiness is not a metric the worker exports"),
    "alert-never-fires": (
        "promtool", "prometheus/alerts.yml", "(sluice_drift_psi) > 0.2", "(sluice_drift_psi) > 2",
        "FAILED  promtool test rules alerts.test.yml"),
    "alert-without-test": (
        "promtool", "prometheus/alerts.yml", "  - name: sluice\n    rules:\n",
        "  - name: sluice\n    rules:\n      - alert: SluiceUntested\n        expr: sluice_inflight_batches > 100\n"
        "        labels: {severity: info}\n        annotations: {summary: untested}\n",
        "no test case in which SluiceUntested fires"),
    "compose-misspelt-key": (
        "compose", "compose/docker-compose.yml", "  stop_grace_period: 45s", "  stop_grace_periode: 45s",
        "stop_grace_periode"),
    "dockerfile-unknown-stage": (
        "hadolint", "Dockerfile", "COPY --from=build /opt/sluice /opt/sluice", "COPY --from=builder /opt/sluice /opt/sluice",
        "DL3022"),
    "systemd-misspelt-directive": (
        "systemd", "systemd/sluice@.service", "\nRestartSec=10\n", "\nRestartSecs=10\n",
        "Unknown key"),
}


def _copy_deploy(tmp_path: Path) -> Path:
    dest = tmp_path / "deploy"
    shutil.copytree(DEPLOY, dest, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


@pytest.mark.parametrize("name", sorted(BREAKS))
def test_a_deliberate_break_fails(tools, tmp_path: Path, name: str) -> None:
    check, rel, old, new, expected = BREAKS[name]
    copy = _copy_deploy(tmp_path)
    path = copy / rel
    text = path.read_text()
    assert old in text, f"{rel} no longer contains {old!r}: update this break"
    path.write_text(text.replace(old, new, 1))
    r = check_deploy("--deploy-dir", str(copy), check)
    out = r.stdout + r.stderr
    assert r.returncode != 0, f"check-deploy {check} passed on a broken {rel}:\n{out}"
    assert expected in out, out


def test_a_renamed_metric_fails_even_with_tests_renamed_to_match(tools, tmp_path: Path) -> None:
    """promtool alone passes when the alert and its test agree on a metric the worker does not export."""
    copy = _copy_deploy(tmp_path)
    for rel in ("prometheus/alerts.yml", "prometheus/alerts.test.yml"):
        p = copy / rel
        assert "sluice_paused_partitions" in p.read_text()
        p.write_text(p.read_text().replace("sluice_paused_partitions", "sluice_partitions_paused"))
    r = check_deploy("--deploy-dir", str(copy), "promtool")
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "ok      promtool test rules alerts.test.yml" in out, out  # promtool is satisfied...
    assert "sluice_partitions_paused is not a metric the worker exports" in out, out  # ...the cross-check is not


def test_an_unbroken_copy_passes(tools, tmp_path: Path) -> None:
    """The copies the break tests validate pass as they are: only the break fails them."""
    r = check_deploy("--deploy-dir", str(_copy_deploy(tmp_path)))
    assert r.returncode == 0, r.stdout + r.stderr
