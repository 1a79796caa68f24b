"""``python -m fp4sim``: the same command as the ``fp4sim`` console script."""

import sys

from fp4sim.cli import main

if __name__ == "__main__":
    sys.exit(main())
