"""``python -m attrimeter`` runs the command line."""

import sys

from attrimeter.cli import main

sys.exit(main())
