"""``python -m bench``: see bench/harness.py (use ``bench/run``)."""

from bench.harness import main

raise SystemExit(main())
