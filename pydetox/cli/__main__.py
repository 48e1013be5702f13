"""`python -m pydetox.cli`."""

import sys

from pydetox.cli import main

sys.exit(main())
