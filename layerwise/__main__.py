"""`python -m layerwise ...`, which is what `torchrun -m layerwise ...` runs in each process."""

import sys

from layerwise.cli import main

sys.exit(main())
