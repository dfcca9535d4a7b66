"""``python -m AutoSegLib`` is the same as the ``autoseg`` command."""

import sys

from AutoSegLib.cli import main

sys.exit(main())
