"""``python -m src.report SWEEP_DIR [--out DIR] [--metrics M ...]``."""

import sys

from src.report.cli import main

if __name__ == "__main__":
    sys.exit(main())
