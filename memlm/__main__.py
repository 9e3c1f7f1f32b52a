"""`python -m memlm` runs the CLI."""
from memlm.cli import main

raise SystemExit(main())
