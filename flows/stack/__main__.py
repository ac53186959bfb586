"""``python -m flows.stack up|down|status ...``: the stack's commands without the rest of ``spi``."""

import sys

from flows.stack.commands import main

sys.exit(main())
