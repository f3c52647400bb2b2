"""python -m fused_resnet.bench.roofline: see the package's docstring."""

from fused_resnet.bench.roofline.report import main

raise SystemExit(main())
