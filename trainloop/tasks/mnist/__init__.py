"""MNIST for ``recipes/mnist_mlp.py``: the four standard files as in-memory tensors."""
