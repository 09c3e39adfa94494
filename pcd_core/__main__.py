"""``python -m pcd_core``: see :mod:`pcd_core.cli`."""

import sys

from pcd_core.cli import main

if __name__ == "__main__":
    sys.exit(main())
