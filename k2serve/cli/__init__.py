"""The `k2serve` command line: flags (`parser`) -> typed, frozen settings (`settings`) -> each
subcommand's component (`commands`). Parsing stops here: no other module reads a parsed Namespace,
except the planner's, the load generator's and the benchmarks' own command lines."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from k2serve.cli.parser import build_parser
from k2serve.cluster.lifeline import arm_from_env

__all__ = ["build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    arm_from_env()  # started by `k2serve up`: stop when it is gone
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"k2serve {args.command}: error: {e}", file=sys.stderr)
        return 2
