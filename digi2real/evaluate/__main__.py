from digi2real.evaluate.cli import main

raise SystemExit(main())
