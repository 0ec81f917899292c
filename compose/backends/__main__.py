import sys

from compose.backends.process import main

sys.exit(main())
