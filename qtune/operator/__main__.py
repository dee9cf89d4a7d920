"""`python -m qtune.operator` = `qtune operator`."""

import sys

from qtune.operator.main import main

sys.exit(main())
