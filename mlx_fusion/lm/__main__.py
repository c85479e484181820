"""``python -m mlx_fusion.lm MODULE ARGS...``: the same as ``mlx-fusion run MODULE ARGS...``."""

import sys

from .run import main

sys.exit(main())
