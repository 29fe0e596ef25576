# `tinysd serve` as a user runs it: a real uvicorn server on a free localhost port, here with --workers 2 (two worker processes, each its
# own copy of the tiny model, behind one FIFO queue). A bounded load test, client disconnects, --listen/--api-auth, and the web page in
# headless Chromium (Playwright). Every generation is 32x32, batch 1, CFG on: one JIT shape per worker.
import base64, contextlib, io, json, os, shutil, socket, subprocess, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import numpy as np, pytest
from PIL import Image
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
from server_util import tiny_model, pixels, encode, smooth_image

S = 32
ROOT = Path(__file__).resolve().parents[1]

def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]

@contextlib.contextmanager
def serving(log:Path, *args, auth=None):
  port = _free_port()
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "TINYSD_THREADS": "1"}
  with open(log, "wb") as out:
    proc = subprocess.Popen([sys.executable, "-m", "tinysd.cli", "serve", "--port", str(port), *args], stdout=out, stderr=subprocess.STDOUT, env=env)
  url = f"http://127.0.0.1:{port}"
  try:
    t0 = time.time()
    while True:   # ready when it answers: the models are loaded before the port is bound
      assert proc.poll() is None, f"server exited with {proc.returncode}: {log.read_text()[-2000:]}"
      assert time.time() - t0 < 300, "server did not come up"
      try:
        if httpx.get(url + "/sdapi/v1/samplers", auth=auth, timeout=2).status_code == 200: break
      except httpx.TransportError: pass
      time.sleep(0.3)
    yield url, proc
  finally:
    proc.terminate()
    try: proc.wait(30)
    except subprocess.TimeoutExpired: proc.kill(); proc.wait()

def _tree_rss(pid:int) -> int:
  """RSS in bytes of a process and all its descendants (the server and its worker processes), from /proc."""
  total, todo = 0, [pid]
  while todo:
    p = todo.pop()
    try:
      total += int(next(l for l in open(f"/proc/{p}/status") if l.startswith("VmRSS:")).split()[1]) * 1024
      for t in os.listdir(f"/proc/{p}/task"): todo += [int(c) for c in open(f"/proc/{p}/task/{t}/children").read().split()]
    except (FileNotFoundError, ProcessLookupError, StopIteration): pass
  return total

AUTH = ("user", "pa ss")

@pytest.fixture(scope="module")
def server(tmp_path_factory):
  # every interface, with credentials: each test below goes through the auth as an exposed server's clients would
  model = tiny_model(tmp_path_factory)
  log = tmp_path_factory.mktemp("log") / "serve.log"
  with serving(log, "--model", str(model), "--workers", "2", "--listen", "--api-auth", ":".join(AUTH), auth=AUTH) as (url, proc):
    yield url, proc

SAMPLERS = ["Euler a", "Euler", "DPM++ 2M", "DPM++ 2M Karras", "DDIM", "PLMS"]

def _requests(n:int):
  """n mixed requests: txt2img over every sampler and img2img, unique seeds and prompts; every 10th one is a bad request."""
  init = encode(smooth_image(S, seed=1))
  out = []
  for i in range(n):
    body = {"prompt": f"request {i}", "seed": 1000 + i, "steps": 2 + i % 3, "width": S, "height": S, "sampler_name": SAMPLERS[i % 6]}
    if i % 10 == 9: out.append(("/sdapi/v1/txt2img", body | {"width": 33}))
    elif i % 4 == 3: out.append(("/sdapi/v1/img2img", body | {"init_images": [init], "denoising_strength": 0.6}))
    else: out.append(("/sdapi/v1/txt2img", body))
  return out

def test_load_50_requests_8_clients(server):
  url, proc = server
  reqs = _requests(50)
  with httpx.Client(base_url=url, auth=AUTH, timeout=300, limits=httpx.Limits(max_connections=8)) as c:
    def send(i, tag="load"):
      r = c.post(reqs[i][0], json=reqs[i][1] | {"force_task_id": f"{tag}-{i}"})
      return r, c.get("/sdapi/v1/progress", params={"id_task": f"{tag}-{i}"}).json()["state"].get("worker")
    with ThreadPoolExecutor(4) as pool: list(pool.map(send, range(8), ["warm"] * 8))   # both workers' JITs (txt2img and img2img)
    alone = [send(i, "alone")[0] for i in range(len(reqs))]   # each request with nothing else in flight: the reference
    done, rss, lock = [0], {}, threading.Lock()
    def load(i):
      res = send(i)
      with lock:
        done[0] += 1
        if done[0] in (10, len(reqs)): rss[done[0]] = _tree_rss(proc.pid)
      return res
    with ThreadPoolExecutor(8) as pool: got = list(pool.map(load, range(len(reqs))))
  workers = set()
  for (route, body), ref, (r, worker) in zip(reqs, alone, got):
    if body["width"] == 33:   # the bad ones: answered 422 under load too
      assert r.status_code == ref.status_code == 422 and "multiple of 8" in r.json()["detail"]
      continue
    assert r.status_code == 200 and ref.status_code == 200, r.text
    j, info = r.json(), json.loads(r.json()["info"])
    assert j["parameters"]["prompt"] == body["prompt"] and info["seed"] == body["seed"] and info["sampler_name"] == body["sampler_name"]
    assert np.array_equal(pixels(j["images"][0]), pixels(ref.json()["images"][0])), body   # not mixed up: the same image as alone
    workers.add(worker)
  assert workers == {0, 1}   # both worker processes took jobs from the one queue
  # memory flat between the 10th and the 50th answer (server + 2 workers, ~0.6 GiB; measured +0.9 MiB): 16 MiB of margin for allocator
  # noise, less than a leak of 0.4 MiB per request (one 32x32 request's latents, images and PNGs are ~0.1 MiB) would add
  assert rss[50] - rss[10] < 16 << 20, f"RSS grew {(rss[50] - rss[10]) / 2**20:.1f} MiB"

def test_disconnect_and_interrupt_free_the_workers(server):
  url, _ = server
  httpx = _Authed()
  long = {"prompt": "long", "steps": 150, "n_iter": 8, "width": S, "height": S, "seed": 1}
  with pytest.raises(httpx.ReadTimeout):   # the client gives up: its connection closes, and the job must stop
    httpx.post(url + "/sdapi/v1/txt2img", json=long | {"force_task_id": "gone"}, timeout=3)
  t0 = time.time()
  while (p := httpx.get(url + "/sdapi/v1/progress", params={"id_task": "gone"}).json())["textinfo"] != "cancelled":
    assert time.time() - t0 < 20, p
    time.sleep(0.1)
  assert p["state"]["sampling_step"] < 1200
  # interrupt by task id in a worker process: it answers with what it had
  res = {}
  t = threading.Thread(target=lambda: res.update(r=httpx.post(url + "/sdapi/v1/txt2img", json=long | {"force_task_id": "stop"}, timeout=120)))
  t.start()
  t0 = time.time()
  while httpx.get(url + "/sdapi/v1/progress", params={"id_task": "stop"}).json()["state"]["sampling_step"] < 2:
    assert time.time() - t0 < 60
    time.sleep(0.05)
  assert httpx.post(url + "/sdapi/v1/interrupt", json={"id_task": "stop"}).json() == {}
  t.join(60)
  assert res["r"].status_code == 200 and len(res["r"].json()["images"]) == 1
  p = httpx.get(url + "/sdapi/v1/progress", params={"id_task": "stop"}).json()
  assert p["textinfo"] == "interrupted" and p["state"]["sampling_step"] < 1200
  # both workers are free again: two jobs run at once and finish
  with ThreadPoolExecutor(2) as pool:
    rs = list(pool.map(lambda s: httpx.post(url + "/sdapi/v1/txt2img", json={"steps": 2, "width": S, "height": S, "seed": s}, timeout=60), [1, 2]))
  assert [r.status_code for r in rs] == [200, 200]

def test_listen_requires_credentials(server):
  url, _ = server
  for path in ("/", "/sdapi/v1/samplers", "/docs"):
    assert httpx.get(url + path).status_code == 401
    assert httpx.get(url + path, auth=("user", "wrong")).status_code == 401
    assert httpx.get(url + path, auth=AUTH).status_code == 200
  r = httpx.post(url + "/sdapi/v1/txt2img", json={"steps": 1})
  assert r.status_code == 401 and r.json() == {"detail": "Incorrect username or password"}
  # bound on 0.0.0.0: Linux routes all of 127/8 to loopback, and only a socket bound to every interface accepts 127.0.0.2
  assert httpx.get(url.replace("127.0.0.1", "127.0.0.2") + "/", auth=AUTH).status_code == 200

class _Authed:   # httpx's module functions with the server's credentials
  def __getattr__(self, name): return lambda *a, **k: getattr(httpx, name)(*a, auth=AUTH, **k)
  ReadTimeout = httpx.ReadTimeout

def _chromium() -> str | None:
  return next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium") if p and os.path.exists(p)), None)

def test_web_page_in_chromium(server, tmp_path):
  exe = _chromium()
  if exe is None: pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")
  sync_api = pytest.importorskip("playwright.sync_api")
  url, _ = server
  Image.fromarray(np.asarray(smooth_image(S, seed=2))).save(tmp_path / "init.png")
  with sync_api.sync_playwright() as p:
    browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"])
    page = browser.new_page(viewport={"width": 1100, "height": 720}, http_credentials={"username": AUTH[0], "password": AUTH[1]})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/")
    page.wait_for_function("document.getElementById('sampler').options.length === 6")
    # txt2img: type a prompt, generate, see the image and its parameters; the download link is the server's PNG, parameters chunk included
    page.fill("#prompt", "a red fox in the snow")
    for k, v in {"#width": S, "#height": S, "#steps": 3, "#seed": 42}.items(): page.fill(k, str(v))
    page.click("#generate")
    page.wait_for_selector(".result img", timeout=120_000)
    assert page.text_content("#last-seed") == "42" and "done: 1 image" in page.text_content("#status")
    text = page.text_content(".result pre")
    assert text.startswith("a red fox in the snow\nSteps: 3, Sampler: Euler a") and "Seed: 42," in text
    href = page.get_attribute(".result a.download", "href")
    png = Image.open(io.BytesIO(base64.b64decode(href.partition(",")[2])))
    assert png.size == (S, S) and png.info["parameters"] == text
    page.screenshot(path=str(tmp_path / "txt2img.png"))
    # inpaint: upload an image, paint a mask with the brush, generate
    page.click("label:has-text('inpaint')")
    page.set_input_files("#file", str(tmp_path / "init.png"))
    page.wait_for_function(f"document.getElementById('mask-canvas').width === {S}")
    page.fill("#brush", "10")
    box = page.locator("#mask-canvas").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.5)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.7, box["y"] + box["height"] * 0.5, steps=8)
    page.mouse.up()
    painted = page.evaluate("""() => { const c = document.getElementById('mask-canvas');
      return c.getContext('2d').getImageData(0, 0, c.width, c.height).data.filter((v, i) => i % 4 === 3 && v > 0).length; }""")
    assert 0 < painted < S * S
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('.result').length === 2", timeout=120_000)
    text = page.text_content(".result pre")
    assert "Denoising strength: 0.75" in text and "Mask blur: 4" in text
    out = np.asarray(Image.open(io.BytesIO(base64.b64decode(page.get_attribute(".result a.download", "href").partition(",")[2]))).convert("RGB"))
    init = np.asarray(Image.open(tmp_path / "init.png").convert("RGB"))
    diff = np.abs(out.astype(int) - init)
    assert diff[:3].max() <= 2 and diff[14:18, 12:20].mean() > 4   # kept far from the stroke (blurred overlay edge), repainted on it
    page.screenshot(path=str(tmp_path / "inpaint.png"))
    if os.environ.get("TINYSD_README_SCREENSHOT"):   # docs/serve.png was made this way
      page.evaluate("window.scrollTo(0, 0)")
      page.screenshot(path=os.environ["TINYSD_README_SCREENSHOT"], full_page=True)
    # cancel a long run
    page.click("label:has-text('txt2img')")
    page.fill("#steps", "150")
    page.fill("#count", "8")   # batch count: a longer job with the same shape
    page.click("#generate")
    page.wait_for_function("document.getElementById('bar').value > 0 && !document.getElementById('cancel').disabled", timeout=120_000)
    page.click("#cancel")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('interrupted at step')", timeout=60_000)
    assert not page.is_disabled("#generate") and page.is_disabled("#cancel")
    page.screenshot(path=str(tmp_path / "cancelled.png"))
    browser.close()
  assert errors == []
