"""The task libraries the recipes use, one package per task: carvana, mnist, neuron."""
