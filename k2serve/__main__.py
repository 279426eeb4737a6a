"""`python -m k2serve ...` is the `k2serve` command."""

import sys

from k2serve.cli import main

sys.exit(main())
