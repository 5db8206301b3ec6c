"""``python -m peftlab``: the ``peftlab`` command, as ``python -m peftlab.cli`` runs it."""

import sys

from peftlab.cli import main

sys.exit(main())
