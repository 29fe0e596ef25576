#!/usr/bin/env python3
# python examples/inpaint.py --model v1-5-pruned-emaonly.safetensors --image in.png --mask mask.png --prompt "..." --output out.png
import sys
from tinysd.cli import main

if __name__ == "__main__": sys.exit(main(["inpaint", *sys.argv[1:]]))
