# `tinysd serve` in process (FastAPI's TestClient) on a tiny random model: A1111 API compatibility, queue/progress/interrupt, bad
# requests, auth. Every generation is 32x32 (16x16 latents), batch 1, CFG on: one JIT shape for the module.
import json, threading, time
import numpy as np, pytest
from PIL import Image
pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient
from server_util import tiny_model, decode, pixels, encode, smooth_image
from tinysd.server.serve import build
from tinysd.server.engines import Loader
from tinysd.server.api import Server, create_app

S = 32
T2I, I2I = "/sdapi/v1/txt2img", "/sdapi/v1/img2img"
# Processed.js() in A1111's modules/processing.py: the keys of the `info` JSON string
INFO_KEYS = {"prompt", "all_prompts", "negative_prompt", "all_negative_prompts", "seed", "all_seeds", "subseed", "all_subseeds", "subseed_strength",
             "width", "height", "sampler_name", "cfg_scale", "steps", "batch_size", "restore_faces", "face_restoration_model", "sd_model_name",
             "sd_model_hash", "sd_vae_name", "sd_vae_hash", "seed_resize_from_w", "seed_resize_from_h", "denoising_strength",
             "extra_generation_params", "index_of_first_image", "infotexts", "styles", "job_timestamp", "clip_skip", "is_using_inpainting_conditioning"}

@pytest.fixture(scope="module")
def served(tmp_path_factory):
  model, second = tiny_model(tmp_path_factory), tiny_model(tmp_path_factory, "second.safetensors")
  app, sched = build([str(model), str(second)], Loader())
  with TestClient(app) as c: yield c, sched
  sched.close()

@pytest.fixture(scope="module")
def client(served): return served[0]

def post(client, path, **body):
  r = client.post(path, json={"width": S, "height": S, "steps": 3, **body})
  assert r.status_code == 200, r.text
  return r.json()

def test_a1111_wiki_example_and_png_info(client):
  # the wiki's API example: txt2img {"prompt", "steps"}, then png-info on "data:image/png;base64," + image
  j = post(client, T2I, prompt="maltese puppy", steps=5)
  assert set(j) == {"images", "parameters", "info"} and len(j["images"]) == 1
  im = decode(j["images"][0])
  assert im.format == "PNG" and im.size == (S, S)
  info = json.loads(j["info"])
  assert im.info["parameters"] == info["infotexts"][0]
  r = client.post("/sdapi/v1/png-info", json={"image": "data:image/png;base64," + j["images"][0]}).json()
  assert r["info"] == im.info["parameters"] and r["info"].startswith("maltese puppy\nSteps: 5, Sampler: Euler, CFG scale: 7.0, Seed: ")
  assert r["parameters"]["Prompt"] == "maltese puppy" and r["parameters"]["Steps"] == "5" and r["parameters"]["Size-1"] == str(S)
  assert r["parameters"]["Seed"] == str(info["seed"]) and info["seed"] >= 0   # seed -1 became a real one, shown back

def test_a1111_client_body(client):
  # the body A1111 client libraries send (every field with its default, webuiapi-style), at a tiny size
  body = {"enable_hr": False, "denoising_strength": 0.7, "firstphase_width": 0, "firstphase_height": 0, "hr_scale": 2, "hr_upscaler": "Latent",
          "hr_second_pass_steps": 0, "hr_resize_x": 0, "hr_resize_y": 0, "prompt": "a lighthouse, (oil painting)", "styles": [], "seed": 1234,
          "subseed": -1, "subseed_strength": 0.0, "seed_resize_from_h": 0, "seed_resize_from_w": 0, "sampler_name": "Euler a", "batch_size": 1,
          "n_iter": 2, "steps": 4, "cfg_scale": 6.5, "width": S, "height": S, "restore_faces": False, "tiling": False, "do_not_save_samples": False,
          "do_not_save_grid": False, "negative_prompt": "blurry", "eta": 1.0, "s_churn": 0, "s_tmax": 0, "s_tmin": 0, "s_noise": 1,
          "override_settings": {}, "override_settings_restore_afterwards": True, "script_args": [], "sampler_index": "Euler a",
          "script_name": None, "send_images": True, "save_images": False, "alwayson_scripts": {}}
  r = client.post(T2I, json=body)
  assert r.status_code == 200, r.text
  j = r.json()
  assert all(j["parameters"][k] == v for k, v in body.items())   # A1111 echoes the request
  info = json.loads(j["info"])
  assert set(info) == INFO_KEYS
  assert info["seed"] == 1234 and info["all_seeds"] == [1234, 1235] and info["width"] == S and info["height"] == S
  assert info["sampler_name"] == "Euler a" and info["cfg_scale"] == 6.5 and info["steps"] == 4 and info["batch_size"] == 1
  assert info["prompt"] == body["prompt"] and info["negative_prompt"] == "blurry" and info["all_prompts"] == [body["prompt"]] * 2
  assert len(j["images"]) == 2 and not np.array_equal(pixels(j["images"][0]), pixels(j["images"][1]))
  for i, b in enumerate(j["images"]):
    text = decode(b).info["parameters"]
    assert text == info["infotexts"][i] and f"Seed: {1234 + i}," in text and "Negative prompt: blurry" in text
  # image 2 of n_iter is the request with seed+1 alone
  alone = post(client, T2I, **(body | {"seed": 1235, "n_iter": 1}))
  assert np.array_equal(pixels(alone["images"][0]), pixels(j["images"][1]))
  assert post(client, T2I, **(body | {"send_images": False, "n_iter": 1}))["images"] == []

def test_samplers_map_to_tinysd(client, served):
  names = [s["name"] for s in client.get("/sdapi/v1/samplers").json()]
  assert set(names) == {"Euler a", "Euler", "DPM++ 2M", "DPM++ 2M Karras", "DDIM", "PLMS"}
  got = {}
  for name in names:
    j = post(client, T2I, prompt="x", seed=5, sampler_name=name)
    assert json.loads(j["info"])["sampler_name"] == name
    got[name] = pixels(j["images"][0])
  assert len({g.tobytes() for g in got.values()}) == len(names)   # each name runs a different sampler
  karras = post(client, T2I, prompt="x", seed=5, sampler_name="DPM++ 2M", scheduler="Karras")   # A1111 >= 1.9 spelling
  assert np.array_equal(pixels(karras["images"][0]), got["DPM++ 2M Karras"])
  alias = post(client, T2I, prompt="x", seed=5, sampler_index="k_euler_a")
  assert np.array_equal(pixels(alias["images"][0]), got["Euler a"])
  # the API's image is the library's for the same arguments (sampler mapping, seed, CFG, size)
  pipe = served[1].engines[0].pipe
  ref = pipe.txt2img("x", steps=3, guidance_scale=7.0, width=S, height=S, seed=5, sampler="euler_a")[0]
  assert np.array_equal(np.asarray(ref), got["Euler a"])

def test_clip_skip_setting(client):
  base = post(client, T2I, prompt="a cat", seed=9)
  j = post(client, T2I, prompt="a cat", seed=9, override_settings={"CLIP_stop_at_last_layers": 2})
  info = json.loads(j["info"])
  assert info["clip_skip"] == 2 and "Clip skip: 2" in info["infotexts"][0] and info["extra_generation_params"] == {"Clip skip": 2}
  assert not np.array_equal(pixels(j["images"][0]), pixels(base["images"][0]))
  assert json.loads(post(client, T2I, prompt="a cat", seed=9)["info"])["clip_skip"] == 1   # an override lasts one request

def test_img2img_and_inpaint(client):
  init = smooth_image(S)
  a = np.asarray(init)
  j = post(client, I2I, prompt="p", init_images=[encode(init)], denoising_strength=0.5, seed=3, sampler_name="DDIM")
  info = json.loads(j["info"])
  assert info["denoising_strength"] == 0.5 and "Denoising strength: 0.5" in info["infotexts"][0] and j["parameters"]["init_images"] is None
  out = pixels(j["images"][0])
  assert out.shape == (S, S, 3) and np.abs(out.astype(int) - a).mean() > 1
  mask = np.zeros((S, S), np.uint8); mask[8:24, 8:24] = 255
  kw = dict(prompt="p", init_images=["data:image/png;base64," + encode(init)], mask=encode(Image.fromarray(mask)), denoising_strength=0.9, seed=3,
            mask_blur=0, sampler_name="DDIM")
  j = post(client, I2I, inpainting_fill=1, **kw)
  out, m = pixels(j["images"][0]), mask > 0
  assert np.array_equal(out[~m], a[~m]) and np.abs(out[m].astype(int) - a[m]).mean() > 1   # the overlay keeps every unmasked pixel
  assert json.loads(j["info"])["extra_generation_params"] == {"Denoising strength": 0.9, "Mask blur": 0}
  filled = pixels(post(client, I2I, inpainting_fill=0, **kw)["images"][0])
  assert np.array_equal(filled[~m], a[~m]) and not np.array_equal(filled[m], out[m])   # fill changes what the model starts from
  inv = pixels(post(client, I2I, inpainting_fill=1, inpainting_mask_invert=1, **kw)["images"][0])
  assert np.array_equal(inv[m], a[m]) and not np.array_equal(inv[~m], a[~m])

def _progress(client, id):
  return client.get("/sdapi/v1/progress", params={"id_task": id}).json()

def _wait(cond, timeout=120):
  t0 = time.time()
  while not cond():
    assert time.time() - t0 < timeout, "timed out"
    time.sleep(0.05)

def test_progress_interrupt_and_fifo(client, served):
  sched = served[1]
  results = {}
  def run(id, **kw):
    results[id] = client.post(T2I, json={"width": S, "height": S, "prompt": id, "seed": 7, "force_task_id": id, **kw})
  long = threading.Thread(target=run, args=("long",), kwargs={"steps": 150, "n_iter": 4})
  long.start()
  _wait(lambda: _progress(client, "long")["state"]["sampling_step"] >= 4)
  p = _progress(client, "long")
  assert 0 < p["progress"] < 1 and p["eta_relative"] > 0 and p["state"]["job"] == "long" and p["state"]["sampling_steps"] == 600
  assert decode(p["current_image"]).size == (S // 2, S // 2)   # "Approx cheap" preview at latent resolution
  assert client.get("/sdapi/v1/progress").json()["state"]["job"] == "long"   # A1111's global progress: the running job
  others = [threading.Thread(target=run, args=(f"q{i}",), kwargs={"steps": 3}) for i in range(3)]
  for i, t in enumerate(others):
    t.start()
    _wait(lambda: _progress(client, f"q{i}")["textinfo"] == f"queued: position {i + 1}")
  assert client.post("/sdapi/v1/interrupt", json={"id_task": "q1"}).json() == {}   # a queued job leaves the queue at once
  others[1].join(30)
  assert results["q1"].status_code == 200 and results["q1"].json()["images"] == []
  assert client.post("/sdapi/v1/interrupt").json() == {}   # A1111's call: stops the running job at its next step
  long.join(60)
  for t in others: t.join(60)
  assert results["long"].status_code == 200 and len(results["long"].json()["images"]) == 1   # A1111 returns what it had
  p = _progress(client, "long")
  assert p["textinfo"] == "interrupted" and p["state"]["interrupted"] and p["state"]["sampling_step"] < 600
  assert results["q0"].status_code == results["q2"].status_code == 200
  assert sched.get("q0").t_start < sched.get("q2").t_start   # FIFO
  assert _progress(client, "q2")["textinfo"] == "done" and _progress(client, "q2")["progress"] == 1
  # each got its own images: the same seed with another prompt gives another image
  assert not np.array_equal(pixels(results["q0"].json()["images"][0]), pixels(results["q2"].json()["images"][0]))

BAD = [  # (route, body: dict = JSON, bytes = raw with a JSON content type, None = no body), status, part of the detail
  (T2I, b'{"prompt": "a", ', 422, "malformed JSON"),
  (T2I, b'[1, 2]', 422, "JSON object"),
  (T2I, {"steps": "many"}, 422, "steps"),
  (T2I, {"prompt": 5}, 422, "prompt"),
  (T2I, {"width": 100}, 422, "multiple of 8"),
  (T2I, {"width": 1 << 20}, 422, "width"),
  (T2I, {"height": 0}, 422, "height"),
  (T2I, {"steps": 0}, 422, "steps"),
  (T2I, {"steps": 10_000}, 422, "steps"),
  (T2I, b'{"cfg_scale": NaN}', 422, "cfg_scale"),
  (T2I, {"batch_size": 100}, 422, "batch_size"),
  (T2I, {"seed": -5}, 422, "seed"),
  (T2I, {"sampler_name": "Heun"}, 422, "sampler 'Heun' not found"),
  (T2I, {"sampler_name": "Euler", "scheduler": "Exponential"}, 422, "scheduler"),
  (T2I, {"prompt": "x" * 100_000}, 422, "prompt"),
  (T2I, {"enable_hr": True}, 422, "not supported"),
  (T2I, {"override_settings": {"sd_model_checkpoint": "nope"}}, 404, "not found"),
  (I2I, {}, 422, "init_images"),
  (I2I, {"init_images": ["aGVsbG8gd29ybGQ="]}, 422, "not a base64-encoded image"),
  (I2I, {"init_images": ["%%% not base64"]}, 422, "not a base64-encoded image"),
  (I2I, {"init_images": [encode(Image.new("L", (5000, 5000)))]}, 422, "5000x5000: over 16.8 MP"),   # refused before it is decoded
  (I2I, {"init_images": "IMG", "mask": encode(Image.new("L", (S, 2 * S), 255))}, 422, "must match"),
  (I2I, {"init_images": "IMG", "mask": encode(Image.new("L", (S, S), 0))}, 422, "mask is empty"),
  (I2I, {"init_images": "IMG", "mask": "bm90IGFuIGltYWdl"}, 422, "mask is not"),
  (I2I, {"init_images": "IMG", "denoising_strength": 2}, 422, "denoising_strength"),
  (I2I, {"init_images": "IMG", "inpainting_fill": 2, "mask": encode(Image.new("L", (S, S), 255))}, 422, "inpainting_fill"),
  ("/sdapi/v1/png-info", {"image": "bm90IGFuIGltYWdl"}, 422, "not a base64-encoded image"),
  ("/sdapi/v1/options", {"sd_model_checkpoint": "nope.safetensors"}, 404, "not found"),
  ("/sdapi/v1/options", {"CLIP_stop_at_last_layers": "two"}, 422, "must be of type int"),
  (T2I, {"override_settings": {"CLIP_stop_at_last_layers": 0}}, 422, "CLIP_stop_at_last_layers"),
  (T2I, {"override_settings": {"CLIP_stop_at_last_layers": 3}}, 422, "clip skip must be"),   # found by the pipeline, in the job
  ("/sdapi/v1/nope", None, 404, "Not Found"),
]

def test_bad_requests(client, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)   # A1111 would write outputs/ here; tinysd serve writes nothing
  img = encode(smooth_image(S))
  for route, body, status, part in BAD:
    if isinstance(body, dict):
      body = {"width": S, "height": S, "steps": 2, **body}
      if body.get("init_images") == "IMG": body["init_images"] = [img]
      r = client.post(route, json=body)
    elif body is None: r = client.get(route)
    else: r = client.post(route, content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, (route, part, r.text)
    j = r.json()
    assert list(j) == ["detail"] and isinstance(j["detail"], str) and part in j["detail"], (route, part, j)
    assert "\n" not in r.text and "Traceback" not in r.text and len(j["detail"]) < 400
  assert list(tmp_path.iterdir()) == []
  assert post(client, T2I, prompt="still serving")["images"]   # healthy after all of them

def test_failed_job_keeps_serving(client, served, monkeypatch):
  pipe = served[1].engines[0].pipe
  def boom(*a, **k): raise RuntimeError("decoder exploded\nsecond line of a traceback-ish message")
  monkeypatch.setattr(pipe, "decode", boom)
  r = client.post(T2I, json={"width": S, "height": S, "steps": 2})
  assert r.status_code == 500 and r.json() == {"detail": "generation failed: decoder exploded"}
  monkeypatch.undo()
  assert post(client, T2I, prompt="after a failure")["images"]

def test_api_auth_on_every_route(served):
  sched = served[1]
  app = create_app(Server(sched, [{"title": "t", "model_name": "t", "hash": None, "filename": "t"}], auth=[("alice", "s3cret"), ("bob", "pw")]))
  with TestClient(app) as c:
    for path in ("/", "/docs", "/openapi.json", "/sdapi/v1/samplers", "/sdapi/v1/progress", "/sdapi/v1/options"):
      r = c.get(path)
      assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic") and r.json() == {"detail": "Incorrect username or password"}
      assert c.get(path, auth=("alice", "wrong")).status_code == 401 and c.get(path, auth=("mallory", "s3cret")).status_code == 401
      assert c.get(path, auth=("alice", "s3cret")).status_code == 200 and c.get(path, auth=("bob", "pw")).status_code == 200
    n = len(sched._jobs)
    assert c.post(T2I, json={"steps": 2}).status_code == 401 and len(sched._jobs) == n   # refused before anything is queued
    assert "<html" in c.get("/", auth=("alice", "s3cret")).text.lower()

def test_options_switch_model(client, served):
  # last in the module: the switch reloads the model (and recompiles its JITs) in the engine
  titles = [m["title"] for m in client.get("/sdapi/v1/sd-models").json()]
  assert len(titles) == 2 and titles[1].startswith("second.safetensors [")
  assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == titles[0]
  assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "second.safetensors", "unknown_option": 1}).status_code == 200
  opts = client.get("/sdapi/v1/options").json()
  assert opts["sd_model_checkpoint"] == titles[1] and "unknown_option" not in opts
  j = post(client, T2I, prompt="x", seed=5, sampler_name="Euler a")
  info = json.loads(j["info"])
  assert info["sd_model_name"] == "second" and "Model: second" in info["infotexts"][0]
  assert served[1].engines[0].path.endswith("second.safetensors")
