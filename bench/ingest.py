"""Ingest benchmark: the same CT slices sent with dcmtk's storescu (TCP_NODELAY=1, one association)
to dcmtk's storescp (the anchor), to Orthanc and to segnode, in one run.

Prints instances/s for each, the ratio segnode/storescp with fsync on (segnode's default), the
same with fsync off (what the software costs without the disk), the ratio when the slices come over 8
associations at once, and segnode's resident memory while a 1000-slice study arrives. The last line is one JSON object.
Each segnode is measured running: once its stage processes have started (see `wait_idle`).

    python bench/ingest.py [--slices 300] [--rounds 3] [--big 1000] [--associations 8]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' real peers

from peers import orthanc, start_node_process, storescp  # noqa: E402
from testdata import write_ct_series  # noqa: E402
from segnode.tools import dcmtk  # noqa: E402

log = logging.getLogger("bench.ingest")
ENV = dict(os.environ, TCP_NODELAY="1")


def send(port: int, aec: str, files: list[Path]) -> float:
    """Wall time of one storescu run sending every file over one association."""
    os.sync()  # the previous target's dirty pages must not be written back during this run
    start = time.perf_counter()
    subprocess.run([dcmtk("storescu"), "-aec", aec, "-aet", "BENCH", "127.0.0.1", str(port), *map(str, files)],
                   check=True, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - start


def send_parallel(port: int, aec: str, files: list[Path], associations: int) -> float:
    """Wall time of `associations` storescu runs at once, each sending every n-th file over its own association
    (modalities sending together)."""
    os.sync()
    start = time.perf_counter()
    procs = [subprocess.Popen([dcmtk("storescu"), "-aec", aec, "-aet", f"BENCH{i}", "127.0.0.1", str(port),
                               *map(str, files[i::associations])], env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE) for i in range(associations)]
    for proc in procs:
        if proc.wait() != 0:
            raise RuntimeError(f"storescu failed: {proc.stderr.read().decode() if proc.stderr else ''}")
    return time.perf_counter() - start


def fsync_floor(files: list[Path], target: Path) -> float:
    """What durability alone costs on this disk, the flushes on segnode's path per instance with no
    network, parsing or database work: the file written and fsynced, renamed into a directory and the
    directory fsynced. (The index commit's flush is off the path: grouped, a moment later.)"""
    os.sync()
    (target / "tmp").mkdir(parents=True)
    (target / "final").mkdir()
    data = [f.read_bytes() for f in files]
    dir_fd = os.open(target / "final", os.O_RDONLY)
    start = time.perf_counter()
    for i, raw in enumerate(data):
        tmp = target / "tmp" / f"{i}.part"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        os.write(fd, raw)
        os.fsync(fd)
        os.close(fd)
        os.replace(tmp, target / "final" / f"{i}.dcm")
        os.fsync(dir_fd)
    elapsed = time.perf_counter() - start
    os.close(dir_fd)
    return elapsed


class RssSampler:
    """Samples a process's resident memory every 10 ms on a thread."""

    def __init__(self, pid: int) -> None:
        self.proc, self.samples = psutil.Process(pid), []  # type: ignore[var-annotated]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), self.proc.memory_info().rss / 2**20))
            time.sleep(0.01)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def wait_idle(pid: int, timeout: float = 120.0) -> float:
    """Wait until a process and its children use under 5% of a core for 1.5 s: `serve` answers
    /healthz while its stage processes (completion, workers) still import torch and scipy, for seconds on
    2 cores, and the bench measures a running node, not one starting. Returns the seconds waited."""
    start = time.monotonic()
    root, quiet = psutil.Process(pid), 0

    def cpu() -> float:
        total = 0.0
        for proc in [root, *root.children(recursive=True)]:
            try:
                total += sum(proc.cpu_times()[:2])
            except psutil.NoSuchProcess:
                pass
        return total

    while quiet < 3 and time.monotonic() - start < timeout:  # children appear a moment after /healthz answers
        before = cpu()
        time.sleep(0.5)
        quiet = quiet + 1 if cpu() - before < 0.025 else 0
    return time.monotonic() - start


@contextmanager
def segnode(data_dir: Path, fsync: bool) -> Iterator[tuple[int, int]]:
    """segnode as its own process (as deployed), once it is idle; yields (dimse port, pid)."""
    cfg = data_dir.with_suffix(".yaml")
    cfg.write_text(f"storage: {{fsync: {str(fsync).lower()}, free_space_floor_mb: 0, free_space_watermark_mb: 0}}\n"
                   "log_level: WARNING\n")
    node = start_node_process(data_dir, "--config", str(cfg))
    try:
        waited = wait_idle(node.proc.pid)
        log.debug("segnode idle after %.1f s", waited)
        yield node.dimse_port, node.proc.pid
    finally:
        node.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--big", type=int, default=1000, help="slices of the memory run (0 to skip)")
    parser.add_argument("--associations", type=int, default=8,
                        help="also send over this many associations at once (0 to skip)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="segnode-bench-", dir=os.environ.get("BENCH_TMP")) as tmp:
        work = Path(tmp)
        files = write_ct_series(work / "ct", n_slices=args.slices, rows=512, cols=512, seed=42)
        size_mb = sum(f.stat().st_size for f in files) / 2**20
        log.info("ingest: %d CT slices 512x512 16-bit (%.0f MB), storescu TCP_NODELAY=1, one association, "
                 "median of %d rounds", len(files), size_mb, args.rounds)
        times: dict[str, list[float]] = {"storescp": [], "orthanc": [], "segnode": [], "segnode_nofsync": [],
                                         "fsync_floor": [], "storescp_parallel": [], "segnode_parallel": []}
        peak_rss: list[float] = []
        for r in range(args.rounds):
            with storescp(work / f"scp{r}") as port:
                times["storescp"].append(send(port, "STORESCP", files))
            with orthanc(work / f"orthanc{r}", dicomweb=False) as pacs:
                times["orthanc"].append(send(pacs.dicom_port, pacs.aet, files))
            for key, fsync in (("segnode", True), ("segnode_nofsync", False)):
                with segnode(work / f"{key}{r}", fsync) as (port, pid):
                    with RssSampler(pid) as rss:
                        times[key].append(send(port, "SEGNODE", files))
                    if fsync:
                        peak_rss.append(max(m for _, m in rss.samples))
            times["fsync_floor"].append(fsync_floor(files, work / f"floor{r}"))
            if args.associations:
                with storescp(work / f"pscp{r}") as port:
                    times["storescp_parallel"].append(send_parallel(port, "STORESCP", files, args.associations))
                with segnode(work / f"psegnode{r}", True) as (port, _):
                    times["segnode_parallel"].append(send_parallel(port, "SEGNODE", files, args.associations))
            for d in work.glob(f"*{r}"):
                subprocess.run(["rm", "-rf", str(d)], check=True)
        med = {k: statistics.median(v) for k, v in times.items() if v}
        floor = med.pop("fsync_floor")
        parallel = {k: med.pop(k) for k in ("storescp_parallel", "segnode_parallel") if k in med}
        ips = {k: len(files) / v for k, v in med.items()}
        labels = {"storescp": "dcmtk storescp (anchor, no fsync)", "orthanc": "Orthanc 1.10 (SyncStorageArea on)",
                  "segnode": "segnode (fsync on, default)", "segnode_nofsync": "segnode (fsync off)"}
        for key, label in labels.items():
            runs = ", ".join(f"{t:.2f}" for t in times[key])
            log.info("  %-36s %6.2f s  %6.0f inst/s   (runs: %s s)", label, med[key], ips[key], runs)
        ratio = ips["segnode"] / ips["storescp"]
        ceiling = med["storescp"] / (med["storescp"] + floor)
        log.info("  ratio segnode/storescp: %.2f with fsync, %.2f without (goal >= 0.5 with fsync)", ratio,
                 ips["segnode_nofsync"] / ips["storescp"])
        log.info("  disk: the same files written+fsynced, renamed+dir fsynced take %.2f s alone (%.1f ms each): a "
                 "receiver with storescp's costs plus these flushes would reach ratio %.2f", floor,
                 floor / len(files) * 1e3, ceiling)

        if parallel:
            ratio_parallel = parallel["storescp_parallel"] / parallel["segnode_parallel"]
            log.info("  %d associations at once: storescp %.2f s (%.0f inst/s), segnode (fsync on) %.2f s (%.0f "
                     "inst/s): ratio %.2f", args.associations, parallel["storescp_parallel"],
                     len(files) / parallel["storescp_parallel"], parallel["segnode_parallel"],
                     len(files) / parallel["segnode_parallel"], ratio_parallel)
        result = {"ratio": round(ratio, 3), "ratio_nofsync": round(ips["segnode_nofsync"] / ips["storescp"], 3),
                  "instances": len(files), **{f"{k}_ips": round(v, 1) for k, v in ips.items()},
                  "segnode_peak_rss_mb": round(max(peak_rss), 1), "fsync_floor_s": round(floor, 3),
                  "ratio_ceiling_with_fsync": round(ceiling, 3),
                  **({"associations": args.associations, "ratio_parallel": round(ratio_parallel, 3)} if parallel else {})}
        if args.big:
            big = write_ct_series(work / "big", n_slices=args.big, rows=512, cols=512, seed=43)
            with segnode(work / "bigrun", True) as (port, pid):
                idle = psutil.Process(pid).memory_info().rss / 2**20
                with RssSampler(pid) as rss:
                    elapsed = send(port, "SEGNODE", big)
            samples = rss.samples
            t0, t1 = samples[0][0], samples[-1][0]
            quarter = [m for t, m in samples if t <= t0 + (t1 - t0) * 0.25]
            last = [m for t, m in samples if t >= t0 + (t1 - t0) * 0.75]
            growth = max(last) - max(quarter)
            log.info("  memory, %d slices (%.0f MB) in %.1f s: idle %.0f MB, peak %.0f MB, "
                     "peak in last quarter minus peak in first quarter %+.1f MB", len(big),
                     sum(f.stat().st_size for f in big) / 2**20, elapsed, idle, max(m for _, m in samples), growth)
            result.update(big_slices=len(big), big_idle_rss_mb=round(idle, 1),
                          big_peak_rss_mb=round(max(m for _, m in samples), 1), big_rss_growth_mb=round(growth, 1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
