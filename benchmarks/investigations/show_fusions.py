"""Print the fused computations of an HLO dump that contain a given op pattern.

    python benchmarks/investigations/show_fusions.py OUT.hlo PATTERN [MAX_LINES]
"""
import re
import sys

text = open(sys.argv[1]).read()
pattern = sys.argv[2]
limit = int(sys.argv[3]) if len(sys.argv) > 3 else 80
blocks = re.split(r"\n(?=%\S+ \()", text)
for block in blocks:
    head = block.split("\n", 1)[0]
    if pattern in block and "fused" in head:
        lines = block.split("\n")
        print("\n".join(line[:220] for line in lines[:limit]))
        print("-----")
