# The bench's own machinery: the per-kernel profiler (--profile), cpu_info(), and examples/bench.py's --vs parsing and side-by-side table.
# Small tinygrad computations only: a bench run even on the tiny model takes about a minute of scheduling and compiling.
import importlib.util, os, pathlib, subprocess, sys, textwrap
import numpy as np, pytest
from tinygrad import Tensor, TinyJit, GlobalCounters
from tinysd import bench

ROOT = pathlib.Path(__file__).resolve().parents[1]

def _checks(p:dict, top:int):
  assert p["kernels"] == p["kernel_count"] > 0                     # every kernel tinygrad counted was timed, none twice
  rows = p["top"] + ([p["rest"]] if p["rest"] else [])
  assert sum(x["count"] for x in rows) == p["kernels"] and len(p["top"]) == min(top, p["distinct"])
  assert all(x["ms"] > 0 for x in rows)
  assert sum(x["share"] for x in rows) == pytest.approx(100, abs=1e-6)
  assert sum(x["ms"] for x in rows) == pytest.approx(p["kernel_s"] * 1e3)
  assert p["gflop"] * 1e9 == pytest.approx(GlobalCounters.global_ops)
  assert [x["ms"] for x in p["top"]] == sorted((x["ms"] for x in p["top"]), reverse=True)

def test_profile_jit_replay():
  @TinyJit
  def f(a:Tensor, b:Tensor) -> Tensor: return ((a @ b).relu() + a).softmax(-1).sum(0)
  a, b = Tensor.randn(256, 256).realize(), Tensor.randn(256, 256).realize()
  want = [f(a, b).numpy() for _ in range(3)][-1]   # 1 eager, 2 capture, 3 replay
  from tinygrad.engine import realize
  orig, out = realize.track_stats, []
  p = bench.profile_call(lambda: out.append(f(a, b).numpy()), top=100)
  assert realize.track_stats is orig                               # unhooked afterwards
  np.testing.assert_allclose(out[0], want, rtol=1e-6)               # timing does not change what runs
  _checks(p, 100)
  assert p["gflop"] > 2 * 256**3 / 1e9 * 0.99                       # the matmul's FLOPs are in the estimates
  assert p["kernel_s"] <= p["wall_s"]
  rep = bench.profile_report("jit", p)
  assert rep.startswith(f"jit: {p['kernels']} kernels") and p["top"][0]["name"] in rep

def test_profile_eager_top_and_rest():
  a = Tensor.randn(64, 64).realize()
  fn = lambda: [(a * i).exp().sum(1).realize() for i in range(1, 5)]   # several run_linear calls, one kernel name repeated
  fn()   # compiled
  p = bench.profile_call(fn, top=1)
  _checks(p, 1)
  assert p["rest"] is not None or p["distinct"] == 1

def test_profile_unhooks_on_error():
  from tinygrad.engine import realize
  orig = realize.track_stats
  with pytest.raises(ZeroDivisionError, match="division by zero"): bench.profile_call(lambda: 1 / 0)
  assert realize.track_stats is orig

def test_profile_with_thread_pool():
  # ops/tg.py may replace CPUProgram.__call__ by a thread pool: the profiler hooks above it and must time those kernels too.
  # In a child process: the pool patches tinygrad for the rest of the process.
  from tinysd_ops import tg
  if not hasattr(tg, "install_cpu_threads"): pytest.skip("no tinysd_ops.tg.install_cpu_threads in this tree")
  code = textwrap.dedent("""
    from tinysd_ops import tg
    from tinygrad import Tensor
    from tinygrad.runtime import ops_cpu
    from tinysd import bench
    tg.install_cpu_threads(2)
    a, b = Tensor.randn(256, 256).realize(), Tensor.randn(256, 256).realize()
    pool, seen, threaded = ops_cpu.CPUProgram.__call__, [], []
    def spy(self, *args, **kwargs):   # what the pool hands back to tinygrad
      seen.append(pool(self, *args, **kwargs))
      threaded.append("core_id" in self.runtimevars)
      return seen[-1]
    ops_cpu.CPUProgram.__call__ = spy
    fn = lambda: ((a @ b).relu() @ b).realize()   # two matmul kernels, split by core_id
    fn()
    seen.clear(); threaded.clear()
    p = bench.profile_call(fn, top=10)
    assert pool.__name__ == "_parallel_call"
    assert p["kernels"] == p["kernel_count"] == len(seen) == 2 and all(x["ms"] > 0 for x in p["top"]), p
    assert any(threaded) and abs(sum(seen) - p["kernel_s"]) < 1e-9, (seen, threaded, p)   # the pool's own times, untouched
    print("ok")
  """)
  r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]

def test_cpu_info():
  c = bench.cpu_info()
  assert isinstance(c["model"], str) and c["model"]
  assert list(c["flags"]) == list(bench.CPU_FLAGS)
  if os.path.exists("/proc/cpuinfo") and "flags" in open("/proc/cpuinfo").read(): assert all(isinstance(v, bool) for v in c["flags"].values())
  assert all(v is None or isinstance(v, bool) for v in c["flags"].values())
  assert bench.cpu_line(c).startswith(f"cpu: {c['model']}")

def test_bench_flags():
  a = bench.parser().parse_args(["--model", "tiny", "--size", "64", "--profile", "--profile-top", "7"])
  k = bench.kwargs(a)
  assert k["profile"] is True and k["profile_top"] == 7 and k["model"] == "tiny"
  assert bench.parser().parse_args([]).profile is False

def _examples_bench():
  spec = importlib.util.spec_from_file_location("examples_bench", ROOT / "examples" / "bench.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod

def test_vs_parsing(capsys):
  eb = _examples_bench()
  assert eb.parser().parse_args(["--vs", "diffusers,torch-bf16"]).vs == ["diffusers", "torch-bf16"]
  assert eb.parser().parse_args(["--vs", "openvino, diffusers,openvino"]).vs == ["openvino", "diffusers"]
  assert eb.parser().parse_args([]).vs == []
  for bad in ("diffusers,onnx", ","):
    with pytest.raises(SystemExit) as e: eb.parser().parse_args(["--vs", bad])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--vs" in err and "unknown peer" in err and "torch-bf16" in err

def test_vs_unknown_peer_cli():
  r = subprocess.run([sys.executable, "examples/bench.py", "--vs", "diffusers,tensorrt"], cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert r.returncode == 2 and "unknown peer 'tensorrt'" in r.stderr

def test_side_by_side_table():
  eb = _examples_bench()
  r = {"batch": 1, "device": "CPU", "compute_dtype": "float", "step_s": 2.0, "vae_decode_s": [9.0, 4.0], "text_encoder_runs_s": [3.0, 1.0, 0.5],
       "step_gflop": 100.0, "vae_gflop": 40.0, "text_encoder_gflop": 5.0,
       "peak": {"n": 4096, "numpy_f32_gflops": 100.0, "torch_bf16_gflops": 200.0, "torch_threads": 2},
       "peers": {"torch-bf16": {"engine": "torch 2.13.0", "device": "CPU", "threads": 2, "precision": "bfloat16", "step_s": 1.0,
                                "vae_decode_s": 2.0, "text_encoder_s": 0.25},
                 "openvino": {"engine": "openvino 2026.4.1", "device": "CPU", "threads": 2, "precision": {"unet": "bf16"}, "step_s": 0.5,
                              "vae_decode_s": 1.0, "text_encoder_s": 0.1, "convert_s": {"unet": 60.0}, "compile_s": {"unet": 5.0}}}}
  t = eb.peers.table(r)
  line = next(l for l in t.splitlines() if l.strip().startswith("tinysd"))
  assert "50.0" in line and "50% of f32" in line                           # 100 GFLOP in 2 s, of a 100 GFLOP/s f32 peak
  bf = [l for l in t.splitlines() if l.strip().startswith("torch-bf16")]
  assert "2.00x" in bf[0] and "50% of bf16" in bf[0] and "2.00x" in bf[1]     # UNet 2/1; VAE: the last tinysd decode, 4/2
  assert "5.00x" in [l for l in t.splitlines() if l.strip().startswith("openvino")][2]   # text encoder: the last (replayed) call
  assert "unet 60.0 s + compile 5.0 s (bf16)" in t
  assert "4096x4096" in eb.peers.peak_line(r["peak"]) and "torch bf16 200.0 GFLOP/s" in eb.peers.peak_line(r["peak"])
