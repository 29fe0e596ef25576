# Init images and masks as users have them: 8-bit RGB/RGBA exactly as diffusers' load_image + VaeImageProcessor give them; 16-bit and
# float files checked against their own pixel values (diffusers clips both: white / black); palette, LA, CMYK; EXIF orientation;
# refusals of huge and broken files; the first frame of animations, with a warning.
import io, struct, zlib
import numpy as np, pytest
from PIL import Image
from tinysd.images import ImageError, ImageWarning, MAX_PIXELS, load_image, load_mask, alpha_mask, inpaint_mask

def noise(h, w, c=3, seed=0): return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8).squeeze()

def diffusers_pixels(path) -> np.ndarray:
  from diffusers.utils import load_image as d_load
  from diffusers.image_processor import VaeImageProcessor
  x = VaeImageProcessor(vae_scale_factor=8, do_normalize=False).preprocess(d_load(str(path)))
  return x[0].permute(1, 2, 0).numpy()

def with_orientation(im:Image.Image, o:int) -> bytes:
  exif = Image.Exif(); exif[0x0112] = o
  b = io.BytesIO(); im.save(b, format="PNG", exif=exif.tobytes())
  return b.getvalue()

@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_8bit_like_diffusers(tmp_path, mode):
  # 70x61 snaps to 64x56 through the same Lanczos resize; opaque RGBA is the same image (diffusers drops alpha, we composite on white)
  p = tmp_path / "a.png"
  a = noise(61, 70, 4); a[..., 3] = 255
  Image.fromarray(a if mode == "RGBA" else a[..., :3], mode).save(p)
  got = load_image(p)
  assert got.shape == (56, 64, 3) and np.array_equal(got, diffusers_pixels(p))

def test_exif_orientation_like_diffusers(tmp_path):
  p = tmp_path / "phone.png"
  p.write_bytes(with_orientation(Image.fromarray(noise(16, 24)), 6))   # 6: shown rotated 90 degrees clockwise
  got = load_image(p)
  assert got.shape == (24, 16, 3) and np.array_equal(got, diffusers_pixels(p))
  assert np.array_equal(got, np.asarray(Image.fromarray(noise(16, 24)).transpose(Image.Transpose.ROTATE_270), np.float32) / 255)
  m = tmp_path / "mask.png"
  m.write_bytes(with_orientation(Image.fromarray(np.tri(16, 24, dtype=np.uint8) * 255), 6))
  assert np.array_equal(load_mask(m, (16, 24)), np.rot90(np.tri(16, 24, dtype=np.float32), -1))

def test_transparency_composited_on_white(tmp_path):
  a = noise(16, 16, 4)
  want = np.round(a[..., :3] * (a[..., 3:] / 255) + 255 * (1 - a[..., 3:] / 255)) / 255
  assert np.abs(load_image(Image.fromarray(a, "RGBA")) - want).max() <= 1 / 255 + 1e-6
  la = Image.fromarray(a[..., [0, 3]], "LA")
  want = np.round(a[..., :1] * (a[..., 3:] / 255) + 255 * (1 - a[..., 3:] / 255)) / 255
  assert np.abs(load_image(la) - want).max() <= 1 / 255 + 1e-6
  p = Image.fromarray(noise(16, 16)).quantize(16); p.info["transparency"] = 0
  got, idx = load_image(p), np.asarray(p)
  assert np.allclose(got[idx == 0], 1.0) and np.array_equal(got[idx != 0], np.asarray(p.convert("RGB"), np.float32)[idx != 0] / 255)
  assert np.array_equal(alpha_mask(p), (idx == 0).astype(np.float32))

@pytest.mark.parametrize("mode", ["P", "CMYK", "1", "L", "YCbCr"])
def test_other_modes_are_their_rgb(mode):
  im = Image.fromarray(noise(16, 8)).convert(mode)
  assert np.array_equal(load_image(im), np.asarray(im.convert("RGB"), np.float32) / 255)

def test_16bit_png_keeps_its_tones(tmp_path):
  a = (np.arange(16 * 32).reshape(16, 32) * 127 + 5).astype(np.uint16)   # 5 .. 65029: would be white after convert("RGB")
  p = tmp_path / "g16.png"; Image.fromarray(a).save(p)
  assert Image.open(p).mode == "I;16"
  got = load_image(p)
  assert np.abs(got - (a / 65535)[..., None]).max() <= 1e-6 and np.array_equal(got[..., 0], got[..., 2])
  assert np.abs(load_mask(p, (32, 16), binarize=False) - a / 65535).max() <= 1e-6
  assert np.array_equal(load_mask(p, (32, 16)), (a / 65535 >= 0.5).astype(np.float32))
  assert load_image(p, (16, 8)).shape == (8, 16, 3)   # resized in float

def test_float_tiff_keeps_its_tones(tmp_path):
  a = np.linspace(0, 1, 16 * 16, dtype=np.float32).reshape(16, 16) ** 2   # [0,1]: taken as it is (convert("RGB") makes it black)
  p = tmp_path / "f.tif"; Image.fromarray(a, "F").save(p)
  assert np.abs(load_image(p)[..., 1] - a).max() <= 1e-6
  q = tmp_path / "hdr.tif"; Image.fromarray(a * 4 - 1, "F").save(q)   # outside [0,1]: mapped from its own min..max
  assert np.abs(load_image(q)[..., 0] - a).max() <= 1e-6
  n = tmp_path / "nan.tif"; b = a.copy(); b[3, 3] = np.nan; Image.fromarray(b, "F").save(n)
  with pytest.raises(ImageError, match="NaN or infinite"): load_image(n)

def test_16bit_tiff_and_32bit_int(tmp_path):
  a = (np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)
  p = tmp_path / "g16.tif"; Image.fromarray(a).save(p)
  assert np.abs(load_image(p)[..., 0] - a / 65535).max() <= 1e-6
  b = a.astype(np.int32) * 30000   # needs more than 16 bits: scaled by the file's 32-bit signed range
  q = tmp_path / "i32.tif"; Image.fromarray(b).save(q)
  assert np.abs(load_image(q)[..., 0] - b / (2**31 - 1)).max() <= 1e-6

def header_only_png(w, h) -> bytes:   # a valid PNG header claiming w x h: PIL reads the size without decoding anything
  chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
  return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")

@pytest.mark.parametrize("w,h", [(4097, 4097), (20000, 20000)])   # over our limit; over PIL's decompression-bomb error limit too
def test_huge_images_refused_before_decoding(tmp_path, w, h):
  p = tmp_path / "huge.png"; p.write_bytes(header_only_png(w, h))
  assert w * h > MAX_PIXELS
  with pytest.raises(ImageError, match="downscale it first"): load_image(p)
  with pytest.raises(ImageError, match="mask '.*huge.png' is .*downscale it first"): load_mask(p, (64, 64))

def test_animated_first_frame_with_warning(tmp_path):
  p = tmp_path / "anim.gif"
  frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
  frames[0].save(p, save_all=True, append_images=frames[1:], duration=100)
  with pytest.warns(ImageWarning, match="has 3 frames; using the first"): got = load_image(p)
  assert np.allclose(got, [1, 0, 0])

def test_broken_files_refused(tmp_path):
  good = io.BytesIO(); Image.fromarray(noise(32, 32)).save(good, format="PNG")
  p = tmp_path / "cut.png"; p.write_bytes(good.getvalue()[:len(good.getvalue()) // 2])
  with pytest.raises(ImageError, match="cut.png' is not a readable image"): load_image(p)
  with pytest.raises(ImageError, match="does not exist"): load_image(tmp_path / "nope.png")
  with pytest.raises(ImageError, match="is not a readable image"): load_image(tmp_path)
  with pytest.raises(ImageError, match="at least 8x8"): load_image(Image.new("RGB", (7, 64)))
  with pytest.raises(ImageError, match="no mask"): inpaint_mask(Image.new("RGB", (16, 16)), None, (16, 16))
