import sys

from evictkit.cli import main

sys.exit(main())
