"""``python -m dpo_lightning``: a problem with what was given (a file, a row, a setting) ends the command with its
message on one line, not a traceback; ``DPO_LIGHTNING_TRACEBACK=1`` shows the traceback."""

import os
import sys

from dpo_lightning.cli import cli_main

sys.argv[0] = "python -m dpo_lightning"  # what usage lines and tips name, instead of __main__.py
try:
    cli_main()
except (ValueError, FileNotFoundError, NotADirectoryError) as error:  # the package names file, row and field in these
    if os.environ.get("DPO_LIGHTNING_TRACEBACK"):
        raise
    sys.exit(f"error: {error}\n(DPO_LIGHTNING_TRACEBACK=1 shows where it was raised)")
