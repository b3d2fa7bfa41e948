"""`python -m zkdingsync`: the same as the `zkdingsync` console script."""

import sys

from zkdingsync.cli import main

sys.exit(main())
