"""``python -m dylora_moe.evaluate``: see :mod:`dylora_moe.evaluate.cli`."""

import sys

from .cli import main

sys.exit(main())
