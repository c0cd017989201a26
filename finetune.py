"""Fine-tune one CLIP image encoder per dataset (the paper's protocol).

python finetune.py --model=ViT-B-32 --world-size=2 --datasets MNIST,Cars
torchrun --nproc_per_node=4 finetune.py --model=ViT-L-14
"""

import sys

from tallmasks.experiments.finetuning import main

if __name__ == "__main__":
    sys.exit(main())
