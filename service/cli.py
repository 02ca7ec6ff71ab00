"""The ``shardstep`` command line."""

from __future__ import annotations

import argparse
import sys

from service import __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shardstep", description="Sharded-optimizer training on Ray.")
    parser.add_argument("--version", action="version", version=f"shardstep {__version__}")
    parser.parse_args(argv)
    print(f"shardstep {__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
