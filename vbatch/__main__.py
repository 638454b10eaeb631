from vbatch.cli import main

raise SystemExit(main())
