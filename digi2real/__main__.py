"""``python -m digi2real ...`` is the ``digi2real`` command (also what ``torchrun -m`` launches)."""

from digi2real.cli.main import main

raise SystemExit(main())
