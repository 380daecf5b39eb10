"""``python -m offline compress|eval ...`` (same as the ``nm16-compress`` / ``nm16-eval`` console scripts)."""

import sys

from offline.cli import main

if __name__ == "__main__":
    sys.exit(main())
