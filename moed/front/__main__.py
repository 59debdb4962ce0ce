import sys

from moed.front.server import main

sys.exit(main())
