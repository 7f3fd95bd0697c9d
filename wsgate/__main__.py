"""``python -m wsgate``: the same as the ``wsgate`` command."""

import sys

from wsgate.cli import main

sys.exit(main())
