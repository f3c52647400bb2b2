import sys

from fused_resnet.cli import main

sys.exit(main())
