"""The ``slotforge`` command line."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import sys
from pathlib import Path

from schemas.errors import SlotforgeError
from streams.config import load_settings

logger = logging.getLogger(__name__)


def _cmd_demo(args: argparse.Namespace) -> int:
    from streams.demo import DemoOptions, run_demo
    from streams.report import format_table

    options = DemoOptions(
        jobs=args.jobs,
        arrival_window_s=args.arrival_window,
        workers=args.workers,
        worker_slots=args.worker_slots,
        timeout_s=args.timeout,
        trace_path=args.trace,
    )
    try:
        summary = run_demo(load_settings(), options)
    except KeyboardInterrupt:
        print("Interrupted; every process the demo started was stopped.", file=sys.stderr)
        return 130

    ended = summary["completed"] + summary["partial"]
    share = ended / summary["submitted"] if summary["submitted"] else 0.0
    print()
    print(f"Submitted {summary['submitted']} jobs: {summary['completed']} completed, "
          f"{summary['partial']} partial, {summary['failed']} failed, "
          f"{summary['rejected']} rejected, {summary['timed_out']} timed out "
          f"({share:.1%} completed or partial)")
    print()
    print(format_table(summary))
    print()
    print(f"Summary written to {options.out_dir / 'summary.json'}")
    return 0 if summary["submitted"] and summary["timed_out"] == 0 else 1


def _cmd_run(args: argparse.Namespace) -> int:
    from streams.processes import SERVICES

    module = importlib.import_module(SERVICES[args.service])
    return int(module.main())


def _cmd_report(args: argparse.Namespace) -> int:
    from streams.report import report_from_args

    return report_from_args(load_settings(), args)


def _cmd_schemas_export(args: argparse.Namespace) -> int:
    from schemas.export import export_json_schemas

    written = export_json_schemas(args.directory)
    for path in written:
        print(path)
    return 0


def _cmd_topics_create(args: argparse.Namespace) -> int:
    from streams.kafka import create_topics

    settings = load_settings()
    asyncio.run(create_topics(settings.kafka, settings.topics.all))
    print("\n".join(settings.topics.all))
    return 0


def _cmd_broker(args: argparse.Namespace) -> int:
    from infra.kafka_broker import main as broker_main

    return broker_main([args.action, "--port", str(args.port)])


def _cmd_bench(args: argparse.Namespace) -> int:
    from bench.pipeline_run import exit_on_sigterm

    module = importlib.import_module(f"bench.{args.suite}")
    # Every suite starts a broker or services, so SIGTERM must let it stop them.
    exit_on_sigterm()
    results = module.run(args.out, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(module.render_markdown(results))
    # On stderr, so stdout holds only the page's section.
    print(f"Results written to {args.out}", file=sys.stderr)
    return 0


def _cmd_replay(args: argparse.Namespace) -> int:
    from streams.replay import replay_command

    return replay_command(load_settings(), args)


def _positive_int(text: str) -> int:
    """Parse a count that must be at least 1."""
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: use a whole number") from err
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_seconds(text: str) -> float:
    """Parse a duration in seconds that must be above 0."""
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"invalid seconds {text!r}: use a number") from err
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def _existing_file(text: str) -> Path:
    """Check an input file before the demo deletes the previous run and starts a broker."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"file not found: {path}")
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slotforge", description="Event-driven diffusion inference on Kafka"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="replay the Alibaba trace through a local pipeline",
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    demo.add_argument("--jobs", type=_positive_int, default=80, help="trace requests to replay")
    demo.add_argument("--arrival-window", type=_positive_seconds, default=60.0,
                      help="seconds over which the requests arrive")
    demo.add_argument("--workers", type=_positive_int, default=2, help="GPU worker processes")
    demo.add_argument("--worker-slots", type=_positive_int, default=2,
                      help="concurrent attempts per worker process")
    demo.add_argument("--timeout", type=_positive_seconds, default=900.0,
                      help="seconds to wait for jobs after the last arrival")
    from streams.trace_replay import DEFAULT_TRACE

    demo.add_argument("--trace", type=_existing_file, default=DEFAULT_TRACE,
                      help="Alibaba lora_request_trace.csv to replay")
    demo.set_defaults(handler=_cmd_demo)

    from streams.processes import SERVICES

    run = commands.add_parser("run", help="run one pipeline service in the foreground")
    run.add_argument("service", choices=sorted(SERVICES))
    run.set_defaults(handler=_cmd_run)

    from streams.report import add_report_arguments

    report = commands.add_parser("report", help="latency attribution from ClickHouse spans")
    add_report_arguments(report)
    report.set_defaults(handler=_cmd_report)

    schemas = commands.add_parser("schemas", help="event schemas")
    schema_commands = schemas.add_subparsers(dest="schemas_command", required=True)
    export = schema_commands.add_parser("export", help="write one JSON Schema per event")
    export.add_argument("directory", type=Path)
    export.set_defaults(handler=_cmd_schemas_export)

    topics = commands.add_parser("topics", help="Kafka topics")
    topic_commands = topics.add_subparsers(dest="topics_command", required=True)
    create = topic_commands.add_parser("create", help="create every topic the pipeline uses")
    create.set_defaults(handler=_cmd_topics_create)

    broker = commands.add_parser("broker", help="local single-node Kafka broker")
    broker.add_argument("action", choices=["fetch", "run"])
    broker.add_argument("--port", type=int, default=9092)
    broker.set_defaults(handler=_cmd_broker)
    bench = commands.add_parser("bench", help="run a benchmark suite and write its JSON")
    suites = bench.add_subparsers(dest="suite", required=True)
    from bench.render import SUITES

    for suite in SUITES:
        try:
            module = importlib.import_module(f"bench.{suite}")
        except ModuleNotFoundError:
            continue
        suite_parser = suites.add_parser(
            suite, help=(module.__doc__ or "").splitlines()[0],
            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        suite_parser.add_argument("--out", type=Path, required=True, default=argparse.SUPPRESS,
                                  help="file to write the results JSON to")
        module.add_arguments(suite_parser)
        suite_parser.set_defaults(handler=_cmd_bench)

    try:
        from streams.replay import add_arguments as add_replay_arguments
    except ModuleNotFoundError:
        pass
    else:
        replay = commands.add_parser("replay", help="re-publish records of a topic")
        add_replay_arguments(replay)
        replay.set_defaults(handler=_cmd_replay)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "run":
        logging.basicConfig(level=logging.WARNING,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args))
    except SlotforgeError as err:
        print(f"slotforge: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
