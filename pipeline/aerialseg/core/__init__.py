"""Core (torch-free): errors, atomic file I/O, params config, stage paths, output safety, classes."""
