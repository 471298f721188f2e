"""`python -m sambay ...` (and `torchrun -m sambay ...`) run the command line."""

import sys

from sambay.cli import main

sys.exit(main())
