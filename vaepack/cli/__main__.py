"""``python -m vaepack.cli``."""

import sys

from vaepack.cli.app import main

sys.exit(main())
