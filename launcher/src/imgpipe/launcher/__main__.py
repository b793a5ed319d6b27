"""`python -m imgpipe.launcher` is `imgpipe`."""

import sys

from imgpipe.launcher.cli import main

sys.exit(main())
