import sys

from moecap.cli import main

sys.exit(main())
