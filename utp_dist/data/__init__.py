"""The data wing: the folder index, built-in data, user datasets, loaders, device input and `python -m utp_dist.data check`."""
