import sys

from sema.profile.cli import main

sys.exit(main())
