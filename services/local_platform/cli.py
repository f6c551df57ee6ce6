"""``eo-platform``: the whole platform on one machine, no Kubernetes, no Docker.

    eo-platform demo      start everything, run the sample workflows, print a summary, stop everything
                          (exit status 1 if any workflow failed)
    eo-platform up        start everything and leave it running (state in build/local-platform/state.json)
    eo-platform status    what is running, and the controller's workflows
    eo-platform down      stop what ``up`` started
    eo-platform rollout TASK                              replace a Wrapper as a Knative rollout does (drain,
                                                          SIGTERM, SIGKILL at the grace period, new Wrapper)
    eo-platform upload FILE... --bucket B --prefix P     put input files into the local S3
    eo-platform send TOPIC [FILE|-]                       publish one JSON message (system.ML, a step topic, ...)
    eo-platform watch [--topic T]                         print monitoring.notify (or any topic) as it arrives
    eo-platform results WORKFLOW                          each step's STAC Collection URL and what it holds
"""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import sys
import time
from pathlib import Path
from typing import Sequence

from services.core.logging import configure_logging

from .inference_backends import add_inference_arguments
from .security import platform_auth_headers
from .workflows import DEMO_WORKFLOWS, WORKFLOW_KINDS
from .stack import DEFAULT_ROOT, LocalStack, PlatformState, StackError, StackOptions, http_status, pid_alive

log = logging.getLogger("services.local_platform")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eo-platform", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="state and logs (default %(default)s)")
    commands = parser.add_subparsers(dest="command", required=True)

    for name in ("demo", "up"):
        sub = commands.add_parser(name)
        sub.add_argument("--repository", type=Path, default=Path("model_repository"))
        sub.add_argument("--delivery-retry", type=int, default=8)
        sub.add_argument("--delivery-backoff-delay-s", type=float, default=0.25)
        sub.add_argument("--wrapper-workers", type=int, default=None,
                         help="steps per Wrapper = its queue-proxy's containerConcurrency (default: the chart's)")
        sub.add_argument("--kafka-storage", choices=["memory", "s3"], default="memory",
                         help="s3: Kafka keeps its data in a bucket of its own moto server (survives a broker restart)")
        sub.add_argument("--prometheus", action="store_true",
                         help="also start a real Prometheus scraping every component (make prometheus installs it)")
        if name == "demo":
            sub.add_argument("--patches", type=int, default=8, help="BigEarthNet patches per workflow (max 42)")
            sub.add_argument("--workflows", nargs="*", choices=WORKFLOW_KINDS,
                             help=f"which sample workflows (default: {' '.join(DEMO_WORKFLOWS)})")
            sub.add_argument("--timeout-s", type=float, default=900.0)
            sub.add_argument("--keep-running", action="store_true", help="leave the stack up afterwards")
        add_inference_arguments(sub)
    commands.add_parser("down")
    rollout = commands.add_parser("rollout", help="replace a Wrapper as a Knative rollout does")
    rollout.add_argument("task", help="the Wrapper's task (ML.ServiceName)")
    commands.add_parser("status")

    upload = commands.add_parser("upload")
    upload.add_argument("files", nargs="+", type=Path)
    upload.add_argument("--bucket", required=True)
    upload.add_argument("--prefix", default="")

    send = commands.add_parser("send")
    send.add_argument("topic")
    send.add_argument("file", nargs="?", default="-", help="JSON file, or - for stdin")

    post = commands.add_parser("post", help="POST JSON to an entry point with the platform token")
    post.add_argument("target", help="controller, or a Wrapper's task name")
    post.add_argument("file", nargs="?", default="-", help="JSON file, or - for stdin")
    post.add_argument("--path", default="/", help="e.g. /<config name> of a Wrapper (default /)")
    watch = commands.add_parser("watch")
    watch.add_argument("--topic", default="")
    watch.add_argument("--from-beginning", action="store_true")
    results = commands.add_parser("results", help="each step's STAC Collection URL and a table of its items")
    results.add_argument("workflow", help="the workflow's name (eo-platform status lists them)")
    return parser


def _options(arguments: argparse.Namespace) -> StackOptions:
    return StackOptions(root=arguments.root, repository=arguments.repository, delivery_retry=arguments.delivery_retry,
                        delivery_backoff_delay_s=arguments.delivery_backoff_delay_s,
                        wrapper_workers=arguments.wrapper_workers, kafka_storage=arguments.kafka_storage,
                        prometheus=arguments.prometheus)


def _running_state(root: Path) -> PlatformState:
    state = PlatformState.load(root)
    if state is None:
        raise StackError(f"no local platform is running (no {root / 'state.json'}); start one: eo-platform up")
    return state


def print_endpoints(state: PlatformState) -> None:
    print(f"  Kafka bootstrap servers  {state.bootstrap_servers}")
    print(f"  S3 endpoint              {state.s3_endpoint}  (any access key; region {state.s3_region})")
    http_part = f"http://{state.inference_http}  " if state.inference_http else ""
    print(f"  inference server         {http_part}(gRPC {state.inference_grpc})")
    print(f"  controller               {state.controller_url}/workflows")
    for task, url in sorted(state.wrapper_urls.items()):
        print(f"  wrapper {task:<16} {url}  (ML.ServiceName \"{task}\")")
    print(f"  namespace (ML.Namespace) {state.namespace}")
    print(f"  logs                     {Path(state.root) / 'logs'}")
    if state.prometheus_url:
        print(f"  Prometheus               {state.prometheus_url}  (metrics of every component, alert rules)")
    if state.auth_token_file:
        print(f"  entry-point token        {state.auth_token_file}  (Authorization: Bearer; eo-platform post)")


def _stack_options(arguments: argparse.Namespace) -> StackOptions:
    """The stack's options with the inference server chosen on the command line."""
    options = _options(arguments)
    options.inference, options.inference_url = arguments.inference, arguments.inference_url
    return options


def command_up(arguments: argparse.Namespace) -> int:
    print("starting the local platform (Kafka, S3, inference server, controller, wrappers) ...")
    started = time.monotonic()
    state = LocalStack(_stack_options(arguments)).start()
    print(f"ready in {time.monotonic() - started:.0f} s:")
    print_endpoints(state)
    print("stop it with: eo-platform down")
    return EXIT_OK


def command_demo(arguments: argparse.Namespace) -> int:
    from .demo import format_summary, run_workflows, stop_workflows
    from .workflows import demo_workflows, sample_patch_names

    names = sample_patch_names()
    if not 1 <= arguments.patches <= len(names):
        print(f"--patches must be 1..{len(names)}", file=sys.stderr)
        return EXIT_USAGE
    stack = LocalStack(_stack_options(arguments))
    print("starting the local platform (Kafka, S3, inference server, controller, wrappers) ...")
    started = time.monotonic()
    try:
        state = stack.start()
        print(f"ready in {time.monotonic() - started:.0f} s")
        print_endpoints(state)
        run_id = time.strftime("%H%M%S") + secrets.token_hex(2)
        plans = demo_workflows(run_id, f"eoml-demo-{run_id}", names[: arguments.patches], arguments.workflows)
        for plan in plans:
            print(f"- {plan.title}: " + " -> ".join(s.service for s in plan.steps))
        reports = run_workflows(state, plans, timeout_s=arguments.timeout_s)
        print(format_summary(reports))
        not_stopped = stop_workflows(state, plans)
        print("workflows stopped (sources and step configurations removed)" if not not_stopped
              else f"not stopped in time: {', '.join(not_stopped)}")
        failed = [r for r in reports if r.status != "succeeded"] or not_stopped
    except StackError as error:
        print(f"eo-platform: {error}", file=sys.stderr)
        stack.stop()
        return EXIT_FAILED
    except BaseException:
        stack.stop()
        raise
    if arguments.keep_running:
        print("the platform keeps running; stop it with: eo-platform down")
        print("each workflow's STAC Collections and a table of their items: eo-platform results <workflow name>")
    else:
        print("stopping the local platform ...")
        stack.stop()
    return EXIT_FAILED if failed else EXIT_OK


def command_down(arguments: argparse.Namespace) -> int:
    state = PlatformState.load(arguments.root)
    if state is None:
        print("nothing to stop")
        return EXIT_OK
    stack = LocalStack(StackOptions(root=arguments.root))
    stack.state = state
    stack.stop()
    print("local platform stopped")
    return EXIT_OK


def command_rollout(arguments: argparse.Namespace) -> int:
    state = _running_state(arguments.root)
    if arguments.task not in state.wrapper_urls:
        print(f"no Wrapper {arguments.task!r} (running: {', '.join(sorted(state.wrapper_urls))})", file=sys.stderr)
        return EXIT_USAGE
    stack = LocalStack(StackOptions(root=arguments.root))
    stack.state = state
    print(f"rolling out wrapper-{arguments.task}: draining (quiet period, reset by new requests) ...")
    report = stack.rollout_wrapper(arguments.task)
    print(json.dumps({key: report.get(key) for key in ("drained_after_s", "sigterm_after_s", "exited_after_s",
                                                       "killed", "exit_code")}))
    return EXIT_OK


def command_status(arguments: argparse.Namespace) -> int:
    state = _running_state(arguments.root)
    healthy = True
    for record in state.processes:
        alive = pid_alive(record.pid)
        health = http_status(record.health_url) if record.health_url and alive else None
        ok = alive and (health in (None, 200) if not record.health_url else health == 200)
        healthy &= ok
        print(f"  {record.name:<22} pid {record.pid:<8} {'up' if ok else 'DOWN'}"
              f"{'' if health is None else f'  (health {health})'}")
    print_endpoints(state)
    try:
        import urllib.request

        with urllib.request.urlopen(f"{state.controller_url}/workflows", timeout=5) as response:
            workflows = json.loads(response.read())["workflows"]
        print(f"  workflows: {len(workflows)}")
        for workflow in workflows:
            print(f"    {workflow['name']}: {workflow['state']} ({len(workflow['steps'])} step(s))")
    except OSError as error:
        print(f"  controller status API not reachable: {error}")
        healthy = False
    return EXIT_OK if healthy else EXIT_FAILED


def command_upload(arguments: argparse.Namespace) -> int:
    from .demo import s3_client

    state = _running_state(arguments.root)
    client = s3_client(state)
    try:
        client.create_bucket(Bucket=arguments.bucket)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    prefix = arguments.prefix.strip("/")
    for path in arguments.files:
        key = f"{prefix}/{path.name}" if prefix else path.name
        client.upload_file(str(path), arguments.bucket, key)
        print(f"s3://{arguments.bucket}/{key}")
    return EXIT_OK


def command_send(arguments: argparse.Namespace) -> int:
    from confluent_kafka import Producer

    from services.core.kafka import producer_config, publish_json

    state = _running_state(arguments.root)
    text = sys.stdin.read() if arguments.file == "-" else Path(arguments.file).read_text()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        print(f"not JSON: {error}", file=sys.stderr)
        return EXIT_USAGE
    publish_json(Producer(producer_config(state.bootstrap_servers)), arguments.topic, value)
    print(f"sent to {arguments.topic}")
    return EXIT_OK


def command_post(arguments: argparse.Namespace) -> int:
    """What a KafkaSource does on a cluster, by hand: POST a JSON body to an entry point, with the stack's token."""
    import urllib.error
    import urllib.request

    state = _running_state(arguments.root)
    base = state.controller_url if arguments.target == "controller" else state.wrapper_urls.get(arguments.target)
    if base is None:
        print(f"no entry point {arguments.target!r}: controller or one of {sorted(state.wrapper_urls)}",
              file=sys.stderr)
        return EXIT_USAGE
    body = (sys.stdin.read() if arguments.file == "-" else Path(arguments.file).read_text()).encode()
    headers = {"Content-Type": "application/json",
               **(platform_auth_headers(state.auth_token_file) if state.auth_token_file else {})}
    request = urllib.request.Request(base + arguments.path, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            print(response.status, response.read().decode("utf-8", errors="replace"))
            return EXIT_OK
    except urllib.error.HTTPError as error:
        print(error.code, error.read().decode("utf-8", errors="replace"))
        return EXIT_FAILED


def command_watch(arguments: argparse.Namespace) -> int:
    from confluent_kafka import Consumer

    from services.core.kafka import consumer_config

    state = _running_state(arguments.root)
    topic = arguments.topic or state.notify_topic
    consumer = Consumer(consumer_config(
        state.bootstrap_servers, f"eo-platform-watch-{secrets.token_hex(4)}",
        **{"auto.offset.reset": "earliest" if arguments.from_beginning else "latest",
           "topic.metadata.refresh.interval.ms": 2000}))
    consumer.subscribe([topic])
    print(f"watching {topic} (Ctrl-C to stop)")
    try:
        while True:
            message = consumer.poll(0.5)
            if message is not None and not message.error():
                print((message.value() or b"").decode("utf-8", errors="replace"), flush=True)
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        consumer.close()


def command_results(arguments: argparse.Namespace) -> int:
    from .demo import controller_workflow, s3_client
    from .results import format_results, workflow_results

    state = _running_state(arguments.root)
    workflow = controller_workflow(state, arguments.workflow)
    if workflow is None:
        print(f"no workflow {arguments.workflow!r} on the controller (eo-platform status lists them)", file=sys.stderr)
        return EXIT_FAILED
    print(format_results(arguments.workflow, workflow_results(workflow, state.bootstrap_servers, s3_client(state))))
    return EXIT_OK


COMMANDS = {"demo": command_demo, "up": command_up, "down": command_down, "rollout": command_rollout,
            "status": command_status,
            "upload": command_upload, "send": command_send, "post": command_post, "watch": command_watch,
            "results": command_results}


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    configure_logging("WARNING", "text")
    try:
        return COMMANDS[arguments.command](arguments)
    except StackError as error:
        print(f"eo-platform: {error}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
