import sys

from apppot.cli import main

sys.exit(main())
