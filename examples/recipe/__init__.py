"""The recipes' training core, written once for every model family.

``add_sdxl.py`` (SDXL / SD 1.x / SD 2.x UNets, VP schedules) and ``add_flow.py`` (SD3 / Flux
transformers, rectified flow) are thin entry points: each names a `Family` adapter and hands it to
`recipe.loop.main`. The core owns everything that does not depend on the model:

- `recipe.args`: the flags every family shares, their checks, the paths checked before anything loads;
- `recipe.loop`: accelerate, optimisers, EMA, the loop, progress, logs, the closing summary;
- `recipe.step`: one ADD / LADD optimiser step (one host read: an all-reduced non-finite flag);
- `recipe.dmd`: ``--method dmd2`` (the fake score and one DMD2 optimiser step);
- `recipe.checkpoint`: complete-or-absent checkpoints; `recipe.fsdp`: ``--fsdp``;
- `recipe.data`: image + caption data and the resumable stream sampler;
- `recipe.family`: the adapter protocol; `recipe.sdxl` and `recipe.flow` implement it.
"""
