"""`python -m amortized3d ...` (and `accelerate launch -m amortized3d store build ...`): the amortized3d command."""

import sys

from amortized3d.cli import main

sys.exit(main())
