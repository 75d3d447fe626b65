from multiserve.cli import main

raise SystemExit(main())
