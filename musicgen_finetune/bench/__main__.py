"""`python -m musicgen_finetune.bench step ...` (one configuration, a JSON line) and `... bench serve` (the fork
server): the measuring processes of bench/isolation.py."""

import sys

from .isolation import serve
from .run import step_main

if sys.argv[1:2] == ["step"]:
    sys.exit(step_main(sys.argv[2:]))
if sys.argv[1:2] == ["serve"]:
    serve()
    sys.exit(0)
sys.exit("usage: python -m musicgen_finetune.bench step|serve ... (make bench runs the benchmark)")
