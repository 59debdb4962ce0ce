import sys

from moed.engine.loop import main

sys.exit(main())
