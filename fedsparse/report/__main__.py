"""`python -m fedsparse.report`: see `fedsparse.report.cli`."""

import sys

from fedsparse.report.cli import main

sys.exit(main())
