"""`python -m analysis <analysis> <run or sweep dirs> [options]`; see analysis/cli.py."""

from analysis.cli import main

raise SystemExit(main())
