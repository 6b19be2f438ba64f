"""make bench [QUICK=1]: speed measurements to output/bench/ (bench.json, bench.md)."""
import argparse

from musicgen_finetune import environment

environment.prepare()
from musicgen_finetune import bench  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--quick", action="store_true", help="smaller workloads (minutes, not tens of minutes)")
opts = parser.parse_args()
print(f"Written to {bench.run(quick=opts.quick)}")
