from distil.cli import main

raise SystemExit(main())
