"""`grad-edge`: one command, subcommands from each package.

Each package registers its own subcommands; this file only wires them together. Registration
imports are per package so the line's runtime (`run`, `replay`, `defects`) never has to load
training code, and a machine without the trainer's extras can still run the line.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# (module, what it adds) in the order `grad-edge --help` lists them.
COMMAND_MODULES = (
    ("trainer.commands", "train, eval, predict"),
    ("deploy.commands", "export, verify"),
    ("edge.commands", "run, replay, defects"),
    ("station.commands", "serve, dataset"),
)


def version() -> str:
    """The installed package's version (pyproject.toml), or the source tree's."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("grad-edge")
    except PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grad-edge",
        description="GRAD visual anomaly detection for production lines.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"grad-edge {version()}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module, _ in COMMAND_MODULES:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name in (module, module.split(".")[0]):  # that package has no commands yet
                continue
            raise
        mod.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, RuntimeError, LookupError) as exc:
        # Expected failures (bad data layout, missing checkpoint, bad config, an unknown
        # defect id) get one clear line, not a traceback; -v shows the traceback for debugging.
        logging.getLogger("grad-edge").debug("details", exc_info=True)
        print(f"grad-edge {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
