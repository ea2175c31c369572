"""End to end: a phantom CT sent with storescu to a running `segnode serve` (completion by expected
instance count), until its SEG and SR are confirmed in Orthanc.

    python bench/e2e.py [--slices 300] [--matrix 512]

Prints the time from the last instance acknowledged (storescu returning) to the delivery job's
confirmation, with a breakdown (read, infer, encode, deliver) and, as the anchor measured in the same
run, storescu's own transfer time. Goals: <= 60 s on the 2-core CPU with the shipped model, <= 5 s on
an H100. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' real peers

from peers import orthanc, start_node_process  # noqa: E402
from segnode.phantom.ct import CTOptions, generate_ct, write_phantom  # noqa: E402
from segnode.tools import dcmtk  # noqa: E402

log = logging.getLogger("bench.e2e")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--matrix", type=int, default=512)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    env = dict(os.environ, TCP_NODELAY="1")
    with tempfile.TemporaryDirectory(prefix="segnode-e2e-") as tmp, orthanc(Path(tmp) / "orthanc") as pacs:
        root = Path(tmp)
        extent = 300.0
        spacing = extent / args.slices
        files = write_phantom(generate_ct(400_000, CTOptions(matrix=args.matrix, slice_spacing=spacing,
                                                             z_extent_mm=extent - spacing / 2)), root / "ct")
        rules = root / "rules.yaml"
        rules.write_text(f"""mode: first
rules:
  - name: ct
    match: {{attribute: Modality, equals: CT}}
    action: {{models: [ct-abdomen-phantom-3d], destinations: [orthanc], expected_instances: {len(files)}}}
""")
        config = root / "segnode.yaml"
        config.write_text(json.dumps({
            "routing": {"rules": str(rules), "poll_seconds": 0.2, "stable_seconds": 60},
            "jobs": {"workers": 1},
            "destinations": {"orthanc": {"kind": "dimse", "ae_title": pacs.aet, "host": "127.0.0.1",
                                         "port": pacs.dicom_port, "orthanc_url": pacs.url}}}))
        log_file = root / "node.log"
        node = start_node_process(root / "data", "--config", str(config), stderr=log_file.open("ab"),
                                  env=env)
        try:
            # the clock starts once the worker has its model warm, as in service
            warm_line, deadline = "model ct-abdomen-phantom-3d warm", time.perf_counter() + 300
            while warm_line not in log_file.read_text() and time.perf_counter() < deadline:
                time.sleep(0.2)
            if warm_line not in log_file.read_text():
                log.warning("the worker did not report its model warm within 300 s (see its log): the figure "
                            "below includes loading it")
            start = time.perf_counter()
            subprocess.run([dcmtk("storescu"), "-aec", "SEGNODE", "127.0.0.1", str(node.dimse_port),
                            *map(str, files)], check=True, env=env)
            acked = time.perf_counter()
            deadline = acked + 1800
            while time.perf_counter() < deadline:
                jobs = httpx.get(f"{node.url}/api/jobs", timeout=10).json()
                done = [j for j in jobs if j["kind"] == "deliver" and j["state"] in ("succeeded", "dead")]
                if done:
                    break
                time.sleep(0.1)
            confirmed = time.perf_counter()
            segment = next(j for j in jobs if j["kind"] == "segment")
            record = json.loads((root / "data" / segment["output"] / "segmentation.json").read_text())
            deliver = done[0]
            stages = record["timings_s"]
            deliver_s = (datetime.fromisoformat(deliver["updated_at"])
                         - datetime.fromisoformat(deliver["created_at"])).total_seconds()
        finally:
            node.stop()
    result = {"slices": len(files), "matrix": args.matrix, "send_s": round(acked - start, 2),
              "ack_to_confirmed_s": round(confirmed - acked, 2), "delivery_state": deliver["state"],
              "read_s": stages.get("read"), "infer_s": round(sum(stages.get(k, 0) for k in
                                                                 ("preprocess", "windows", "resample", "postprocess")), 3),
              "encode_s": stages.get("encode"), "deliver_s": round(deliver_s, 2), "device": record["device"]}
    log.info("storescu sent %d slices (%dx%d) in %.2f s (anchor)", len(files), args.matrix, args.matrix,
             result["send_s"])
    log.info("last instance acknowledged -> SEG + SR confirmed in Orthanc: %.2f s (goal <= 60 s on 2 CPU cores)",
             result["ack_to_confirmed_s"])
    log.info("  read %.2f s, infer %.2f s, encode %.2f s, deliver %.2f s (%s)", result["read_s"], result["infer_s"],
             result["encode_s"], result["deliver_s"], result["device"])
    print(json.dumps(result))
    return 0 if deliver["state"] == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
