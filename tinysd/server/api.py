# The HTTP side: AUTOMATIC1111's /sdapi/v1 routes and the web page, on FastAPI. Requests become Specs here (validated, images decoded,
# seeds fixed), go through the Scheduler, and come back in A1111's response shape. Every error is a JSON {"detail": "<one line>"}.
from __future__ import annotations
import asyncio, base64, binascii, hmac, importlib.resources, os, sys, time
from pathlib import Path
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError, HTTPException
from fastapi.responses import JSONResponse, HTMLResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from tinysd.pipeline import InputError
from tinysd.server import a1111
from tinysd.server.jobs import Scheduler, Cancelled, JobFailed, one_line
from tinysd.server.models import Txt2ImgRequest, Img2ImgRequest, GenerationResponse, ProgressResponse, PNGInfoRequest, PNGInfoResponse, \
  InterruptRequest
from tinysd.server.render import Spec, blur_mask, fill_masked

MAX_BODY = 64 << 20   # bytes; an init image + mask as base64 PNGs at MAX_SIDE fit easily

class Server:
  """What the routes share: the queue, the known checkpoints (sd-models) and the options A1111 clients read and set."""
  def __init__(self, scheduler:Scheduler, models:list[dict], auth:list[tuple[str, str]]|None=None):
    self.scheduler, self.models, self.auth = scheduler, models, auth
    self.options = {"sd_model_checkpoint": models[0]["title"], "sd_checkpoint_hash": models[0]["hash"], "samples_format": "png",
                    "CLIP_stop_at_last_layers": 1, "live_previews_enable": True, "show_progress_every_n_steps": 2, "enable_pnginfo": True}

  def find_model(self, name:str|None) -> dict|None:
    if not name: return None
    for m in self.models:
      if name in (m["title"], m["model_name"], m["hash"], m["filename"], Path(m["filename"]).name): return m
    return None

  @property
  def current(self) -> dict: return self.find_model(self.options["sd_model_checkpoint"])

# ** errors: one line of JSON each, never a traceback

def _detail(exc:RequestValidationError) -> str:
  parts = []
  for e in exc.errors()[:3]:
    kind, loc = e.get("type"), e.get("loc", ())
    if kind == "json_invalid":
      parts.append(f"malformed JSON: {(e.get('ctx') or {}).get('error', 'decode error')} (at character {loc[-1]})")
      continue
    if kind in ("model_attributes_type", "dict_type") and loc == ("body",):
      parts.append("the request body must be a JSON object" + (" (Content-Type: application/json)" if isinstance(e.get("input"), bytes) else ""))
      continue
    where = ".".join(str(x) for x in loc if x != "body")
    parts.append(f"{where}: {e.get('msg', 'invalid')}" if where else e.get("msg", "invalid"))
  return "; ".join(parts).replace("\n", " ")

def _error(status:int, detail:str, headers=None) -> JSONResponse:
  return JSONResponse({"detail": " ".join(str(detail).split())}, status_code=status, headers=headers)

class Guard:
  """ASGI middleware in front of every route (the page and /docs too): HTTP basic auth when --api-auth is set, and a body size cap."""
  def __init__(self, app, auth:list[tuple[str, str]]|None):
    self.app, self.auth = app, auth

  def _authorized(self, header:bytes|None) -> bool:
    if not header or not header.startswith(b"Basic "): return False
    try: user, _, pw = base64.b64decode(header[6:], validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError): return False
    # compare every pair so the time taken does not tell which user exists
    return any([hmac.compare_digest(user.encode(), u.encode()) & hmac.compare_digest(pw.encode(), p.encode()) for u, p in self.auth])

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http": return await self.app(scope, receive, send)
    headers = dict(scope["headers"])
    resp = None
    if self.auth and not self._authorized(headers.get(b"authorization")):
      resp = _error(401, "Incorrect username or password", {"WWW-Authenticate": 'Basic realm="tinysd"'})
    elif not headers.get(b"content-length", b"0").isdigit() or int(headers.get(b"content-length", b"0")) > MAX_BODY:
      resp = _error(413, f"request body is larger than {MAX_BODY >> 20} MiB")
    if resp is not None: return await resp(scope, receive, send)
    started = False
    async def sending(msg):
      nonlocal started
      started = started or msg["type"] == "http.response.start"
      await send(msg)
    try: await self.app(scope, receive, sending)
    except Exception as e:   # a bug: one line in the log and a 500 for the client, never a traceback or a reset connection
      print(f"tinysd serve: {scope.get('method')} {scope.get('path')}: {type(e).__name__}: {one_line(e)}", file=sys.stderr)
      if not started: await _error(500, f"internal error: {type(e).__name__}")(scope, receive, send)

# ** requests -> Specs

def _refuse_unsupported(req:Txt2ImgRequest):
  for on, what in ((req.enable_hr, "enable_hr (hires fix)"), (req.tiling, "tiling"), (req.subseed_strength, "subseed_strength (variation seeds)"),
                   (req.script_name, "script_name"), (req.alwayson_scripts, "alwayson_scripts"), (req.restore_faces, "restore_faces")):
    if on: raise InputError(f"{what} is not supported by tinysd")

def _base_spec(srv:Server, req:Txt2ImgRequest, mode:str) -> Spec:
  _refuse_unsupported(req)
  name = (req.override_settings or {}).get("sd_model_checkpoint")
  model = srv.find_model(name) if name else srv.current
  if model is None: raise HTTPException(404, f"model '{name}' not found; see /sdapi/v1/sd-models")
  sampler = a1111.resolve_sampler(req.sampler_name or req.sampler_index, req.scheduler)
  seed = req.seed if req.seed != -1 else int.from_bytes(os.urandom(4), "little") >> 1
  skip = (req.override_settings or {}).get("CLIP_stop_at_last_layers", srv.options["CLIP_stop_at_last_layers"])
  if not isinstance(skip, int) or isinstance(skip, bool) or not 1 <= skip <= 12: raise InputError(f"CLIP_stop_at_last_layers must be 1..12, got {skip!r}")
  return Spec(mode, model["filename"], model["model_name"], req.prompt, req.negative_prompt, req.steps, req.cfg_scale, sampler, seed,
              req.width, req.height, req.batch_size, req.n_iter, clip_skip=skip, extra={"Clip skip": skip} if skip > 1 else {})

def _img2img_spec(srv:Server, req:Img2ImgRequest) -> Spec:
  from tinysd.images import load_image, load_mask
  spec = _base_spec(srv, req, "img2img")
  if not req.init_images: raise InputError("init_images: one base64 image is required")
  if len(req.init_images) > 1: raise InputError("init_images: tinysd takes one init image per request (use batch_size for more images)")
  if req.resize_mode != 0: raise InputError("resize_mode: only 0 (just resize) is supported")
  if req.inpainting_fill not in (0, 1): raise InputError("inpainting_fill: 0 (fill) or 1 (original) are supported, not latent noise/nothing")
  im = a1111.decode_image(req.init_images[0], "init_images[0]")
  size = (req.width, req.height)
  spec.init, spec.strength = load_image(im, size), req.denoising_strength   # resized to width x height, as A1111's resize mode 0
  spec.extra = {"Denoising strength": req.denoising_strength} | spec.extra
  if req.mask:
    mk = a1111.decode_image(req.mask, "mask")
    if mk.size != im.size: raise InputError(f"mask is {mk.width}x{mk.height} but init_images[0] is {im.width}x{im.height}; they must match")
    if mk.mode in ("RGBA", "LA") and mk.getextrema()[-1] != (255, 255): mk = mk.getchannel("A")   # A1111: a transparent mask's alpha
    m = load_mask(mk.convert("L"), size)
    if req.inpainting_mask_invert: m = 1 - m
    if not m.any(): raise InputError("mask is empty: nothing to repaint (white = repaint)")
    blur = req.mask_blur if req.mask_blur is not None else max(req.mask_blur_x, req.mask_blur_y)
    spec.mode, spec.mask, spec.overlay = "inpaint", m, blur_mask(m, blur)
    if req.inpainting_fill == 0: spec.init = fill_masked(spec.init, m)
    spec.extra |= {"Mask blur": blur}
  return spec

async def _run(srv:Server, spec:Spec, req:Txt2ImgRequest, request:Request, echo:dict) -> dict:
  try: job = srv.scheduler.submit(spec, req.force_task_id)
  except JobFailed as e: raise HTTPException(409, str(e)) from None
  fut = asyncio.wrap_future(job.future)
  while True:
    done, _ = await asyncio.wait({fut}, timeout=0.2)
    if done: break
    if await request.is_disconnected():   # nobody is waiting for it: drop the job at its next step
      srv.scheduler.cancel(job, "abort")
      try: await fut
      except Exception: pass
      return _error(499, "client closed the request")
  try: res = fut.result()
  except Cancelled: return _error(499, "cancelled")
  except JobFailed as e: return _error(422 if e.bad_input else 500, f"{'' if e.bad_input else 'generation failed: '}{e}")
  finally: job.future = None   # the images are not kept for /progress
  model = srv.find_model(spec.model_name) or srv.find_model(spec.model) or srv.current
  seeds = res.seeds or [spec.seed]
  strength = spec.strength if spec.mode != "txt2img" else None
  info = a1111.info_json(echo, seeds=seeds, sampler=spec.sampler, infotexts=res.infotexts, model=model, strength=strength,
                         inpainting=res.inpainting_conditioning, extra=spec.extra, clip_skip=spec.clip_skip)
  return {"images": res.images if req.send_images else [], "parameters": echo, "info": info}

# ** the app

def create_app(srv:Server) -> FastAPI:
  app = FastAPI(title="tinysd", description="AUTOMATIC1111-compatible API of tinysd (Stable Diffusion on tinygrad)", version="1")
  page = importlib.resources.files("tinysd.server").joinpath("static/index.html").read_text()

  @app.exception_handler(RequestValidationError)
  async def _validation(request, exc): return _error(422, _detail(exc))

  @app.exception_handler(StarletteHTTPException)
  async def _http(request, exc): return _error(exc.status_code, exc.detail, getattr(exc, "headers", None))

  @app.exception_handler(ValueError)   # tinysd's input errors (InputError, ImageError, ...) are ValueErrors
  async def _value(request, exc): return _error(422, one_line(exc))

  @app.get("/", response_class=HTMLResponse, include_in_schema=False)
  async def index(): return page

  @app.post("/sdapi/v1/txt2img", response_model=GenerationResponse)
  async def txt2img(req:Txt2ImgRequest, request:Request):
    spec = _base_spec(srv, req, "txt2img")
    return await _run(srv, spec, req, request, req.model_dump())

  @app.post("/sdapi/v1/img2img", response_model=GenerationResponse)
  async def img2img(req:Img2ImgRequest, request:Request):
    spec = await asyncio.to_thread(_img2img_spec, srv, req)   # decoding and resizing images: off the event loop
    echo = req.model_dump()
    if not req.include_init_images: echo["init_images"], echo["mask"] = None, None
    return await _run(srv, spec, req, request, echo)

  @app.get("/sdapi/v1/progress", response_model=ProgressResponse)
  async def progress(skip_current_image:bool=False, id_task:str|None=None):
    running, queued = srv.scheduler.active()
    job = srv.scheduler.get(id_task) if id_task else (running[0] if running else None)
    state = {"skipped": False, "interrupted": False, "job": "", "job_count": len(running) + len(queued), "job_timestamp": "0",
             "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
    if job is None:
      return {"progress": 0, "eta_relative": 0, "state": state, "textinfo": "unknown task" if id_task else None}
    state |= {"job": job.id, "interrupted": job.stop == "interrupt" or job.state == "interrupted", "sampling_step": job.step,
              "sampling_steps": job.total, "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.t_queued)), "worker": job.engine}
    if job.state == "queued":
      return {"progress": 0, "eta_relative": 0, "state": state, "textinfo": f"queued: position {queued.index(job) + 1 if job in queued else 0}"}
    if job.finished:
      return {"progress": 1, "eta_relative": 0, "state": state, "textinfo": job.state + (f": {job.error}" if job.error else ""),
              "current_image": None if skip_current_image else job.preview}
    p = min(1.0, 0.01 + job.step / job.total) if job.total else 0.01   # A1111's formula: never 0 while running
    elapsed = time.time() - job.t_start
    return {"progress": p, "eta_relative": max(0.0, elapsed / p - elapsed), "state": state, "textinfo": "running",
            "current_image": None if skip_current_image else job.preview}

  @app.post("/sdapi/v1/interrupt")
  async def interrupt(req:InterruptRequest|None=None):
    srv.scheduler.interrupt(req.id_task if req else None)
    return {}

  @app.get("/sdapi/v1/samplers")
  async def samplers(): return a1111.samplers_list()

  @app.get("/sdapi/v1/sd-models")
  async def sd_models(): return srv.models

  @app.post("/sdapi/v1/refresh-checkpoints")
  async def refresh(): return {}

  @app.get("/sdapi/v1/options")
  async def get_options(): return srv.options

  @app.post("/sdapi/v1/options")
  async def set_options(req:dict[str, object]):
    name = req.get("sd_model_checkpoint")
    if name is not None:
      model = srv.find_model(name) if isinstance(name, str) else None
      if model is None: raise HTTPException(404, f"model '{name}' not found; see /sdapi/v1/sd-models")
      req = req | {"sd_model_checkpoint": model["title"]}   # the next jobs load it (each engine, before its next job)
      srv.options["sd_checkpoint_hash"] = model["hash"]
    for k, v in req.items():   # unknown keys are ignored, as A1111 ignores them; known ones keep their type
      if k in srv.options and k != "sd_checkpoint_hash" and type(v) is not type(srv.options[k]):
        raise HTTPException(422, f"{k} must be of type {type(srv.options[k]).__name__}, got {v!r}"[:200])
    for k, v in req.items():
      if k in srv.options and k != "sd_checkpoint_hash": srv.options[k] = v
    return None

  @app.post("/sdapi/v1/png-info", response_model=PNGInfoResponse)
  async def png_info(req:PNGInfoRequest):
    im = a1111.decode_image(req.image.strip(), "image")
    items = {k: v for k, v in im.info.items() if isinstance(k, str) and isinstance(v, str)}
    text = items.pop("parameters", "")
    return {"info": text, "items": items, "parameters": a1111.parse_infotext(text) if text else {}}

  app.add_middleware(Guard, auth=srv.auth)
  return app
