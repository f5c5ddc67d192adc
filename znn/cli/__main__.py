"""`python -m znn.cli ...`: the `znn` command."""

import sys

from znn.cli import main

sys.exit(main())
