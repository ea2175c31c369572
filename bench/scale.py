"""Scale-out benchmark: segmentation throughput with 1, 2 and 4 worker processes, local vs remote.

    python bench/scale.py [--series 16] [--workers 1 2 4] [--kind ct|dx]

For each worker count N it runs the same series twice, on fresh nodes (SQLite, no delivery):
  local   `segnode serve --workers N` (jobs.executor local): the node's own worker processes;
  remote  `segnode serve --workers 0` with jobs.executor celery, a private RabbitMQ, and N `segnode worker`
          processes with their own folders (series over WADO-RS, results back over HTTP).
One series goes first and is waited for (models loaded, processes warm); then `--series` series are sent at once
and the span from the first measured job's creation to the last one's success gives series/min. It prints,
measured in the same run: throughput per mode and N, scaling efficiency (throughput(N) / (N * throughput(1))),
remote/local at each N, and the remote path's overhead per job (WADO-RS retrieval from the audit detail, result
upload from the workers' logs). On a machine with C cores, N > C workers share cores: efficiency there measures
the machine, not the design.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from sqlalchemy import create_engine, select

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' real peers

from broker import RabbitMQ  # noqa: E402
from peers import start_node_process  # noqa: E402
from segnode.db.models import AuditEvent, JobRow  # noqa: E402
from segnode.phantom.ct import CTOptions, generate_ct, write_phantom  # noqa: E402
from segnode.phantom.dx import DXOptions, generate_dx, write_dx  # noqa: E402
from segnode.tools import dcmtk  # noqa: E402

log = logging.getLogger("bench.scale")
TOKEN = "bench-token"


def phantoms(kind: str, count: int, out: Path, first_seed: int) -> list[list[Path]]:
    """`count` series (a list of files each), one study each."""
    series = []
    for i in range(count):
        seed = first_seed + i
        if kind == "ct":
            series.append(write_phantom(generate_ct(seed, CTOptions(matrix=48, slice_spacing=5.0, z_extent_mm=80.0)),
                                        out / f"ct{seed}"))
        else:
            series.append([write_dx(generate_dx(seed, DXOptions(matrix=256)), out / f"dx{seed}")])
    return series


def storescu_files(port: int, files: list[Path]) -> None:
    subprocess.run([dcmtk("storescu"), "-aec", "SEGNODE", "-aet", "BENCH", "127.0.0.1", str(port), *map(str, files)],
                   check=True, env=dict(os.environ, TCP_NODELAY="1"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _succeeded(db_url: str, count: int, timeout: float = 1800) -> list[JobRow]:
    engine = create_engine(db_url)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                rows = conn.execute(select(JobRow.__table__).where(JobRow.kind == "segment")).all()
            bad = [r for r in rows if r.state in ("dead", "failed")]
            if bad:
                raise RuntimeError(f"job {bad[0].id} {bad[0].state}: {bad[0].last_error}")
            done = [r for r in rows if r.state == "succeeded"]
            if len(done) >= count:
                return done
            time.sleep(0.2)
    finally:
        engine.dispose()
    raise TimeoutError(f"{count} segment jobs did not succeed within {timeout} s")


def run(mode: str, workers: int, warm: list[Path], batch: list[list[Path]], work: Path, rabbit: RabbitMQ | None) -> dict:
    """One node (and its workers) through one warm-up series and the batch; the batch's span and overheads."""
    data = work / f"{mode}-{workers}"
    config = work / f"{mode}-{workers}.yaml"
    db_url = f"sqlite:///{data / 'segnode.db'}"
    jobs = (f"jobs: {{workers: {workers}, warm_up: true}}" if mode == "local" else
            f"jobs: {{workers: 0, executor: celery, broker_url: \"{rabbit.url}\"}}")  # type: ignore[union-attr]
    config.write_text(f"http: {{token: {TOKEN}}}\nrouting: {{stable_seconds: 0.5, poll_seconds: 0.1}}\n{jobs}\n")
    node = start_node_process(data, "--config", str(config), stderr=open(work / f"{mode}-{workers}.node.log", "wb"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        if mode == "remote":
            for i in range(workers):
                folder = work / f"{mode}-{workers}-w{i}"
                folder.mkdir()
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "segnode", "worker", "--node", node.url, "--broker", rabbit.url,  # type: ignore[union-attr]
                     "--work-dir", str(folder), "--name", f"w{i}", "--device", "cpu"],
                    env=dict(os.environ, SEGNODE_TOKEN=TOKEN), stdout=subprocess.DEVNULL,
                    stderr=open(work / f"{mode}-{workers}-w{i}.log", "wb")))
        storescu_files(node.dimse_port, warm)
        _succeeded(db_url, 1)
        time.sleep(1.0)  # every worker has loaded its model by now or will with the first job; the batch next
        files = [f for series in batch for f in series]
        storescu_files(node.dimse_port, files)
        rows = sorted(_succeeded(db_url, 1 + len(batch)), key=lambda r: r.id)[1:]
        start = min(datetime.fromisoformat(r.created_at) for r in rows)
        end = max(datetime.fromisoformat(r.updated_at) for r in rows)
        span = (end - start).total_seconds()
        out = {"mode": mode, "workers": workers, "series": len(rows), "span_s": round(span, 2),
               "series_per_min": round(60 * len(rows) / span, 2)}
        if mode == "remote":
            engine = create_engine(db_url)
            with engine.connect() as conn:
                details = [d for (d,) in conn.execute(select(AuditEvent.detail).where(AuditEvent.event_id == "SN-JOB"))]
            engine.dispose()
            retrieved = [float(m.group(1)) for d in details if (m := re.search(r"retrieved in ([\d.]+) s", d))]
            returned = [float(m.group(1)) for i in range(workers)
                        for m in re.finditer(r"returned in ([\d.]+) s",
                                             (work / f"{mode}-{workers}-w{i}.log").read_text())]
            out.update(retrieve_s_median=round(statistics.median(retrieved), 4) if retrieved else None,
                       return_s_median=round(statistics.median(returned), 4) if returned else None)
        return out
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        node.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", type=int, default=16, help="series per measured batch")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--kind", choices=["ct", "dx"], default="ct", help="CT volumes (3D model) or radiographs")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    with tempfile.TemporaryDirectory(prefix="segnode-bench-scale-") as tmp:
        work = Path(tmp)
        rabbit = RabbitMQ(work / "rabbitmq")
        rabbit.start()
        results = []
        try:
            for n in args.workers:
                for mode in ("local", "remote"):
                    warm = [f for s in phantoms(args.kind, 1, work / f"in-{mode}-{n}", 1000 + 100 * n) for f in s]
                    batch = phantoms(args.kind, args.series, work / f"in-{mode}-{n}", 2000 + 100 * n)
                    result = run(mode, n, warm, batch, work, rabbit)
                    log.info("%s", result)
                    results.append(result)
        finally:
            rabbit.stop()
    by = {(r["mode"], r["workers"]): r for r in results}
    base = {mode: by[(mode, min(args.workers))]["series_per_min"] / min(args.workers) for mode in ("local", "remote")}
    print(f"\nscale-out: {args.series} {args.kind.upper()} series per run, {os.cpu_count()} CPU cores")
    print(f"{'workers':>7} {'local/min':>10} {'eff':>5} {'remote/min':>11} {'eff':>5} {'remote/local':>12} "
          f"{'retrieve s':>10} {'return s':>9}")
    for n in args.workers:
        local, remote = by[("local", n)], by[("remote", n)]
        print(f"{n:>7} {local['series_per_min']:>10.1f} {local['series_per_min'] / (n * base['local']):>5.2f} "
              f"{remote['series_per_min']:>11.1f} {remote['series_per_min'] / (n * base['remote']):>5.2f} "
              f"{remote['series_per_min'] / local['series_per_min']:>12.2f} {remote['retrieve_s_median'] or 0:>10.3f} "
              f"{remote['return_s_median'] or 0:>9.3f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
