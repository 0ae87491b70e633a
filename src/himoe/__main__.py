import sys

from himoe.cli import main

sys.exit(main())
