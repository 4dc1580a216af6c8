"""``python -m extproc validate|render|serve|up CONFIG``."""

import sys

from extproc.cli import main

sys.exit(main())
