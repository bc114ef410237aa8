"""`python -m keras_isomax` runs the `keras-isomax` command."""

import sys

from keras_isomax_cli import main

sys.exit(main())
