"""``python -m revify``: the ``revify`` command line (see :mod:`revify.cli`)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
