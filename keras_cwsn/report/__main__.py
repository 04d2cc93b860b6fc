"""`python -m keras_cwsn.report`: see `keras_cwsn.report.cli`."""

import sys

from keras_cwsn.report.cli import main

sys.exit(main())
