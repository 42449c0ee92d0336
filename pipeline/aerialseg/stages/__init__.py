"""One module per DVC stage: the only place that reads params.yaml sections and resolves stage paths.

Each module's ``run(params, ...)`` takes the loaded params plus the CLI's overrides (None = the params
value) and calls the library layers; cli.py parses flags and calls it, nothing else.
"""
