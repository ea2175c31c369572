"""Configuration: defaults that work, errors that name the key, flags over the file."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys

import pytest
from pydantic import BaseModel

from segnode.config import ConfigError, load_settings
from peers import start_node_process
from tests.conftest import echoscu


def test_defaults_work_without_a_file():
    s = load_settings()
    assert s.dimse.ae_title == "SEGNODE" and s.dimse.port == 11112 and s.storage.fsync is True
    assert s.db_url.startswith("sqlite:///") and s.db_url.endswith("segnode.db")


def test_invalid_file_names_the_key_and_the_reason(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("dimse:\n  port: 70000\n  allowed_peers:\n    - {ae_title: CT1, hosts: [not-an-ip]}\nbogus: 1\n")
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    text = str(err.value)
    assert "dimse.port: Input should be less than or equal to 65535" in text
    assert "dimse.allowed_peers.0.hosts" in text and "bogus: Extra inputs are not permitted" in text


def test_cli_refuses_a_bad_file_at_start(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("storage: {free_space_floor_mb: 10, free_space_watermark_mb: 5}\n")
    result = subprocess.run([sys.executable, "-m", "segnode", "serve", "--config", str(cfg)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "free_space_watermark_mb must be >= free_space_floor_mb" in result.stderr


def test_flags_override_the_file(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("dimse: {ae_title: FROMFILE, port: 104}\nhttp: {port: 9000}\n")
    s = load_settings(cfg, {"dimse": {"ae_title": "FROMFLAG"}})
    assert s.dimse.ae_title == "FROMFLAG" and s.dimse.port == 104 and s.http.port == 9000


def test_serve_runs_with_flags_and_no_config_file(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "SEGNODE_CONFIG"}
    node = start_node_process(tmp_path / "d", "--ae-title", "FLAGNODE", stderr=subprocess.PIPE, env=env)
    try:
        assert echoscu(node.dimse_port, aec="FLAGNODE").returncode == 0
        assert (tmp_path / "d" / "segnode.db").exists()
    finally:
        node.proc.send_signal(signal.SIGTERM)
        _, err = node.proc.communicate(timeout=30)
    assert node.proc.returncode == 0, err


def test_sqlite_commits_are_fsynced_when_storage_fsync_is_on(tmp_path):
    from segnode.db.session import make_engine

    for durable, expected in ((True, 2), (False, 1)):  # PRAGMA synchronous: 2 = FULL, 1 = NORMAL
        engine = make_engine(f"sqlite:///{tmp_path}/x{durable}.db", durable=durable)
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == expected
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        engine.dispose()


def test_allow_list_rules_match_address_and_ae_title():
    from segnode.config import PeerRule

    rule = PeerRule(ae_title="CT01", hosts=["10.1.0.0/16"])
    assert rule.matches("CT01", "10.1.2.3")
    assert rule.matches("CT01", "::ffff:10.1.2.3")  # IPv4 peer seen by a dual-stack listener
    assert not rule.matches("CT02", "10.1.2.3")
    assert not rule.matches("CT01", "10.2.0.1")
    assert PeerRule(ae_title="*", hosts=["::1/128"]).matches("ANY", "::1")


def test_supervised_components_get_the_whole_configuration_secrets_included(monkeypatch):
    from segnode.config import load_settings
    from segnode.stage import read_settings
    from segnode.supervisor import settings_payload

    settings = load_settings(None, {
        "destinations": {"web": {"kind": "dicomweb", "url": "http://pacs/dicom-web", "username": "segnode",
                                 "password": "s3cret"}},
        "routing": {"default_destinations": ["web"], "stable_seconds": 4}, "jobs": {"workers": 3}})
    child = read_settings(io.BytesIO(settings_payload(settings)))
    assert child.destinations["web"].password.get_secret_value() == "s3cret"  # not pydantic's '**********'
    assert child.routing == settings.routing and child.jobs == settings.jobs


def test_read_only_commands_refuse_a_data_directory_without_a_database(tmp_path):
    """A typo in --data-dir must not read as an empty (or intact) node, nor leave a folder behind."""
    env = {k: v for k, v in os.environ.items() if k != "SEGNODE_CONFIG"}
    missing = tmp_path / "typo"
    for command in (["jobs", "list"], ["studies"], ["audit", "verify"], ["audit", "trace", "1.2.3"]):
        run = subprocess.run([sys.executable, "-m", "segnode", *command, "--data-dir", str(missing)],
                             capture_output=True, text=True, timeout=120, env=env)
        assert run.returncode == 2 and f"no segnode database in {missing}" in run.stderr, (command, run.stderr)
        assert "Traceback" not in run.stderr
    assert not missing.exists()


def test_deliveries_ride_out_a_four_hour_pacs_outage_by_default():
    """Capped exponential backoff: the waits between a delivery's tries add up to more than 4 h, none longer
    than the cap (so the PACS is tried again within 30 min of coming back)."""
    from segnode.config import JobsConfig
    from segnode.jobs.queue import retry_delay

    policy = JobsConfig()
    waits = [retry_delay(attempt, policy) for attempt in range(1, policy.delivery_attempts)]
    assert sum(waits) >= 4 * 3600 and max(waits) == policy.backoff_max_seconds == 1800
    assert waits[:3] == [30, 60, 120]
    assert sum(retry_delay(a, policy) for a in range(1, policy.max_attempts)) == 90  # segmentations: as before


def _serve(tmp_path, *args: str, config: str | None = None) -> subprocess.CompletedProcess[str]:
    extra = []
    if config is not None:
        (tmp_path / "segnode.yaml").write_text(config)
        extra = ["--config", str(tmp_path / "segnode.yaml")]
    return subprocess.run([sys.executable, "-m", "segnode", "serve", "--data-dir", str(tmp_path / "data"), *extra,
                           *args], capture_output=True, text=True, timeout=120)


def test_start_up_errors_are_one_line_naming_the_setting_and_the_value(tmp_path):
    """They ended in tracebacks naming no key; an HTTP port in use left a node without HTTP that went on
    to start its worker processes."""
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = str(taken.getsockname()[1])
    cases = [
        (["--http-port", port, "--dimse-port", "0"], None, f"http.port {port}"),
        (["--http-port", "0", "--dimse-port", port], None, f"dimse.port {port}"),
        (["--http-port", "0", "--dimse-port", "0"], "dimse: {host: 192.0.2.55}\n", "dimse.host '192.0.2.55'"),
        (["--http-port", "0", "--dimse-port", "0"],
         f"dimse: {{tls: {{enabled: true, cert_file: {tmp_path}/none.pem, key_file: {tmp_path}/none.key}}}}\n",
         f"dimse.tls.cert_file: {tmp_path}/none.pem is not a readable file"),
        (["--http-port", "0", "--dimse-port", "0"], "dimse: {tls: {enabled: true}}\n",
         "dimse.tls: enabled: true needs cert_file and key_file"),
        (["--http-port", "0", "--dimse-port", "0"], "dimse: {port: 0}\nhttp: {port: 0}\ndimse: {ae_title: X}\n",
         "key 'dimse' is given twice (lines 1 and 3)"),
    ]
    try:
        for args, config, expected in cases:
            run = _serve(tmp_path, *args, config=config)
            assert run.returncode == 2, (expected, run.stderr)
            assert expected in run.stderr and "Traceback" not in run.stderr, run.stderr
            assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    finally:
        taken.close()


def test_the_reference_names_every_setting_serve_accepts_with_its_default(capsys):
    from segnode.cli import main
    from segnode.config import Settings

    assert main(["config", "reference"]) == 0
    text = capsys.readouterr().out
    defaults = Settings()
    for key, value in (("dimse.port", "11112"), ("http.max_connections", "256"), ("jobs.delivery_attempts", "16"),
                       ("storage.fsync", "true"), ("audit.syslog[].transport", "'tls' | 'tcp' | 'udp' = tls")):
        assert any(line.startswith(f"{key}:") and line.endswith(value) for line in text.splitlines()), key

    def leaves(model, prefix=""):
        for name, value in model:
            if isinstance(value, BaseModel):
                yield from leaves(value, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}"

    missing = [key for key in leaves(defaults) if f"\n{key}: " not in text]
    assert not missing


def test_config_check_prints_what_serve_would_use_without_secrets(tmp_path, capsys):
    from segnode.cli import main

    good = tmp_path / "good.yaml"
    good.write_text("http:\n  token: s3cret-token\ndimse:\n  port: 104\n")
    assert main(["config", "check", "--config", str(good)]) == 0
    out = capsys.readouterr().out
    assert "port: 104" in out and "s3cret-token" not in out and "max_connections: 256" in out
    typo = tmp_path / "typo.yaml"
    typo.write_text("http:\n  tokn: x\n")
    assert main(["config", "check", "--config", str(typo)]) == 2
    assert "http.tokn: Extra inputs are not permitted" in capsys.readouterr().err
