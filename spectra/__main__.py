"""``python -m spectra``: the command line (`spectra.cli`)."""

from .cli import main

raise SystemExit(main())
