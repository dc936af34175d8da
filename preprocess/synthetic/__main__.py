"""``python -m preprocess.synthetic``: see :mod:`preprocess.synthetic.cli`."""

import sys

from preprocess.synthetic.cli import main

sys.exit(main())
