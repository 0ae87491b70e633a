"""`himoe bench` from a source checkout without installing: the code is himoe.bench.throughput.

    python benchmarks/throughput.py --smoke --out /tmp/b.md
"""

import sys

from himoe.bench.throughput import main

if __name__ == "__main__":
    sys.exit(main())
