"""`python -m workbench` (also under `torchrun`) is the same as `gkp-workbench`. This module is the
entry point of both: it catches Ctrl-C from the first moment, while the heavy modules still
import, so an interrupt always ends with exit code 130 and one line, never a traceback."""

import sys

from .exit_codes import EXIT_INTERRUPTED


def main() -> int:
    """Run the command line; an interrupt anywhere outside the batch runner's own handling
    (which stops at a consistent point) ends here."""
    try:
        from .cli import main as cli_main

        return cli_main()
    except KeyboardInterrupt:
        try:
            print("interrupted", file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001 - a second interrupt or a closed terminal: exit anyway
            pass
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
