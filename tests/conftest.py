import os, pytest
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

@pytest.fixture(autouse=True)
def _seed():
  import numpy as np
  np.random.seed(0)
  try:
    import torch
    torch.manual_seed(0)
  except ImportError: pass
