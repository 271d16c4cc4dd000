"""``python -m pipeproxy``: the same as the ``pipeproxy`` command."""

import sys

from .cli import main

sys.exit(main())
