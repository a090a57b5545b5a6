"""ADD on a problem that trains on CPU: coloured 16×16 digits, class-conditional.

The pieces, one concept per module:

- [`data`](data.py): the data set (scikit-learn's 8×8 digits, upsampled and coloured);
- [`nets`](nets.py): the teacher UNet config and the two small classifiers;
- [`teacher`](teacher.py): diffusion training of the teacher (cached);
- [`sampling`](sampling.py): teacher DDIM and few-step student sampling;
- [`metrics`](metrics.py): Fréchet distance, accuracy and diversity in classifier features;
- [`distill`](distill.py): the ADD training loop on addkit's parts;
- [`plots`](plots.py): sample grids and loss curves (PIL only);
- [`study`](study.py): the ablation table and the command line.

Run it with ``python examples/add_toy.py`` (see ``--help``).
"""
