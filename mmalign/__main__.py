"""``python -m mmalign`` is the ``mmalign`` command."""

from mmalign.cli import main

raise SystemExit(main())
