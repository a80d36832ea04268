import sys

from msconv_cli import main

sys.exit(main())
