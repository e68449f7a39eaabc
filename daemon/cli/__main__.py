"""``python -m promptd.daemon.cli``."""

from promptd.daemon.cli import main

raise SystemExit(main())
