"""The single sigmoid neuron of ``recipes/single_node.py``: its error surface and picture."""
