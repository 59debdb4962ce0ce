import sys

from moed.cli import main

sys.exit(main())
