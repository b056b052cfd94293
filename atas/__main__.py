from atas.cli import main

raise SystemExit(main())
