import sys

from segnode.cli import main

sys.exit(main())
