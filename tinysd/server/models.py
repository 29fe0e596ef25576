# Request/response bodies of A1111's API (modules/api/models.py there): the same field names and defaults, so its clients' JSON validates
# as is. Fields A1111 has and tinysd does not act on are accepted (extra="allow") and echoed back in `parameters`; the few that would
# change the image if honoured (hires fix, tiling, variation seeds, scripts) are refused by the API with a 422 instead of ignored.
from __future__ import annotations
from typing import Any
from pydantic import BaseModel, ConfigDict, Field

MAX_SIDE = 2048          # pixels per side a request may ask for (the library allows 4096; a server should not queue hour-long jobs)
MAX_PROMPT = 10_000      # characters
MAX_STEPS = 150          # A1111's UI maximum
MAX_BATCH, MAX_ITER = 8, 16

def _side(): return Field(default=512, ge=8, le=MAX_SIDE, multiple_of=8)

class Txt2ImgRequest(BaseModel):
  model_config = ConfigDict(extra="allow")
  prompt: str = Field(default="", max_length=MAX_PROMPT)
  negative_prompt: str = Field(default="", max_length=MAX_PROMPT)
  styles: list[str] | None = None
  seed: int = Field(default=-1, ge=-1, le=2**53 - 1)   # -1 = random; the page shows seeds in JavaScript numbers
  subseed: int = -1
  subseed_strength: float = 0
  seed_resize_from_h: int = -1
  seed_resize_from_w: int = -1
  sampler_name: str | None = None
  sampler_index: str = "Euler"            # A1111's fallback when sampler_name is empty
  scheduler: str | None = None            # A1111 >= 1.9: "Automatic", or "Karras" with DPM++ 2M
  batch_size: int = Field(default=1, ge=1, le=MAX_BATCH)
  n_iter: int = Field(default=1, ge=1, le=MAX_ITER)
  steps: int = Field(default=50, ge=1, le=MAX_STEPS)
  cfg_scale: float = Field(default=7.0, ge=0, le=100, allow_inf_nan=False)
  width: int = _side()
  height: int = _side()
  restore_faces: bool | None = None
  tiling: bool | None = None
  do_not_save_samples: bool = False
  do_not_save_grid: bool = False
  eta: float | None = None
  denoising_strength: float | None = None
  enable_hr: bool = False
  override_settings: dict[str, Any] | None = None
  override_settings_restore_afterwards: bool = True
  script_name: str | None = None
  script_args: list = []
  send_images: bool = True
  save_images: bool = False                # tinysd's server writes nothing to disk; images only come back in the response
  alwayson_scripts: dict = {}
  force_task_id: str | None = Field(default=None, max_length=64)   # the id /progress?id_task= and /interrupt take for this job
  infotext: str | None = None

class Img2ImgRequest(Txt2ImgRequest):
  init_images: list[str] | None = None
  resize_mode: int = 0
  denoising_strength: float = Field(default=0.75, ge=0, le=1, allow_inf_nan=False)
  image_cfg_scale: float | None = None
  mask: str | None = None
  mask_blur_x: int = Field(default=4, ge=0, le=64)
  mask_blur_y: int = Field(default=4, ge=0, le=64)
  mask_blur: int | None = Field(default=None, ge=0, le=64)
  inpainting_fill: int = Field(default=0, ge=0, le=3)
  inpaint_full_res: bool = True
  inpaint_full_res_padding: int = 0
  inpainting_mask_invert: int = Field(default=0, ge=0, le=1)
  initial_noise_multiplier: float | None = None
  include_init_images: bool = False

class GenerationResponse(BaseModel):
  images: list[str] | None = None
  parameters: dict
  info: str

class ProgressResponse(BaseModel):
  progress: float
  eta_relative: float
  state: dict
  current_image: str | None = None
  textinfo: str | None = None

class PNGInfoRequest(BaseModel):
  image: str

class PNGInfoResponse(BaseModel):
  info: str
  items: dict
  parameters: dict

class InterruptRequest(BaseModel):
  id_task: str | None = None   # tinysd: interrupt this job (running or queued) instead of every running one
