# PyTorch zip checkpoints (.ckpt/.pt/.bin) without trusting their pickle. Python's pickle runs whatever callable the file names, so this
# Unpickler resolves only an allow-list: torch's tensor rebuild functions, storage types and OrderedDict; a few harmless objects Lightning
# checkpoints carry (numpy scalars, callback state) become inert placeholders that are never called. Anything else aborts the load before
# it can run. Tensors come back as lazy DISK views into the (uncompressed) zip members, like safetensors.
import collections, pathlib, pickle, struct, zipfile
from tinygrad import Tensor, dtypes

class PickleRefused(ValueError): pass

STORAGES = {"FloatStorage": dtypes.float32, "HalfStorage": dtypes.float16, "BFloat16Storage": dtypes.bfloat16, "DoubleStorage": dtypes.float64,
            "LongStorage": dtypes.int64, "IntStorage": dtypes.int32, "ShortStorage": dtypes.int16, "CharStorage": dtypes.int8,
            "ByteStorage": dtypes.uint8, "BoolStorage": dtypes.bool}

class _StorageType:
  def __init__(self, dtype): self.dtype = dtype

class _Inert:
  """Stands in for allowed non-tensor objects (numpy scalars and dtypes, Lightning callbacks): takes any arguments, does nothing."""
  def __init__(self, *args, **kwargs): pass
  def __setstate__(self, state): pass

_INERT = {("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"), ("numpy", "dtype"), ("_codecs", "encode"),
          ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"), ("lightning.pytorch.callbacks.model_checkpoint", "ModelCheckpoint")}

def _contiguous_view(flat:Tensor, offset:int, size:tuple, stride:tuple) -> Tensor:
  # torch.save keeps a view's strides; accept any permutation of a dense layout (e.g. a saved transpose), nothing overlapping or gapped
  n = 1
  for s in size: n *= s
  if n == 0: return Tensor.zeros(*size, dtype=flat.dtype)
  dims = sorted((i for i in range(len(size)) if size[i] != 1), key=lambda i: -stride[i])
  expect = 1
  for i in reversed(dims):
    if stride[i] != expect: raise PickleRefused(f"tensor with unsupported strides {stride} for shape {size}")
    expect *= size[i]
  if offset < 0 or offset + n > flat.shape[0]: raise PickleRefused("tensor points outside its storage")
  t = flat[offset:offset+n].reshape([size[i] for i in dims]) if dims else flat[offset:offset+n]
  if dims: t = t.permute(sorted(range(len(dims)), key=lambda j: dims[j]))
  return t.reshape(size)

class _Unpickler(pickle.Unpickler):
  def __init__(self, f, storage):
    super().__init__(f)
    self._storage = storage

  def find_class(self, module:str, name:str):
    if module == "torch._utils" and name == "_rebuild_tensor_v2": return self._rebuild_tensor
    if module == "torch._utils" and name == "_rebuild_parameter": return lambda data, requires_grad=False, hooks=None, *rest: data
    if module == "torch" and name in STORAGES: return _StorageType(STORAGES[name])
    if (module, name) == ("collections", "OrderedDict"): return collections.OrderedDict
    if (module, name) in _INERT: return _Inert
    raise PickleRefused(f"refusing to unpickle {module}.{name}: only tensors and plain containers are allowed in a checkpoint "
                        "(convert trusted files to .safetensors)")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
      raise PickleRefused(f"unexpected persistent id {str(pid)[:60]}")
    return self._storage(pid[1].dtype, str(pid[2]))

  def _rebuild_tensor(self, storage, storage_offset, size, stride, *_):
    if not isinstance(storage, Tensor) or not all(isinstance(x, int) for x in (storage_offset, *size, *stride)) or len(size) != len(stride):
      raise PickleRefused("malformed tensor record")
    return _contiguous_view(storage, storage_offset, tuple(size), tuple(stride))

def load_torch_zip(path) -> dict[str, Tensor]:
  """Flat {name: lazy Tensor} of a PyTorch zip checkpoint (the "state_dict" entry of Lightning checkpoints, else the top-level dict)."""
  path = pathlib.Path(path)
  try: zf = zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError) as e: raise PickleRefused(f"not a readable PyTorch zip archive ({e})") from None
  with zf:
    pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pkls) != 1: raise PickleRefused("not a PyTorch checkpoint (no single data.pkl in the zip archive)")
    root = pkls[0][:-len("data.pkl")]
    if root + "byteorder" in zf.namelist() and zf.read(root + "byteorder").strip() != b"little":
      raise PickleRefused("big-endian checkpoints are not supported")
    whole, cache = Tensor(path), {}
    with open(path, "rb") as f:
      def storage(dtype, key:str) -> Tensor:
        if key not in cache:
          try: info = zf.getinfo(f"{root}data/{key}")
          except KeyError: raise PickleRefused(f"storage {key!r} is missing from the archive") from None
          if info.compress_type != zipfile.ZIP_STORED: raise PickleRefused(f"storage {key!r} is compressed; torch.save never does that")
          f.seek(info.header_offset)
          local = f.read(30)
          if len(local) < 30 or local[:4] != b"PK\x03\x04": raise PickleRefused("corrupted zip local header")
          start = info.header_offset + 30 + sum(struct.unpack("<HH", local[26:30]))   # + file name + extra field
          if info.file_size % dtype.itemsize or start + info.file_size > whole.shape[0]: raise PickleRefused(f"storage {key!r} is truncated")
          cache[key] = whole[start:start + info.file_size].bitcast(dtype) if info.file_size else Tensor.zeros(0, dtype=dtype)
        if cache[key].dtype != dtype: raise PickleRefused(f"storage {key!r} is used with two dtypes")
        return cache[key]
      try: obj = _Unpickler(zf.open(pkls[0]), storage).load()
      except PickleRefused: raise
      except Exception as e: raise PickleRefused(f"corrupted pickle ({type(e).__name__}: {e})") from None
  if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict): obj = obj["state_dict"]
  if not isinstance(obj, dict): raise PickleRefused("the pickle does not hold a state dict")
  return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}
