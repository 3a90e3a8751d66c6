"""``medvlm-fl``: every command, library, federation and deployment, in one parser."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from cli import federation, library

log = logging.getLogger("medvlm")


def build_parser() -> argparse.ArgumentParser:
    usage = [line for module in (federation, library) for line in (module.__doc__ or "").splitlines()
             if line.lstrip().startswith("medvlm-fl ") or line.startswith(" " * 20)]
    parser = argparse.ArgumentParser(prog="medvlm-fl", formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description="Federated, differentially private fine-tuning of medical "
                                                 "vision-language models (LoRA + fusion only).\n\n" + "\n".join(usage))
    sub = parser.add_subparsers(dest="command", required=True)
    federation.add_federation_commands(sub)
    library.add_library_commands(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)  # our own progress; libraries (open_clip logs on root) stay at WARNING
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError, ConnectionError) as err:
        log.error("%s", err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
