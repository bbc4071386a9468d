import sys

from blindfold.cli import main

sys.exit(main())
