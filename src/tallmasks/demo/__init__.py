"""The offline demo: a small CLIP pre-trained here, experts fine-tuned on rendered scene tasks, and the
paper's methods run through main.py's own code (:mod:`~tallmasks.demo.local`); the non-local experiment
on two foundations (:mod:`~tallmasks.demo.non_local`). Run it with ``python -m tallmasks.demo``."""
