"""Model folders in the facebook/musicgen-small snapshot layout, and everything that reads or writes them.

folder.py    the files of a model folder, checked (only reads)
open.py      open_model: a transformers folder converted once, then checked
xp_cfg.py    the config a model was trained with, and the LM built from it
hf/          the transformers format, both ways (make import-hf, make export-hf)
tiny.py      the tiny model of the demo and the tests
"""
