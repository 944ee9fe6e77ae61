"""`python -m bench ...` is `smoothap-bench ...` (and what torchrun launches:
`torchrun -m bench train ...`)."""

import sys

from bench.cli import main

sys.exit(main())
