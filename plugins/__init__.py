"""The built-in plugins, one module each; they use only trainloop's public API.

Each module is registered under its own name (``progress``, ``metrics_jsonl``, ...):
its module-level ``add_options`` and ``configure`` hooks add its command-line options
and, when the plugin is wanted, register the object that does the work. Use the
classes directly with the Python API: ``Learner(..., plugins=[Progress()])``.
"""
