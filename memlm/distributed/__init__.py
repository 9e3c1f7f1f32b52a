"""Scaling memlm out on existing distributed engines (the optional `memlm[distributed]` extra):
Ray Serve replicas (`ray_serve.py`), Ray Data batch inference (`ray_data.py`), data-parallel
training under torchrun (`ddp.py`) and federated distillation on Flower (`federated.py`).

Nothing in the core imports this package; each module imports its engine (ray, flwr,
torch.distributed) itself and says in one line how to install it when it is missing.
The federated run is split in three: `fed_data.py` (settings, who holds which documents),
`fed_train.py` (local updates, FedAvg, FedDF's ensemble distillation; no Flower) and
`federated.py` (the Flower ServerApp/ClientApp, the message audit, the simulation).
"""
