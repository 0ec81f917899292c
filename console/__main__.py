import sys

from console.serve import main

sys.exit(main())
