"""segnode command line: parses arguments, loads the settings, calls one function, prints its result.

Every command that reads settings takes `--config FILE` (or SEGNODE_CONFIG) and the same flags on top
of it, through one loader: what `rules check` validates is what `serve` will load.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segnode import __version__
from segnode.config import ConfigError, Settings, load_settings
from segnode.errors import SegnodeError
from segnode.flow import WORKER_NAME, JobKind, JobState
from segnode.logs import setup_logging
from segnode.progress import Progress

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from segnode.audit.ledger import Ledger
    from segnode.routing.rules import RuleSet
    from segnode.demo.pacs import PACS

log = logging.getLogger("segnode")
SET = "set:"  # argparse dests that override a settings key: "set:dimse.port", or several keys "set:a.b,c.d"


def _put(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def load(args: argparse.Namespace) -> Settings:
    """The settings of this invocation: --config (or SEGNODE_CONFIG), then the flags bound to settings keys."""
    overrides: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if dest.startswith(SET) and value is not None:
            for key in dest[len(SET):].split(","):
                _put(overrides, key, value)
    config = getattr(args, "config", None) or os.environ.get("SEGNODE_CONFIG")
    return load_settings(Path(config) if config else None, overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    from segnode.lock import DataDirLock
    from segnode.supervisor import Supervisor, share_metrics

    settings = load(args)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    with DataDirLock(settings.data_dir):  # a second node stops here, before it empties the first one's metrics
        pass
    share_metrics(settings.data.metrics)  # before anything imports prometheus-client (segnode.metrics)

    from segnode import pipeline
    from segnode.audit import events as audit
    from segnode.ingest.store import Peer
    from segnode.metrics import mark_process_dead
    from segnode.service import Node

    setup_logging(settings.log_level)
    _raise_open_file_limit()
    rules = pipeline.ruleset(settings)  # a bad rule file (RulesError) stops the node before it accepts anything
    node = Node(settings)
    node.start()

    def exited(name: str, code: int, delay: float, pid: int) -> None:
        mark_process_dead(pid)
        node.store.record(audit.Event(type=audit.APPLICATION_ACTIVITY, action=audit.Action.EXECUTE,
                                      outcome=audit.Outcome.SERIOUS_FAILURE, actor=Peer("local", "localhost").actor(),
                                      objects={"component": name, "exit_status": code},
                                      detail=f"{name} exited with status {code}; restarted in {delay:.1f} s"))

    supervisor = Supervisor(settings, on_exit=exited)
    supervisor.start()
    if settings.jobs.workers:
        node.health.add("workers", supervisor.workers_not_running)
    log.info("segnode %s ready: DIMSE %s@%s:%d, HTTP http://%s:%d (data in %s); rules %s (sha256 %s), "
             "completion after %.1f s quiet, %d worker(s)", __version__, settings.dimse.ae_title, settings.dimse.host,
             node.dimse.port, settings.http.host, node.http_port, settings.data_dir,
             settings.routing.rules or "built-in", rules.sha256[:12], settings.routing.stable_seconds,
             settings.jobs.workers)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("stopping")
    supervisor.stop()
    node.stop()
    return 0


def _raise_open_file_limit() -> None:
    """Raise the soft open-file limit to the hard one (often 1024 of 1048576): every association, HTTP connection
    and spool file is a descriptor, and the caps (dimse.max_associations, http.max_connections) should bind first."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 65536
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as exc:
            log.warning("open-file limit stays at %d (%s)", soft, exc)


def _ledger(args: argparse.Namespace) -> "Ledger":
    """The database and the audit trail, for commands that change state (and audit it)."""
    from segnode import pipeline

    return pipeline.ledger(load(args))


def _database(settings: Settings) -> "Engine":
    """The database only, for commands that read: nothing else is created in the data directory."""
    from segnode.db.session import make_engine, migrate

    if settings.database_url is None and not settings.data.database.is_file():
        raise ConfigError(f"no segnode database in {settings.data_dir.resolve()}: pass the node's --data-dir "
                          "or --config")
    engine = make_engine(settings.db_url)
    migrate(engine)
    return engine


def cmd_complete(args: argparse.Namespace) -> int:
    from segnode.completion import request_completion

    count = request_completion(_ledger(args), args.study_uid, "cli")
    if not count:
        print(f"no open series in study {args.study_uid} (unknown study, or everything already completed)",
              file=sys.stderr)
        return 1
    print(f"{count} series will be completed and routed at the next poll")
    return 0


def cmd_jobs_list(args: argparse.Namespace) -> int:
    from segnode.jobs.queue import list_jobs

    with _database(load(args)).connect() as conn:
        jobs = list_jobs(conn, state=args.state, kind=args.kind)
    if args.json:
        print(json.dumps([j.as_dict() for j in jobs], indent=2))
        return 0
    if not jobs:
        wanted = " ".join(f"{name} {value}" for name, value in (("state", args.state), ("kind", args.kind)) if value)
        print(f"no jobs{' of ' + wanted if wanted else ''}")
    for j in jobs:
        what = (f"deliver  job {j.parent_job} -> {j.destination}" if j.kind == JobKind.DELIVER
                else f"segment  {j.model} {j.model_version}")
        print(f"{j.id:6d} {j.state:10s} {what:40s} try {j.attempts}/{j.max_attempts} series {j.series_uid} "
              f"gen {j.generation}" + (f"  {j.last_error[:100]}" if j.last_error else "")
              + (f"  -> {j.output}" if j.output else ""))
    return 0


def cmd_jobs_retry(args: argparse.Namespace) -> int:
    from segnode.jobs.queue import retry

    if not retry(_ledger(args), args.job_id, who="cli"):
        print(f"job {args.job_id} is not failed or dead (see `segnode jobs list`)", file=sys.stderr)
        return 1
    print(f"job {args.job_id} queued again")
    return 0


def cmd_studies(args: argparse.Namespace) -> int:
    from segnode.db.queries import list_studies

    with _database(load(args)).connect() as conn:
        print(json.dumps(list_studies(conn), indent=2))
    return 0


def cmd_audit_trace(args: argparse.Namespace) -> int:
    """Everything that happened to a study, from arrival to delivery."""
    from segnode.lineage import render, trace

    settings = load(args)
    with _database(settings).connect() as conn:
        story = trace(conn, settings.data, args.study_uid)
    if not story["series"] and not story["jobs"]:
        print(f"nothing is known about study {args.study_uid}", file=sys.stderr)
        return 1
    print(json.dumps(story, indent=2, default=str) if args.json else "\n".join(render(story)))
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from segnode.audit.trail import verify_connection

    settings = load(args)
    anchor = settings.data.audit_head
    with _database(settings).connect() as conn:
        result = verify_connection(conn, anchor)
    if not result.anchored:
        print(f"note: no head anchor at {anchor}: events deleted from the end of the trail cannot be detected "
              "(pass the node's --data-dir)")
    if result.ok:
        print(f"audit trail intact: {result.count} events, chain verified")
        return 0
    print(f"audit trail BROKEN ({result.count} events checked):")
    for problem in result.problems:
        print(f"  - {problem}")
    return 1


def _demo_settings(data_dir: Path, pacs: "PACS") -> Settings:
    """The demo's own settings - never the node's configuration (SEGNODE_CONFIG is ignored), so phantoms
    cannot reach a production database, rules or PACS: its own data directory, free ports, its two
    modalities allowed, a short quiet time, the built-in rules, and results to the demo's Orthanc."""
    return load_settings(None, {
        "data_dir": str(data_dir), "http": {"port": 0}, "log_level": "WARNING",
        "dimse": {"port": 0, "allowed_peers": [{"ae_title": aet, "hosts": ["127.0.0.1/32"]}
                                               for aet in ("DEMO_CT", "DEMO_DX")]},
        "routing": {"stable_seconds": 1.0, "default_destinations": ["orthanc"]},
        "destinations": {"orthanc": {"kind": "dimse", "ae_title": pacs.aet, "host": pacs.host,
                                     "port": pacs.dicom_port, "orthanc_url": pacs.url,
                                     "username": pacs.username, "password": pacs.password}}})


def cmd_demo(args: argparse.Namespace) -> int:
    """Orthanc (Debian package) + segnode; a CT and a chest radiograph phantom go in with storescu as a
    modality would send them; SEG and SR come out in Orthanc, confirmed; volumes, Dice and lineage."""
    from segnode.demo import DemoOptions, run_demo

    options = DemoOptions(data_dir=Path(args.data_dir or tempfile.mkdtemp(prefix="segnode-demo-")),
                          seed=args.seed, slice_spacing=args.slice_spacing, orthanc_url=args.orthanc, keep=args.keep)
    return run_demo(options, _demo_settings, print, Progress())


def cmd_phantom(args: argparse.Namespace) -> int:
    """Write phantoms (DICOM + labels.npz) into OUT/<kind>-<seed as 5 digits>/."""
    out = Path(args.out)
    for seed in range(args.seed, args.seed + args.count):
        target = out / f"{args.kind}-{seed:05d}"
        if args.kind == "ct":
            from segnode.phantom.ct import CTOptions, generate_ct, write_phantom

            opts = CTOptions(matrix=args.matrix or 256, slice_spacing=args.slice_spacing, z_extent_mm=args.z_extent,
                             reversed_order=args.reversed, oblique_deg=args.oblique, tilt_deg=args.tilt)
            phantom = generate_ct(seed, opts)
            write_phantom(phantom, target)
            ds = phantom.datasets[0]
            print(f"{target}: CT, {len(phantom.datasets)} slices {ds.Rows}x{ds.Columns}, pixel "
                  f"{phantom.pixel_spacing[0]:.2f} mm, slice {float(ds.SliceThickness):.2f} mm, labels "
                  + ", ".join(phantom.label_names.values()))
        else:
            from segnode.phantom.dx import DXOptions, generate_dx, write_dx

            dx = generate_dx(seed, DXOptions(matrix=args.matrix or 512))
            write_dx(dx, target)
            print(f"{target}: DX {dx.dataset.Rows}x{dx.dataset.Columns}, pixel {float(dx.dataset.PixelSpacing[0]):.2f}"
                  " mm, labels " + ", ".join(dx.label_names.values()))
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    from segnode.models.registry import ModelError, list_models, read_manifest

    root = load(args).models_root
    folders = list_models(root)
    if not folders:
        print(f"no models in {root}")
    for folder in folders:
        try:
            m = read_manifest(folder)
            labels = ", ".join(label.name for label in m.labels)
            kind = f"nnU-Net {m.nnunet.configuration}" if m.nnunet else m.network.architecture
            print(f"{m.name:28s} {m.version:8s} {m.modality:3s} {m.spatial_dims}D {kind:18s} {labels}")
        except ModelError as exc:
            print(f"{folder.name:28s} INVALID: {exc}")
    return 0


def cmd_models_check(args: argparse.Namespace) -> int:
    from segnode.models.registry import check_model

    folder = load(args).models_root / args.name
    if not folder.is_dir():
        print(f"no model folder {folder}", file=sys.stderr)
        return 1
    checks = check_model(folder)
    for c in checks:
        print(f"{'ok  ' if c.ok else 'FAIL'} {c.name:8s} {c.detail}")
    return 0 if all(c.ok for c in checks) and len(checks) == 3 else 1


def cmd_models_import_nnunet(args: argparse.Namespace) -> int:
    """An nnU-Net v2 trained-model folder -> a segnode model folder in the models folder."""
    from segnode.config import default_models_dir
    from segnode.models.nnunet_import import ImportOptions, NnUNetImportError, import_nnunet

    settings = load(args)
    root = settings.models_root
    shipped = Path(str(default_models_dir())).resolve() if not os.environ.get("SEGNODE_MODELS") else None
    if settings.jobs.models_dir is None and root.resolve() == shipped:
        print("segnode models import: the shipped models are package data; import into a models folder of your own "
              "(--models-dir DIR, jobs.models_dir or SEGNODE_MODELS) and point the node at it", file=sys.stderr)
        return 2
    options = ImportOptions(folder=Path(args.folder), orientation=args.orientation, configuration=args.configuration,
                            folds=args.folds, name=args.name, checkpoint=args.checkpoint, modality=args.modality,
                            version=args.model_version)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"segnode models import: the models folder {root} cannot be made: {exc.strerror}", file=sys.stderr)
        return 2
    try:
        Progress()(f"importing {args.folder}: reading plans, converting the fold checkpoints to safetensors")
        folder, manifest, warnings = import_nnunet(options, root)
    except NnUNetImportError as exc:
        print(f"segnode models import: {exc}", file=sys.stderr)
        return 2
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    nn = manifest.nnunet
    assert nn is not None
    print(f"imported {manifest.name} {manifest.version} into {folder}: nnU-Net {nn.configuration}, folds "
          f"{', '.join(nn.folds)}, {len(manifest.labels)} labels, weights sha256 {manifest.weights_sha256[:16]}...\n"
          f"check it with `segnode models check {manifest.name} --models-dir {root}`, route to it with a rule whose "
          f"action is {{models: [{manifest.name}]}}, and run the node with jobs.models_dir: {root}")
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    """A series folder -> label map (NIfTI) + segmentation.json, with the timing breakdown."""
    from segnode.imaging.volume import SeriesError, dicom_files
    from segnode.inference.engine import EngineOptions
    from segnode.inference.infer import infer_series
    from segnode.models.registry import ModelError

    setup_logging("WARNING")
    folder = load(args).models_root / args.model
    if not folder.is_dir():
        print(f"segnode infer: no model folder {folder} (see `segnode models list`)", file=sys.stderr)
        return 2
    options = EngineOptions(device=args.device, overlap=args.overlap, batch_size=args.batch_size,
                            precision=args.precision, mirror=args.mirror, compile=args.compile,
                            largest_component=args.largest_component)
    try:
        result = infer_series(folder, dicom_files(Path(args.series)), Path(args.out), options, tilt=args.tilt,
                              assumed_spacing=args.assume_pixel_spacing, on_stage=Progress())
    except SeriesError as exc:
        print(f"segnode infer: refused: {exc}", file=sys.stderr)
        return 2
    except ModelError as exc:
        print(f"segnode infer: model {args.model}: {exc}", file=sys.stderr)
        return 2
    seg = result.segmentation
    shape = seg.labels.shape  # (slices, rows, columns), or (rows, columns) for a projection image
    size = f"{shape[-1]} columns x {shape[-2]} rows" + (f" x {shape[0]} slices" if len(shape) == 3 else "")
    print(f"{result.labels_path}: labels of {size}, in the series' geometry")
    for note in seg.notes:
        print(f"  note: {note}")
    print("  " + str(seg.timings))
    return 0


def _rules(settings: Settings) -> "RuleSet":
    """The rules `serve` would load with the same settings: checked against the installed models and
    the configured destinations (a RulesError is reported by main())."""
    from segnode import pipeline

    return pipeline.ruleset(settings)


def cmd_worker(args: argparse.Namespace) -> int:
    """A remote worker: jobs from the broker, series over WADO-RS from the node, results back to it."""
    from segnode.config import default_models_dir
    from segnode.jobs.broker import queue_for
    from segnode.remote.worker import RemoteWorker, WorkerSettings, consume

    setup_logging(args.log_level)
    token = args.token or os.environ.get("SEGNODE_TOKEN")
    if args.token_file:
        token = Path(args.token_file).read_text().strip()
    broker = args.broker or os.environ.get("SEGNODE_BROKER_URL")
    if not broker:
        raise ConfigError("segnode worker needs --broker (or SEGNODE_BROKER_URL), the node's jobs.broker_url")
    settings = WorkerSettings(node_url=args.node, token=token, models_dir=Path(args.models_dir or default_models_dir()),
                              device=args.device, work_dir=Path(args.work_dir) if args.work_dir else None,
                              **({"name": args.name} if args.name else {}))
    if not re.match(WORKER_NAME, settings.name):
        raise ConfigError(f"--name {settings.name[:40]!r}: 1 to 100 printable ASCII characters without spaces "
                          "(it names the worker in leases and in the audit trail; keep it unique)")
    worker = RemoteWorker(settings)
    worker.check_node()  # a wrong --node or --token is said now, not at the first job
    models = worker.models()
    queues = [q for q in (args.queues or "").split(",") if q] or [queue_for(m, {}) for m in models]
    if not queues:
        raise ConfigError(f"no models in {settings.models_dir} and no --queues: this worker would take nothing")
    if not args.no_warm_up:  # the models whose queue this worker takes (all of them for queues named otherwise)
        mine = [m for m in models if queue_for(m, {}) in queues]
        worker.warm(mine if mine or not args.queues else models)
    consume(worker, broker, queues, args.log_level)
    return 0


def cmd_config_reference(args: argparse.Namespace) -> int:
    from segnode.config_reference import render

    print(render(), end="")
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    """Validate the configuration as `serve` would; print it with the defaults filled in (secrets hidden)."""
    import yaml

    settings = load(args)  # a ConfigError is reported by main()
    print(yaml.safe_dump(json.loads(settings.model_dump_json()), sort_keys=False), end="")
    return 0


def cmd_rules_check(args: argparse.Namespace) -> int:
    ruleset = _rules(load(args))  # a RulesError is reported by main()
    print(f"ok: {len(ruleset.rules)} rules, mode {ruleset.mode}, sha256 {ruleset.sha256}")
    return 0


def cmd_rules_explain(args: argparse.Namespace) -> int:
    """For each series under the paths: every rule, every condition, the value seen and why."""
    from segnode.routing.facts import series_in
    from segnode.routing.rules import decide

    settings = load(args)
    ruleset = _rules(settings)  # a RulesError is reported by main()
    found = series_in(Path(p) for p in args.paths)
    if not found:
        print("no DICOM series found under " + ", ".join(args.paths), file=sys.stderr)
        return 1
    print(f"rules: {settings.routing.rules or 'default'} (mode {ruleset.mode}, sha256 {ruleset.sha256[:16]}...)")
    for uid, (facts, files) in found.items():
        print(f"\nseries {uid}: {facts.instances} instance(s), {facts.dimensions}D, in {files[0].parent}")
        print("  sender: unknown (read from files): sender conditions fail")
        for line in decide(ruleset, facts).explain():
            print("  " + line)
    return 0


def cmd_rules_replay(args: argparse.Namespace) -> int:
    """The series already received, decided again with a rule file: what would be routed differently."""
    from segnode.routing.router import replay
    settings = load(args)
    ruleset = _rules(settings)  # a RulesError is reported by main()
    with _database(settings).connect() as conn:
        results = replay(conn, settings.data, ruleset)
    changed = [r for r in results if r.changed]
    print(f"dry run of {settings.routing.rules or 'the built-in rules'} (sha256 {ruleset.sha256[:16]}...) over {len(results)} "
          f"routed series: {len(changed)} would be routed differently")
    for r in changed:
        print(f"  series {r.series_uid}: {', '.join(r.before) or 'ignored'} (rules {', '.join(r.rules_before) or '-'})"
              f" -> {', '.join(r.after) or 'ignored'} (rules {', '.join(r.rules_after) or '-'})")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Fingerprint -> plan (written, editable) -> training -> model folder."""
    from segnode.training.data import load_cases
    from segnode.training.plan import Plan, make_plan
    from segnode.training.trainer import train

    setup_logging("WARNING")
    out = Path(args.out)
    cases = load_cases(Path(args.data))
    if args.plan:
        plan = Plan.load(Path(args.plan))
    else:
        plan = make_plan(cases, args.name or out.name, budget_voxels=args.budget, base_filters=args.base_filters,
                         min_spacing=args.min_spacing, loss=args.loss, seed=args.seed)
    updates = {k: v for k, v in {"epochs": args.epochs, "steps_per_epoch": args.steps, "seed": args.seed,
                                 "batch_size": args.batch_size, "validation_cases": args.validation_cases,
                                 "validate_every": args.validate_every}.items() if v is not None}
    plan = plan.model_copy(update=updates)
    out.mkdir(parents=True, exist_ok=True)
    plan.save(out / "plan.json")
    print(f"plan: {out / 'plan.json'} ({len(cases)} cases, spacing {plan.target_spacing} mm, patch {plan.patch_size}, "
          f"filters {plan.network_args.get('filters')})")
    if args.plan_only:
        return 0
    command = "segnode " + " ".join(sys.argv[1:]) if sys.argv[0].endswith(("segnode", "__main__.py")) else ""
    result = train(plan, cases, out, device=args.device, command=command, progress=sys.stderr.isatty())
    print(f"model folder: {out} ({result.seconds:.0f} s, final loss {result.epoch_losses[-1]:.4f})")
    for name, m in result.validation.items():
        print(f"  {name:14s} Dice {m['dice']:.3f}  IoU {m['iou']:.3f}  HD95 {m['hd95']:.1f} mm")
    return 0


def _settings_flag(sp: argparse.ArgumentParser, flag: str, keys: str, **kwargs: Any) -> None:
    """A flag that overrides settings keys (dotted, comma-separated) on top of --config."""
    sp.add_argument(flag, dest=SET + keys, metavar=kwargs.pop("metavar", flag[2:].upper().replace("-", "_")), **kwargs)


def _common(sp: argparse.ArgumentParser) -> None:
    """--config and --data-dir: every command that reads the node's settings takes both."""
    sp.add_argument("--config", help="YAML configuration file (or SEGNODE_CONFIG)")
    _settings_flag(sp, "--data-dir", "data_dir", help="data directory (database, spool, audit key)")


def _models_flag(sp: argparse.ArgumentParser) -> None:
    _settings_flag(sp, "--models-dir", "jobs.models_dir",
                   help="model folders (default: jobs.models_dir, SEGNODE_MODELS, or the shipped models)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="segnode", description="PACS-integrated DICOM segmentation node")
    p.add_argument("--version", action="version", version=f"segnode {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the DIMSE and HTTP listeners, completion and workers")
    _common(serve)
    _models_flag(serve)
    _settings_flag(serve, "--dimse-port", "dimse.port", type=int)
    _settings_flag(serve, "--http-port", "http.port", type=int)
    _settings_flag(serve, "--ae-title", "dimse.ae_title")
    _settings_flag(serve, "--host", "dimse.host,http.host", help="address both listeners bind to")
    _settings_flag(serve, "--rules", "routing.rules", help="routing rule file (default: the built-in rules)")
    _settings_flag(serve, "--stable-seconds", "routing.stable_seconds", type=float,
                   help="a study is complete after this long without instances")
    _settings_flag(serve, "--workers", "jobs.workers", type=int, help="worker processes (0: receive and route only)")
    serve.set_defaults(func=cmd_serve)

    studies = sub.add_parser("studies", help="print received studies as JSON")
    _common(studies)
    studies.set_defaults(func=cmd_studies)

    audit = sub.add_parser("audit", help="audit trail tools")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_sub.add_parser("verify", help="check the hash chain; exit 1 and name each broken event")
    _common(verify)
    verify.set_defaults(func=cmd_audit_verify)
    trace_cmd = audit_sub.add_parser("trace", help="the whole story of a study: inputs, rule, model, outputs, deliveries")
    trace_cmd.add_argument("study_uid")
    trace_cmd.add_argument("--json", action="store_true")
    _common(trace_cmd)
    trace_cmd.set_defaults(func=cmd_audit_trace)

    phantom = sub.add_parser("phantom", help="write synthetic phantoms (DICOM + ground-truth labels.npz)")
    phantom.add_argument("kind", choices=["ct", "dx"], help="3D abdominal CT or 2D chest radiograph")
    phantom.add_argument("--out", required=True, help="output folder; each phantom goes to OUT/<kind>-<seed as 5 "
                         "digits>/ (e.g. ct-00000/: its *.dcm files and labels.npz)")
    phantom.add_argument("--seed", type=int, default=0, help="first seed (deterministic)")
    phantom.add_argument("--count", type=int, default=1)
    phantom.add_argument("--matrix", type=int, help="rows and columns (CT 256, DX 512)")
    phantom.add_argument("--slice-spacing", type=float, help="CT slice spacing in mm (default: random 0.6-5)")
    phantom.add_argument("--z-extent", type=float, help="CT coverage along z in mm (default: random 180-280)")
    phantom.add_argument("--reversed", action="store_true", help="CT: instance 1 is the most superior slice")
    phantom.add_argument("--oblique", type=float, default=0.0, help="CT: tilt the image plane by up to DEG")
    phantom.add_argument("--tilt", type=float, default=0.0, help="CT: gantry tilt in degrees")
    phantom.set_defaults(func=cmd_phantom)

    models = sub.add_parser("models", help="list and check model folders")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    mlist = models_sub.add_parser("list", help="the models in the models folder")
    mlist.set_defaults(func=cmd_models_list)
    mcheck = models_sub.add_parser("check", help="manifest, weights hash, build, forward pass; exit 1 on a failure")
    mcheck.add_argument("name")
    mcheck.set_defaults(func=cmd_models_check)
    mimport = models_sub.add_parser("import", help="import a model trained elsewhere (nnU-Net v2)")
    import_sub = mimport.add_subparsers(dest="import_kind", required=True)
    mnn = import_sub.add_parser("nnunet", help="an nnU-Net v2 trained-model folder (Trainer__Plans__configuration)")
    mnn.add_argument("folder", help="the trained-model folder, or the dataset folder holding it")
    mnn.add_argument("--orientation", required=True,
                     help="axis codes of the arrays the model was trained on, nnU-Net does not reorient: SPL for "
                          "axial DICOM stacks converted as stored, SAR for RAS-canonical NIfTI read by SimpleITK "
                          "(TotalSegmentator)")
    mnn.add_argument("--configuration", help="2d, 3d_fullres, ... when the folder holds several")
    mnn.add_argument("--folds", nargs="+", help="folds to average, as nnU-Net names them: 0 1 2 ..., or all for the "
                                                "model trained on all cases (default, as nnU-Net: every numbered fold "
                                                "with a checkpoint)")
    mnn.add_argument("--name", help="segnode model name: lowercase letters, digits and hyphens (default: from the "
                                    "dataset and configuration)")
    mnn.add_argument("--checkpoint", default="checkpoint_final.pth", choices=["checkpoint_final.pth",
                                                                              "checkpoint_best.pth"])
    mnn.add_argument("--modality", help="DICOM Modality it segments (default: from dataset.json's channel name)")
    mnn.add_argument("--model-version", default="1.0.0", help="version recorded in the manifest")
    mnn.set_defaults(func=cmd_models_import_nnunet)
    for sp in (mlist, mcheck, mnn):
        _common(sp)
        _models_flag(sp)

    tr = sub.add_parser("train", help="plan and train a model on labelled cases (e.g. segnode phantom output)")
    tr.add_argument("--data", required=True, help="folder of cases: <case>/labels.npz with ct*.dcm or dx.dcm")
    tr.add_argument("--out", required=True, help="model folder to write (plan.json, model.json, weights, card)")
    tr.add_argument("--name", help="model name (default: the --out folder's name)")
    tr.add_argument("--plan", help="use this plan.json instead of planning from the data")
    tr.add_argument("--plan-only", action="store_true", help="write plan.json and stop (edit it, then --plan)")
    tr.add_argument("--epochs", type=int)
    tr.add_argument("--steps", type=int, help="steps per epoch")
    tr.add_argument("--batch-size", type=int)
    tr.add_argument("--validation-cases", type=int)
    tr.add_argument("--validate-every", type=int)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    tr.add_argument("--budget", type=int, default=96**3, help="voxels per patch (memory budget)")
    tr.add_argument("--base-filters", type=int, default=32, help="filters at the first level (nnU-Net: 32)")
    tr.add_argument("--min-spacing", type=float, help="never finer than this (mm): coarse, fast CPU models")
    tr.add_argument("--loss", default="dice_ce", choices=["dice_ce", "focal", "weighted_ce"])
    tr.set_defaults(func=cmd_train)

    inf = sub.add_parser("infer", help="segment one series folder with a model; writes a NIfTI label map")
    inf.add_argument("--model", required=True, help="model folder name (segnode models list)")
    inf.add_argument("series", help="folder holding the series' DICOM files")
    inf.add_argument("--out", required=True, help="output folder: labels.nii.gz and segmentation.json")
    _common(inf)
    _models_flag(inf)
    inf.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    inf.add_argument("--precision", default="fp16", choices=["fp16", "bf16", "fp32"], help="autocast on the GPU")
    inf.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap (0-1)")
    inf.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    inf.add_argument("--mirror", action="store_true", help="mirroring test-time augmentation")
    inf.add_argument("--compile", action="store_true", help="torch.compile the network")
    inf.add_argument("--largest-component", action="store_true", help="keep the largest component per label")
    inf.add_argument("--tilt", default="resample", choices=["resample", "refuse"],
                     help="gantry-tilted series: segment on an orthogonal grid, or refuse")
    inf.add_argument("--assume-pixel-spacing", type=float, metavar="MM",
                     help="segment images that state no pixel spacing as if it were MM (recorded as an assumption; "
                          "as a rule's assume_pixel_spacing_mm); without it they are refused")
    inf.set_defaults(func=cmd_infer)

    complete = sub.add_parser("complete", help="complete (and route) a study's open series now")
    complete.add_argument("study_uid")
    _common(complete)
    complete.set_defaults(func=cmd_complete)

    jobs = sub.add_parser("jobs", help="the job queue")
    jobs_sub = jobs.add_subparsers(dest="jobs_command", required=True)
    jlist = jobs_sub.add_parser("list", help="jobs, oldest first")
    jlist.add_argument("--state", choices=[s.value for s in JobState])
    jlist.add_argument("--kind", choices=[k.value for k in JobKind], help="segment (model runs) or deliver")
    jlist.add_argument("--json", action="store_true")
    jretry = jobs_sub.add_parser("retry", help="queue a failed or dead job again")
    jretry.add_argument("job_id", type=int)
    for sp in (jlist, jretry):
        _common(sp)
    jlist.set_defaults(func=cmd_jobs_list)
    jretry.set_defaults(func=cmd_jobs_retry)

    worker = sub.add_parser("worker", help="run segment jobs for a node on this host (jobs.executor celery): "
                            "from its broker, series over WADO-RS, results back over HTTP")
    worker.add_argument("--node", required=True, help="the node's HTTP root, e.g. http://segnode:8080")
    worker.add_argument("--token", help="the node's http.token (or SEGNODE_TOKEN; --token-file keeps it out of ps)")
    worker.add_argument("--token-file", help="a file holding the node's http.token")
    worker.add_argument("--broker", help="the node's jobs.broker_url (or SEGNODE_BROKER_URL)")
    worker.add_argument("--queues", help="comma-separated broker queues, replacing the default (segnode.<model> for "
                        "each model installed here): a model the node's jobs.queues does not route elsewhere is "
                        "taken only by workers that list its segnode.<model>, e.g. --queues gpu,segnode.dx-chest")
    worker.add_argument("--models-dir", help="model folders on this host (default: SEGNODE_MODELS or the shipped "
                        "models)")
    worker.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    worker.add_argument("--work-dir", help="where a job's series and results are kept while it runs")
    worker.add_argument("--name", help="this worker's name in leases and the audit trail (default host:pid)")
    worker.add_argument("--no-warm-up", action="store_true", help="do not load the models before the first job")
    worker.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    worker.set_defaults(func=cmd_worker)

    config = sub.add_parser("config", help="the settings: every key with its default, or check a file")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    cref = config_sub.add_parser("reference", help="every setting: key, type, default and meaning")
    cref.set_defaults(func=cmd_config_reference)
    ccheck = config_sub.add_parser("check", help="validate --config as serve would and print it with the "
                                   "defaults filled in (secrets hidden)")
    _common(ccheck)
    ccheck.set_defaults(func=cmd_config_check)

    rules = sub.add_parser("rules", help="check routing rules and explain their decisions")
    rules_sub = rules.add_subparsers(dest="rules_command", required=True)
    rcheck = rules_sub.add_parser("check", help="validate the rules as `serve` would load them (installed models, "
                                                "configured destinations)")
    rexplain = rules_sub.add_parser("explain", help="which rules match each series found, condition by condition")
    rexplain.add_argument("paths", nargs="+", help="DICOM files or folders (searched recursively)")
    rreplay = rules_sub.add_parser("replay", help="dry run over the series already received: what would change")
    for sp in (rcheck, rexplain, rreplay):
        _common(sp)
        _models_flag(sp)
        _settings_flag(sp, "--rules", "routing.rules", help="rule file (default: routing.rules, else the built-in rules)")
    rreplay.set_defaults(func=cmd_rules_replay)
    rcheck.set_defaults(func=cmd_rules_check)
    rexplain.set_defaults(func=cmd_rules_explain)

    demo = sub.add_parser("demo", help="Orthanc + segnode: phantoms in with storescu, SEG + SR out in Orthanc",
                          description="Start a test Orthanc (or use --orthanc), segnode and OHIF (nginx); send a CT "
                                      "and a chest radiograph phantom with dcmtk's storescu as a modality would; wait "
                                      "until the SEG and SR are confirmed in Orthanc; print volumes, Dice against the "
                                      "phantom truth, the lineage and a viewer link per study.")
    demo.add_argument("--data-dir", help="where Orthanc's and segnode's data go (default: a new temporary folder)")
    demo.add_argument("--slice-spacing", type=float, default=5.0, help="mm between CT slices (default 5)")
    demo.add_argument("--seed", type=int, default=1, help="phantom seed (default 1)")
    demo.add_argument("--keep", action="store_true", help="leave Orthanc, segnode and OHIF running until Ctrl-C")
    demo.add_argument("--orthanc", metavar="URL", help="use this running Orthanc (REST URL, credentials as "
                      "http://user:password@host:8042) instead of starting one; its AE title and DICOM port come "
                      "from GET /system, and it must accept C-STORE from segnode's AE title")
    demo.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command; segnode's own errors end it with their message and exit status, no traceback."""
    from segnode.dicom.charsets import configure_pydicom

    args = build_parser().parse_args(argv)
    configure_pydicom()  # ISO 2022 IR 58 with its escape sequence; pynetdicom is set up where it is used
    try:
        return int(args.func(args))
    except SegnodeError as exc:
        print(f"segnode: {exc}", file=sys.stderr)
        return exc.exit_status


if __name__ == "__main__":
    sys.exit(main())
