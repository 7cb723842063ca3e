"""``python -m shmipc``: the same as the `shmipc` command."""
import sys

from shmipc.cli import main

sys.exit(main())
