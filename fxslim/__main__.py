import sys

from fxslim.cli import main

sys.exit(main())
