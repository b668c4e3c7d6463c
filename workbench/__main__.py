"""`python -m workbench` (also under `torchrun`) is the same as `gkp-workbench`."""

import sys

from .cli import main

sys.exit(main())
