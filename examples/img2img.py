#!/usr/bin/env python3
# python examples/img2img.py --model v1-5-pruned-emaonly.safetensors --image in.png --prompt "..." --output out.png
import sys
from tinysd.cli import main

if __name__ == "__main__": sys.exit(main(["img2img", *sys.argv[1:]]))
