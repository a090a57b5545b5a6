"""SDXL / SD 1.x / SD 2.x UNets on VP schedules: the `recipe.family.Family` adapter (`SDXL`) and its parts.

- ``models``: teacher and student (one UNet with LoRA), VAE, text, discriminator;
- ``report``: grids, diversity, the export; ``family``: the adapter;
- ``tiny``, ``random``: the ``tiny`` preset (the tiny world's data and scores) and the ``random``
  preset (random-weight models, for plumbing checks).
"""
