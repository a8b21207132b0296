"""``python -m llmprune.cli``."""

import sys

from . import main

sys.exit(main())
