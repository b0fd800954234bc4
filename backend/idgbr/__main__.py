"""`python -m idgbr` runs the `idgbr` command."""

import sys

from .cli import main

sys.exit(main())
