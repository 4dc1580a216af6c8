"""``python -m extproc …``: the same commands as the installed ``gateway`` script."""

import sys

from extproc.cli import main

sys.exit(main())
