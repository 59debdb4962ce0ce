import sys

from moed.front.main import main

sys.exit(main())
