"""The platform's models in PyTorch (training and export only; services never import this package).

- ``simclr``: SimCLR ResNet-101 feature extractor (Bigearth-net-ssl-label)
- ``linear_probe``: BigEarthNet 43- and 19-class linear probes (Bigearth-net-linear-label[-19])
- ``compression``: learned compression autoencoder + residual VQ (Bigearth-net-compression-*)
- ``uc5_cfactor``, ``uc6_locust``: use-case models
- ``specs``: the served contract of every model (single source of truth for the Triton repository)
- ``repository``, ``export``: rendering ``model_repository/`` and ``python -m models.export``
"""
