"""MusicGen between AudioCraft's snapshot layout and the transformers format (make import-hf, make export-hf).

mapping.py   every tensor by name and shape, through explicit links, checked one to one
configs.py   the configs of both libraries, each from the other, and the shapes of the models they build
convert.py   import_hf, export_hf, and the cache of transformers folders given as MODEL=
"""
