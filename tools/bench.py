"""make bench [QUICK=1]: speed measurements to output/bench/ (bench.json, bench.md); --help lists the options."""
import sys

from musicgen_finetune import environment

environment.prepare()
from musicgen_finetune import bench  # noqa: E402

print(f"Written to {bench.main(sys.argv[1:])}")
