"""Geo (torch-free): raster I/O, the one scene reader (band policy), the one window generator, vectors."""
