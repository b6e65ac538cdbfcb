import sys

from trivit.cli import main

sys.exit(main())
