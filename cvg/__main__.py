"""`python -m cvg` runs the command line."""

import sys

from cvg.cli import main

sys.exit(main())
