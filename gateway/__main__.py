import sys

from gateway.serve import main

sys.exit(main())
