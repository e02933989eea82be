"""Fine-tune a SAMed adapter: a thin front over samed_adapter.training.

    python examples/train.py --data /data/Task03_Liver --format nifti --num-classes 2 \
        --sam sam_vit_b_01ec64.pth -o runs/liver
    torchrun --nproc_per_node 2 examples/train.py ...   # several GPUs (DistributedDataParallel)
    python examples/train.py ... -o runs/liver --resume   # continue after a crash or Ctrl-C
    python examples/train.py ... --clicks -o runs/liver   # also learn to refine a class from clicks
    python examples/train.py --help                     # every flag, with the published defaults
"""

import shlex
import sys

from samed_adapter.cli.train import main

if __name__ == "__main__":
    # The script as it was started, for the --resume command printed on Ctrl-C.
    sys.exit(main(invocation=f"python {shlex.quote(sys.argv[0])}"))
