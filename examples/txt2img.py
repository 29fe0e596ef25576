#!/usr/bin/env python3
# python examples/txt2img.py --model v1-5-pruned-emaonly.safetensors --prompt "a lighthouse at dusk" --output out.png
import sys
from tinysd.cli import main

if __name__ == "__main__": sys.exit(main(["txt2img", *sys.argv[1:]]))
