"""`python -m vbatch.cli` (the `vbatch` command)."""

from vbatch.cli import main

raise SystemExit(main())
