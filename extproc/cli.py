"""Command line: validate, render, serve, up."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from extproc.config import load_config
from extproc.policy import compile_policy
from extproc.render import render_yaml
from extproc.sections import ConfigError


def _validate(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    policy = compile_policy(config)
    for route in policy.missing_optional:
        print(f"warning: route {route}: optional secret not set; credential-less requests get 401")
    print(f"{args.config}: OK ({len(config.routes)} route(s), version {policy.version})")
    return 0


def _render(args: argparse.Namespace) -> int:
    text = render_yaml(load_config(args.config))
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from extproc.server import serve  # grpc only when serving

    return serve(args.config)


def _up(args: argparse.Namespace) -> int:
    from extproc.supervisor import up

    return up(args.config, envoy=args.envoy)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="python -m extproc", description=__doc__)
    root.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = root.add_subparsers(dest="command", required=True)
    for name, handler, text in (
        ("validate", _validate, "check the YAML and that every required secret is readable"),
        ("render", _render, "print the Envoy bootstrap rendered from the YAML"),
        ("serve", _serve, "run the ext_proc service alone (Envoy runs elsewhere)"),
        ("up", _up, "run the ext_proc service and Envoy together"),
    ):
        command = commands.add_parser(name, help=text, description=text)
        command.add_argument("config", type=Path, help="the gateway YAML")
        command.set_defaults(handler=handler)
        if name == "render":
            command.add_argument(
                "-o", "--output", type=Path, help="write to FILE instead of stdout"
            )
        if name == "up":
            command.add_argument(
                "--envoy", default="envoy", help="the envoy binary (default: from PATH)"
            )
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
    return code
