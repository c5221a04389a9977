"""``python -m jlora ...`` is the ``jlora`` command."""
from jlora.app.cli import main

raise SystemExit(main())
