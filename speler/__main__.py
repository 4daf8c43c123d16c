"""``python -m speler``: runs the command line and exits with its code."""

import sys

try:
    from speler.cli import main
except KeyboardInterrupt:  # Ctrl-C while the imports load: nothing has started yet
    print("error: interrupted; nothing was done", file=sys.stderr)
    raise SystemExit(130) from None

if __name__ == "__main__":
    raise SystemExit(main())
