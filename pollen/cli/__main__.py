"""``python -m pollen.cli``: the same as the ``pollen`` command."""

import sys

from pollen.cli.app import main

sys.exit(main())
