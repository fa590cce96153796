import sys

from faults.matrix import main

sys.exit(main())
