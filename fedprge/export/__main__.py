import sys

from fedprge.export.cli import main

sys.exit(main())
