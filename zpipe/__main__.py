"""`python -m zpipe` is the same as the `zpipe` command."""

from zpipe.cli import main

raise SystemExit(main())
