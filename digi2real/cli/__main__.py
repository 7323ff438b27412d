from digi2real.cli.main import main

raise SystemExit(main())
