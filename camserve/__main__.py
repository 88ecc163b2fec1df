import sys

from camserve.cli import main

sys.exit(main())
