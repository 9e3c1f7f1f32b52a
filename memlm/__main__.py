"""`python -m memlm` runs the CLI."""
from memlm.entrypoints.cli import main

raise SystemExit(main())
