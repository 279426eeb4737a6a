"""`python -m k2serve.cli ...` is the `k2serve` command."""

import sys

from k2serve.cli import main

sys.exit(main())
