import sys

from compose.api.serve import main

sys.exit(main())
