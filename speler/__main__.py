"""``python -m speler``: runs the command line and exits with its code."""

from speler.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
