"""The data stage: a folder of captioned audio -> `manifests/<name>/` (make manifests), and its reader.

manifests.py   build_manifests: decode, check, convert, measure, cut, split, write (make manifests)
captions.py    captions in the forms people have them, and the caption grammar (bpm, key)
audio.py       one audio file: decode, check, convert, loudness, tempo and key
augment.py     augmented variants whose captions stay true (AUGMENT=)
synthetic.py   the synthetic 808 and chiptune clips of the demo and the tests
dataset.py     one reader of a manifests/<name> folder, for training and evaluation
versions.py    dataset versions: a run reads the one it started on to its end; its content hash
librosa_loader.py  librosa imported so that processes never write numba's cache at once
"""
