import sys

from adgen.cli import main

sys.exit(main())
