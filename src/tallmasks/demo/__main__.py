import sys

from tallmasks.demo.cli import main

sys.exit(main())
