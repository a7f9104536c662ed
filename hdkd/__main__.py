import sys

from hdkd.cli import main

sys.exit(main())
