"""`python -m mlx_fusion ...` is the `mlx-fusion` command."""

import sys

from .cli import main

sys.exit(main())
