"""``python -m aenode``."""

import sys

from aenode.cli import main

sys.exit(main())
