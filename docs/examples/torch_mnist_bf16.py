"""Train the MNIST MLP (784-256-128-10) as a bfloat16 model in PyTorch: fastadam.torch.AdamW
with split master weights beside torch.optim.AdamW(fused=True), from the same initial weights
and batches; prints test accuracy and epoch time of both.

    pip install -e ".[torch]" && python docs/examples/torch_mnist_bf16.py [--epochs 3]
"""
import argparse
import time

import torch

import fastadam.torch
from fastadam.mnist import data

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--master-weights", default="split", choices=("split", "float32", "none"))
args = parser.parse_args()

x_train, y_train, x_test, y_test = (torch.from_numpy(a) for a in data.load_dataset(data.locate()))
x_train, x_test = x_train.reshape(len(x_train), -1).float(), x_test.reshape(len(x_test), -1).float()
if x_train.max() > 1:  # scale pixels to [0, 1]
    x_train, x_test = x_train / 255, x_test / 255
x_train, x_test = x_train.to(torch.bfloat16), x_test.to(torch.bfloat16)
y_train, y_test = y_train.long(), y_test.long()


def new_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(),
                               torch.nn.Linear(256, 128), torch.nn.ReLU(),
                               torch.nn.Linear(128, 10)).to(torch.bfloat16)


master = None if args.master_weights == "none" else args.master_weights
runs = {}
ours, theirs = new_model(), new_model()
runs[f"fastadam.torch.AdamW(master_weights={master!r})"] = (
    ours, fastadam.torch.AdamW(ours.parameters(), lr=1e-3, weight_decay=1e-4, master_weights=master))
runs["torch.optim.AdamW(fused=True)"] = (
    theirs, torch.optim.AdamW(theirs.parameters(), lr=1e-3, weight_decay=1e-4, fused=True))
schedules = {name: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.8)
             for name, (_, opt) in runs.items()}

for epoch in range(args.epochs):
    order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(epoch)).split(128)
    for name, (model, opt) in runs.items():
        started = time.perf_counter()
        for batch in order:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x_train[batch]).float(), y_train[batch])
            loss.backward()
            opt.step()
        schedules[name].step()
        seconds = time.perf_counter() - started
        with torch.no_grad():
            accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
        print(f"epoch {epoch + 1} {name:45s} test accuracy {100 * accuracy:.2f}%  ({seconds:.1f} s)")
