"""Command line: validate, render, serve, up, health, status, keygen, keys, spend, token."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from extproc import keys_cli, spend_cli, token_cli
from extproc.config.load import load_config, warnings
from extproc.config.sections import ConfigError
from extproc.policy.compiled import compile_policy
from extproc.render import render_yaml
from extproc.runtime.xds import DeliveryError, XdsWriter


def _validate(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    policy = compile_policy(config)
    for warning in warnings(config):
        print(warning, file=sys.stderr)
    for route in policy.missing_optional:
        print(f"note: route {route}: optional secret not set; credential-less requests get 401")
    print(f"{args.config}: OK ({len(config.routes)} route(s), version {policy.version})")
    return 0


def _render(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    xds_dir = args.xds_dir.resolve() if args.xds_dir else None
    if xds_dir is not None:
        try:
            XdsWriter(xds_dir).write(config)
        except DeliveryError as exc:
            print(f"{xds_dir}: {exc}", file=sys.stderr)
            return 2
    text = render_yaml(config, xds_dir)
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from extproc.runtime.serve import serve  # grpc only when serving

    xds_dir = args.xds_dir.resolve() if args.xds_dir else None
    return serve(args.config, xds_dir=xds_dir, worker_dir=args.worker, socket=args.socket)


def _up(args: argparse.Namespace) -> int:
    from extproc.runtime.supervisor import up

    return up(args.config, envoy=args.envoy)


def _health(args: argparse.Namespace) -> int:
    """Exit 0 iff the processor named by CONFIG answers SERVING (for container health checks).

    A running ``up`` for CONFIG has recorded its private socket (``runtime.state``);
    that is asked first, then ``extproc``'s address. The config service's state
    (stale config, stuck watcher) is printed but does not change the exit code.
    """
    import grpc

    from extproc.runtime.processes import health_status
    from extproc.runtime.serve import CONFIG_HEALTH
    from extproc.runtime.state import UP_FILE, read_state

    settings = load_config(args.config).extproc
    recorded = read_state(args.config, UP_FILE)
    target = str(recorded["target"]) if recorded and recorded.get("target") else settings.target
    try:
        status = health_status(target, timeout=args.timeout)
        config_ok = health_status(target, timeout=args.timeout, service=CONFIG_HEALTH) == 1
    except grpc.RpcError as exc:
        print(f"not healthy: {exc.code().name} ({target})", file=sys.stderr)
        return 1
    print("SERVING" if status == 1 else f"not serving (status {status})")
    if not config_ok:
        print("config: NOT current (a change not loaded, or the watcher is stuck: see the log)")
    return 0 if status == 1 else 1


def _status(args: argparse.Namespace) -> int:
    """What is served: versions in the processor and in Envoy, store, counts (never keys)."""
    from extproc.runtime.status import report

    same, lines = report(args.config, load_config(args.config))
    print("\n".join(lines))
    return 0 if same else 1


def _xds_dir_option(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--xds-dir",
        type=Path,
        help="dynamic mode: listeners, routes and clusters live in files in DIR that Envoy "
        "watches (render writes them once; serve rewrites them on every config change)",
    )


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="gateway", description=__doc__)
    root.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = root.add_subparsers(dest="command", required=True)

    def add(name: str, handler: object, text: str) -> argparse.ArgumentParser:
        command = commands.add_parser(name, help=text, description=text)
        command.add_argument("config", type=Path, help="the gateway YAML")
        command.set_defaults(handler=handler)
        return command

    add("validate", _validate, "check the YAML and that every required secret is readable")
    render = add("render", _render, "print the Envoy bootstrap rendered from the YAML")
    render.add_argument("-o", "--output", type=Path, help="write to FILE instead of stdout")
    _xds_dir_option(render)
    serve = add("serve", _serve, "run the ext_proc service alone (Envoy runs elsewhere)")
    _xds_dir_option(serve)
    serve.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # set by workers.Supervisor
    serve.add_argument(
        "--socket", type=Path, help="listen on this Unix socket instead of extproc.address/port"
    )
    up = add("up", _up, "run the ext_proc service and Envoy together")
    up.add_argument("--envoy", default="envoy", help="the envoy binary (default: from PATH)")
    health = add("health", _health, "exit 0 iff the ext_proc service is SERVING")
    health.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for an answer")
    add("status", _status, "show what is served: config versions, store, route and client counts")
    keys_cli.register(commands)  # keygen, keys add | rotate | revoke | list
    spend_cli.register(commands)  # spend totals and a client's budgets, from the ledger
    token_cli.register(commands)  # a person's SSO token, for Claude Code's apiKeyHelper
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        code: int = args.handler(args)
    except ConfigError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return 2
    except OSError as exc:  # a missing folder, an unreadable or unwritable file: one line
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    return code
