"""The files users deploy with: docker-compose.yml, the container config, the test PACS config."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import yaml

from segnode.config import load_settings

ROOT = Path(__file__).resolve().parents[1]


def test_compose_file_is_valid():
    compose = shutil.which("docker-compose")
    assert compose, "docker-compose is installed by scripts/setup.sh"
    result = subprocess.run([compose, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_container_config_and_pacs_config_agree():
    settings = load_settings(ROOT / "docker" / "segnode.yaml")
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    pacs = json.loads((ROOT / "orthanc" / "orthanc.json").read_text())
    assert settings.dimse.host == "0.0.0.0" and settings.http.host == "0.0.0.0"
    assert pacs["DicomModalities"]["segnode"] == [settings.dimse.ae_title, "segnode", settings.dimse.port]
    assert pacs["DicomWeb"]["Servers"]["segnode"] == [f"http://segnode:{settings.http.port}/dicom-web/"]
    assert any(p.ae_title == pacs["DicomAet"] for p in settings.dimse.allowed_peers or [])
    (dest,) = [settings.destinations[d] for d in settings.routing.default_destinations]  # results go back to the PACS
    assert (dest.ae_title, dest.host, dest.port) == (pacs["DicomAet"], "orthanc", pacs["DicomPort"])
    assert dest.orthanc_url == f"http://orthanc:{pacs['HttpPort']}"
    # the OHIF route (http://localhost:8042/ohif/) reads the PACS over DICOMweb, as the demo's viewer does
    assert compose["services"]["orthanc"]["environment"]["OHIF_PLUGIN_ENABLED"] == "true"
    assert compose["services"]["orthanc"]["environment"]["DICOM_WEB_PLUGIN_ENABLED"] == "true"
    assert pacs["OHIF"]["DataSource"] == "dicom-web" and pacs["DicomWeb"]["Enable"] is True
    assert pacs["DicomWeb"]["Root"] == "/dicom-web/"
    ports = compose["services"]["segnode"]["ports"]
    assert f"{settings.dimse.port}:{settings.dimse.port}" in ports and f"{settings.http.port}:{settings.http.port}" in ports


def test_monitoring_files_name_only_metrics_the_node_exports(node):
    """deploy/: the Prometheus alert rules and the Grafana dashboard must query what /metrics serves (a renamed
    metric would silently empty a panel or never fire an alert)."""
    import re

    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{node.http_port}/metrics", timeout=10).text
    exported = {"up"}
    for family in text_string_to_metric_families(text):
        exported.update(family.name + suffix for suffix in ("", "_total", "_bucket", "_count", "_sum"))
    alerts = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    exprs = [rule["expr"] for group in alerts["groups"] for rule in group["rules"]]
    assert {rule["alert"] for group in alerts["groups"] for rule in group["rules"]} >= {
        "SegnodeDeadLetter", "SegnodeDiskUnderWatermark", "SegnodeNoWorker"}
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "segnode.json").read_text())
    exprs += [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    for expr in exprs:
        names = {n for n in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", re.sub(r'"[^"]*"|\{[^}]*\}|\[[^]]*\]', "", expr))
                 if n.startswith("segnode_") or n == "up"}
        assert names and names <= exported, (expr, names - exported)
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    assert prometheus["scrape_configs"][0]["metrics_path"] == "/metrics"
    compose = shutil.which("docker-compose")
    assert compose
    result = subprocess.run([compose, "-f", str(ROOT / "docker-compose.yml"), "--profile", "monitoring", "config", "-q"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_the_scale_profile_wires_workers_to_the_hub_in_start_order():
    """--profile scale: the hub hands segmentations to the broker; workers reach it with its token and broker,
    and start only when it is ready, which it is only after PostgreSQL and RabbitMQ are."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    hub = load_settings(ROOT / "docker" / "segnode-scale.yaml")
    assert hub.jobs.executor == "celery" and hub.database_url and "postgres:5432" in hub.database_url
    worker = services["worker"]["command"]
    assert worker[worker.index("--broker") + 1] == hub.jobs.broker_url.get_secret_value()
    assert worker[worker.index("--node") + 1] == f"http://segnode-hub:{hub.http.port}"
    token_file = ROOT / compose["secrets"]["segnode_token"]["file"]
    assert token_file.read_text().strip() == hub.http.token.get_secret_value()
    assert services["worker"]["depends_on"]["segnode-hub"]["condition"] == "service_healthy"
    assert {name for name, dep in services["segnode-hub"]["depends_on"].items()
            if dep["condition"] == "service_healthy"} == {"postgres", "rabbitmq"}
    assert all("scale" in services[name]["profiles"] for name in ("worker", "segnode-hub", "rabbitmq", "postgres"))
