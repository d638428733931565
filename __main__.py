"""`python -m nlibert ...` is `nlibert ...`."""
import sys

from .cli import main

sys.exit(main())
