"""The ``trainloop`` console script: a Ctrl-C while the modules load stops quietly too."""

from __future__ import annotations

import sys

EXIT_INTERRUPTED = 130


def main() -> int:
    """Import the command line (torch with it, which takes a while), then run it."""
    try:
        from trainloop.cli import main as cli_main
    except KeyboardInterrupt:
        print("trainloop: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return cli_main()
