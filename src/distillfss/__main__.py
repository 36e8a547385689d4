"""``python -m distillfss`` (also what ``torchrun -m distillfss`` runs)."""

import sys

from .cli import main

sys.exit(main())
