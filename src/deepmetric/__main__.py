"""``python -m deepmetric`` is the ``deepmetric`` command."""

from .cli import main

raise SystemExit(main())
