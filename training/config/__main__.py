"""`python -m training.config --reference | --check RECIPE [--world-size N] [overrides]`."""

from __future__ import annotations

import sys
from typing import Optional

from training.config import ConfigError, config_reference_markdown, load_config


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Run-config tools.")
    parser.add_argument("--reference", action="store_true", help="print the config reference")
    parser.add_argument("--check", metavar="YAML", help="validate a recipe and print it resolved")
    parser.add_argument("--world-size", type=int, default=None, metavar="N",
                        help="with --check: also check that the batch splits over N ranks and "
                        "print how")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides for --check")
    args = parser.parse_args(argv)
    if args.reference:
        sys.stdout.write(config_reference_markdown())
        return 0
    if args.check:
        try:
            cfg = load_config(args.check, args.overrides, world_size=args.world_size)
        except ConfigError as e:
            print(e.report(), file=sys.stderr)
            return 2
        sys.stdout.write(cfg.to_yaml())
        if args.world_size is not None:
            print(f"# batch on {args.world_size} rank(s): {cfg.batch.describe(args.world_size)}")
        return 0
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
