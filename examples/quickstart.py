"""The main job on the bundled real data: train, save, patch, segment, score, picture.

    python examples/quickstart.py                 # a small random SAM, about 30 s on a 2-core CPU
    python examples/quickstart.py --sam sam_vit_b_01ec64.pth --device cuda
"""

import sys

from samed_adapter.cli.quickstart import main

if __name__ == "__main__":
    sys.exit(main())
