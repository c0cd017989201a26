"""Download the paper's released checkpoints, heads or TALL masks, placed where main.py looks, and verify them.

python download_checkpoints.py --model=ViT-B-32 --kind=checkpoints
python download_checkpoints.py --model=ViT-B-16 --kind=tall_masks --source=gdrive
"""

import sys

from tallmasks.experiments.download import main

if __name__ == "__main__":
    sys.exit(main())
