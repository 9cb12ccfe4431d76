"""A whole training step (forward, backward, optimizer step) on real models: its
peak resident memory and its time, for torch.optim.AdamW(fused=True), fastadam.torch.AdamW
and fastadam.torch.AdamW(step_in_backward=True), each case in a process of its own.

Models: ``gpt2``, a GPT-2-small-shaped ``transformers.GPT2LMHeadModel`` built from
``GPT2Config()`` with random weights (124M parameters; batch 1 of 128 tokens, the shape of a
small fine-tuning micro-batch), and ``cnn``, a plain convolutional network with a wide
classifier (17M parameters; batch 32 of 3x32x32).  float32 and bfloat16 parameters.

Memory: before each measured step the kernel's high-water mark is reset (``/proc/self/
clear_refs``); the peak is the high-water mark after the step, less the resident memory when
it began (parameters and optimizer state), so it is what the step itself adds: activations,
gradients and temporaries.  The gradients' bytes are printed beside it.  Each case runs with
``MALLOC_MMAP_THRESHOLD_=131072``, so that glibc returns a freed block of that size or more to
the system at once: with its default, adaptive threshold it keeps blocks of up to 32 MB that a
step freed, and the resident size then says more about the allocator than about the step.

    python benchmarks/torch_training_step.py [--models gpt2,cnn] [--dtypes float32,bfloat16]
        [--steps 5] [--threads 2] [--repeats 1]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

OPTIMIZERS = ("torch-fused", "fastadam", "fastadam-in-backward")


def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def build(model, dtype, torch):
    torch.manual_seed(0)
    if model == "gpt2":
        import transformers
        transformers.logging.set_verbosity_error()
        net = transformers.GPT2LMHeadModel(transformers.GPT2Config()).to(dtype)
        ids = torch.randint(0, net.config.vocab_size, (1, 128))
        return net, lambda: net(input_ids=ids, labels=ids).loss
    nn = torch.nn
    net = nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 128, 3, padding=1, stride=2), nn.ReLU(),
        nn.Conv2d(128, 256, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(),
        nn.Linear(256 * 8 * 8, 1024), nn.ReLU(), nn.Linear(1024, 10)).to(dtype)
    x, y = torch.randn(32, 3, 32, 32).to(dtype), torch.randint(0, 10, (32,))
    return net, lambda: nn.functional.cross_entropy(net(x).float(), y)


def one(model, dtype_name, optimizer, steps, threads):
    """The measurement of one case, in this process: a JSON line."""
    import torch
    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    net, loss_of = build(model, dtype, torch)
    params = list(net.parameters())
    if optimizer == "torch-fused":
        opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    else:
        import fastadam.torch
        opt = fastadam.torch.AdamW(params, lr=1e-4, num_threads=threads,
                                   step_in_backward=optimizer == "fastadam-in-backward")
    peaks, times = [], []
    for k in range(steps + 2):  # two to allocate the state and warm up
        opt.zero_grad(set_to_none=True)  # the last step's gradients released (if it kept them)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
        start_rss = status("VmRSS")
        start = time.perf_counter()
        loss_of().backward()
        opt.step()
        elapsed = time.perf_counter() - start
        if k >= 2:
            peaks.append(status("VmHWM") - start_rss)
            times.append(elapsed)
    grad_bytes = sum(p.numel() * p.element_size() for p in params)
    print(json.dumps(dict(model=model, dtype=dtype_name, optimizer=optimizer, threads=threads,
                          params=sum(p.numel() for p in params), grad_bytes=grad_bytes,
                          peak_bytes=max(peaks), step_s=statistics.median(times))))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="gpt2,cnn")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="rounds over the optimizers, in turn")
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "DTYPE", "OPTIMIZER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return one(*args.one, args.steps, args.threads)
    print(f"{'model':6} {'dtype':9} {'optimizer':21} {'params':>7} {'grads MB':>9} "
          f"{'step peak MB':>13} {'step s':>7}")
    for model in args.models.split(","):
        for dtype in args.dtypes.split(","):
            rows = {}
            for _ in range(args.repeats):
                for optimizer in OPTIMIZERS:
                    for kind, env in (("memory", dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")),
                                      ("time", None)):  # the time with glibc's defaults
                        out = subprocess.run(
                            [sys.executable, __file__, "--one", model, dtype, optimizer, "--steps",
                             str(args.steps), "--threads", str(args.threads)],
                            check=True, capture_output=True, text=True, env=env).stdout
                        rows.setdefault((optimizer, kind), []).append(json.loads(out.strip().splitlines()[-1]))
            for optimizer in OPTIMIZERS:
                runs = rows[optimizer, "memory"]
                r = runs[0]
                peak = statistics.median(x["peak_bytes"] for x in runs) / 2**20
                step = statistics.median(x["step_s"] for x in rows[optimizer, "time"])
                print(f"{model:6} {dtype:9} {optimizer:21} {r['params'] / 1e6:6.1f}M "
                      f"{r['grad_bytes'] / 2**20:9.0f} {peak:13.0f} {step:7.3f}", flush=True)
            base = statistics.median(x["peak_bytes"] for x in rows["fastadam", "memory"])
            saved = base - statistics.median(x["peak_bytes"] for x in rows["fastadam-in-backward", "memory"])
            print(f"  step_in_backward's peak is {saved / 2**20:.0f} MB below the ordinary mode's: "
                  f"{saved / rows['fastadam', 'memory'][0]['grad_bytes']:.0%} of the gradients' bytes",
                  flush=True)


if __name__ == "__main__":
    main()
