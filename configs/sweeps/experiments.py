"""Experiments as Python: `training_configurations` is a list of config mappings (or utp_dist Configs).

    python -m utp_dist.submit configs/sweeps/experiments.py --executor local

Run names and TensorBoard's HParams show the keys that differ between the configs (here model.flavour is in the
automatic name, and optim.lr). Optional `name` and `resources` work as in a grid file.
"""

from pathlib import Path

import yaml

name = "flavours"
BASE = yaml.safe_load((Path(__file__).parent.parent / "quickstart.yaml").read_text())
VIT = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128, "patch_size": 4}

training_configurations = [
    {**BASE, "optim": {**BASE["optim"], "lr": lr}, "train": {**BASE["train"], "max_steps": 100}} for lr in (1e-3, 3e-3)
] + [
    {**BASE, "model": {"flavour": "vit", "config": VIT}, "train": {**BASE["train"], "max_steps": 100}},
]
