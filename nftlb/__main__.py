import sys

from nftlb.cli import main

sys.exit(main())
