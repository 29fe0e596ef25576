# Architectures only. Importing them turns on ops/'s CPU fast path (own GEMM kernels, all cores) unless TINYSD_KERNELS=generic.
from tinysd_ops.cpu import install as _install_fast_path
_install_fast_path()
