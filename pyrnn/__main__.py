"""``python -m pyrnn ...`` runs the same command as the ``pyrnn`` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
